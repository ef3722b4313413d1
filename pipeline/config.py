"""Stage settings, declared once: the config dataclass is the source of the flags, the TOML keys and the checks.

Every stage's config is a frozen dataclass whose fields are its settings, each declared with
``setting(default, help, ...)``: the default, the type (the annotation), the help, the
choices and the smallest value allowed. From that one declaration

- ``settings(cls)`` lists each setting with its flag (``batch_size`` is ``--batch-size``; a
  bool that defaults to True is ``--no-...``), which the CLI turns into click options;
- ``build_config`` reads a ``--config job.toml`` file, whose keys are the field names or the
  flag names (``batch-size``, ``temperature`` for ``temperatures``, ``no-progress = true``),
  at the top level or under a table named after the command (``[generate-labels]``);
- ``check_settings`` checks choices and minimums with one message per kind, for the Python
  API as for the CLI.

Flags given on the command line override the file; fields in neither take their default.
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from typing import Any, TypeVar

from distill.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["setting", "Setting", "settings", "check_settings", "load_toml", "toml_keys", "build_config",
           "config_to_dict"]

C = TypeVar("C")
_META = "distill"  # the key of a field's metadata that holds its Setting parts


def setting(default: Any = dataclasses.MISSING, help: str = "", *, choices: tuple | None = None,
            minimum: float | None = None, flag: str | None = None, aliases: tuple[str, ...] = (),
            value_aliases: dict[str, str] | None = None, default_help: str | None = None, cli: bool = True,
            kw_only: bool | type[dataclasses.MISSING] = dataclasses.MISSING) -> Any:
    """A dataclass field that is a stage setting.

    help:          one line for ``--help`` (the default is appended unless ``default_help`` says it).
    choices:       the values allowed (None: any); minimum: the smallest value allowed (None: any).
    flag:          the flag, when not ``--`` plus the field name with dashes; aliases: other flags for it.
    value_aliases: other spellings of choices, mapped onto them (``{"bfloat16": "bf16"}``).
    cli:           False for a setting the command takes as an argument, not a flag.
    """
    metadata = {_META: {"help": help, "choices": choices, "minimum": minimum, "flag": flag, "aliases": aliases,
                        "value_aliases": value_aliases or {}, "default_help": default_help, "cli": cli}}
    return dataclasses.field(default=default, metadata=metadata, kw_only=kw_only)


@dataclasses.dataclass(frozen=True)
class Setting:
    """One setting of a config class, as the CLI, the TOML reader and the checks see it."""

    name: str
    """The field's name: the keyword of the config class and the key of config.json."""
    flag: str
    """``--batch-size``; ``--no-progress`` for a bool whose default is True."""
    aliases: tuple[str, ...]
    help: str
    default: Any
    default_help: str | None
    """What ``--help`` says the default is, when the default value alone does not say it (None)."""
    type: type
    """int, float, str or bool; the element type of a tuple setting."""
    multiple: bool
    """A tuple setting: its flag may be given several times."""
    choices: tuple | None
    value_aliases: dict
    minimum: float | None
    cli: bool

    @property
    def negated(self) -> bool:
        """A bool that is on by default: the flag turns it off."""
        return self.type is bool and self.default is True

    @property
    def help_text(self) -> str:
        """The help with its default, as ``--help`` shows it."""
        shown = self.default_help or (None if self.type is bool else _shown(self.default))
        return f"{self.help} [default: {shown}]" if shown else self.help


