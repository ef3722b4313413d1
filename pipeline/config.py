"""Stage configs from TOML files and flags: the file sets values, flags override them.

Every stage's config is a frozen dataclass whose fields are the command's flags
(``--batch-size`` is ``batch_size``). A ``--config job.toml`` file holds the same keys,
either at the top level or under a table named after the command
(``[generate-labels]``), so one file can carry a whole batch job.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, TypeVar

from distill.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["load_toml", "build_config", "config_to_dict"]

C = TypeVar("C")


def load_toml(path: str, command: str) -> dict[str, Any]:
    """Keys for ``command`` from the TOML file at ``path`` (its table, or the top level)."""
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist: check the --config path") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path} ({e.strerror}): check its permissions") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML ({e}): fix the line it names") from None
    for name in (command, command.replace("-", "_")):
        if isinstance(doc.get(name), dict):
            return dict(doc[name])
    return {k: v for k, v in doc.items() if not isinstance(v, dict)}


def build_config(cls: type[C], file_values: dict[str, Any], flag_values: dict[str, Any], source: str = "",
                 aliases: dict[str, str] | None = None) -> C:
    """``cls(**(file_values | flag_values))`` with unknown keys and bad values as ConfigError.

    ``flag_values`` holds only the flags the user actually gave, so a flag's default never
    overrides a value from the file; fields in neither take the dataclass default.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, value in file_values.items():
        name = key.replace("-", "_")
        name = (aliases or {}).get(name, name)
        if name not in fields:
            known = ", ".join(sorted(n.replace("_", "-") for n in fields))
            raise ConfigError(f"{source or 'config'}: unknown key {key!r}; valid keys: {known}")
        values[name] = _coerce(fields[name], value)
    values.update(flag_values)
    try:
        return cls(**values)
    except TypeError as e:
        missing = [n for n, f in fields.items() if n not in values and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        if missing:
            flags = ", ".join("--" + n.replace("_", "-") for n in missing)
            raise ConfigError(f"missing required setting(s) {flags}: pass them as flags or in --config") from None
        raise ConfigError(f"bad configuration: {e}") from None


def _coerce(field: dataclasses.Field, value: Any) -> Any:
    """TOML gives lists where the dataclass wants tuples."""
    return tuple(value) if isinstance(value, list) else value


def config_to_dict(config: Any) -> dict[str, Any]:
    """A config as plain JSON-able values (tuples as lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}