def _shown(value: Any) -> str | None:
    if value is None or value == () or value == "":
        return None
    if isinstance(value, tuple):
        return ", ".join(_shown(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def settings(cls: type) -> list[Setting]:
    """Every field of the config class ``cls`` declared with ``setting``: the class's own first, in
    declaration order, then each base class's (the shared data, model and device flags last)."""
    hints = typing.get_type_hints(cls)
    out = []
    for field in dataclasses.fields(cls):
        meta = field.metadata.get(_META)
        if meta is None:
            continue
        kind, multiple = _base_type(hints[field.name])
        default = None if field.default is dataclasses.MISSING else field.default
        negated = kind is bool and default is True
        flag = meta["flag"] or "--" + ("no-" if negated else "") + field.name.replace("_", "-")
        out.append(Setting(field.name, flag, meta["aliases"], meta["help"], default, meta["default_help"], kind,
                           multiple, meta["choices"], meta["value_aliases"], meta["minimum"], meta["cli"]))
    order = [name for klass in cls.__mro__ for name in vars(klass).get("__annotations__", {})]
    return sorted(out, key=lambda s: order.index(s.name))


def _base_type(hint: Any) -> tuple[type, bool]:
    """(int | float | str | bool, multiple) of an annotation such as ``int | None`` or ``tuple[float, ...]``."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is tuple:
        return args[0], True
    if args:  # X | None
        return _base_type(args[0])
    return hint, False


def check_settings(config: Any) -> None:
    """Map value aliases onto their choices, lists onto tuples, then check choices and minimums.

    Raises a one-line ConfigError naming the flag and what is allowed. Call it first in a
    config's ``__post_init__`` (frozen configs: values are replaced with object.__setattr__).
    """
    for s in settings(type(config)):
        value = getattr(config, s.name)
        if value is None:
            continue
        if s.multiple and isinstance(value, list):
            value = tuple(value)
        if s.value_aliases and not s.multiple:
            value = s.value_aliases.get(value, value)
        object.__setattr__(config, s.name, value)
        if s.choices is not None and value not in s.choices:
            raise ConfigError(f"unknown {s.flag} {value!r}: use {', '.join(map(str, s.choices))}")
        if s.minimum is not None and not s.multiple and not isinstance(value, str) and value < s.minimum:
            raise ConfigError(f"{s.flag} must be at least {s.minimum:g}, got {value}")


# --- TOML files ----------------------------------------------------------------------------------


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


def toml_keys(cls: type) -> dict[str, tuple[str, bool]]:
    """Every TOML key ``cls`` accepts: {key: (field name, negated)}.

    A setting's keys are its field name (with ``_`` or ``-``) and its flags without the leading
    dashes; a ``no-...`` flag's key sets the field to the opposite of its value.
    """
    keys: dict[str, tuple[str, bool]] = {}
    for field in dataclasses.fields(cls):
        keys[field.name] = keys[field.name.replace("_", "-")] = (field.name, False)
    for s in settings(cls):
        for flag in (s.flag, *s.aliases):
            keys[flag.removeprefix("--")] = (s.name, s.negated and flag == s.flag)
    return keys


def build_config(cls: type[C], file_values: dict[str, Any], flag_values: dict[str, Any], source: str = "") -> C:
    """``cls(**(file_values | flag_values))`` with unknown keys and bad values as ConfigError.

    ``file_values`` are a TOML file's keys (see ``toml_keys``); ``flag_values`` hold only the
    flags the user actually gave, by field name, so a flag's default never overrides a value
    from the file; fields in neither take the dataclass default.
    """
    keys = toml_keys(cls)
    values: dict[str, Any] = {}
    for key, value in file_values.items():
        if key not in keys:
            known = ", ".join(sorted(k for k in keys if "_" not in k))
            raise ConfigError(f"{source or 'config'}: unknown key {key!r}; valid keys: {known}")
        name, negated = keys[key]
        values[name] = (not value if negated else value)
    values.update(flag_values)
    try:
        return cls(**values)
    except TypeError as e:
        fields = dataclasses.fields(cls)
        missing = [f.name for f in fields if f.name not in values and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        if missing:
            flags = ", ".join("--" + n.replace("_", "-") for n in missing)
            raise ConfigError(f"missing required setting(s) {flags}: pass them as flags or in --config") from None
        raise ConfigError(f"bad configuration: {e}") from None


def config_to_dict(config: Any) -> dict[str, Any]:
    """A config as plain JSON-able values (tuples as lists), its settings in ``settings`` order (as ``--help``)."""
    values = dataclasses.asdict(config)
    order = [s.name for s in settings(type(config))]
    names = order + [k for k in values if k not in order]
    return {k: list(values[k]) if isinstance(values[k], tuple) else values[k] for k in names}
