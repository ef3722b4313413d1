"""Stage settings, declared once: the config dataclass is the source of the flags, the TOML keys and the checks.

Every stage's config is a frozen dataclass whose fields are its settings, each declared with
``setting(default, help, ...)``: the default, the type (the annotation), the help, the
choices and the smallest value allowed. From that one declaration

- ``settings(cls)`` lists each setting with its flag (``batch_size`` is ``--batch-size``; a
  bool that defaults to True is ``--no-...``), which the CLI turns into click options;
- ``load_toml`` reads a ``--config job.toml`` file, whose keys are the flag names
  (``batch-size``, ``temperature``, ``no-progress = true``; the field names still work, with
  a note): top-level keys apply to every command that has them, a table named after a command
  (``[generate-labels]``) overrides them, and relative paths are taken from the file's directory;
  ``build_config`` makes the config from those keys and the flags;
- ``check_settings`` checks choices and minimums with one message per kind, for the Python
  API as for the CLI.

Flags given on the command line override the file; fields in neither take their default.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import sys
import typing
from typing import Any, TypeVar

from distill.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["setting", "Setting", "settings", "check_settings", "load_toml", "toml_keys", "build_config",
           "config_to_dict", "resolve_paths", "OUTPUT_PATHS", "INPUT_PATHS"]

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


def load_toml(path: str, command: str, stages: dict[str, type]) -> dict[str, Any]:
    """The settings a ``--config`` TOML file gives ``command``, as {key: value}.

    Its top-level keys apply to every stage that has them, and a table named after a command
    (``[generate-labels]``, or ``[generate_labels]``) overrides them for that command. The keys
    are the flag names (``batch-size``, ``temperature``, ``no-progress = true``); the field names
    still work, with a one-line note on stderr. Relative paths are taken from the file's
    directory (see ``resolve_paths``). ``stages`` maps each command to its config class (the
    CLI passes them all): a key or table that none of them knows is a ConfigError naming the
    nearest flag, and so is a key of a table that its command does not know.
    """
    doc = _read_toml(path)
    tables = {name: value for name, value in doc.items() if isinstance(value, dict)}
    shared = {name: value for name, value in doc.items() if not isinstance(value, dict)}
    own = next((dict(tables[n]) for n in (command, command.replace("-", "_")) if n in tables), {})
    cls = stages[command]
    for name, table in tables.items():
        stage = name.replace("_", "-")
        if stage not in stages:
            raise ConfigError(f"{path}: unknown table [{name}]{_nearest(stage, stages)}; tables are the commands: "
                              f"{', '.join(sorted(stages))}")
        for key in table:
            _check_key(key, stages[stage], f"{path}: unknown key {key!r} in [{name}]")
    for key in shared:
        if not any(key in toml_keys(c) for c in stages.values()):
            flags = sorted({k for c in stages.values() for k in _flag_keys(c)})
            raise ConfigError(f"{path}: unknown key {key!r}, which no command has"
                              f"{_nearest(key, flags)}; valid keys: the flag names of each command's --help")
    keys = toml_keys(cls)
    values: dict[str, Any] = {}  # key -> value, one key per setting: the table's over the top level's
    for layer in ({k: v for k, v in shared.items() if k in keys}, own):
        by_field: dict[str, str] = {}
        for key in layer:
            name = keys[key][0]
            if name in by_field:
                raise ConfigError(f"{path}: keys {by_field[name]!r} and {key!r} set the same setting: keep one")
            by_field[name] = key
        values = {k: v for k, v in values.items() if keys[k][0] not in by_field} | layer
    for key, value in values.items():
        values[key] = _one_or_many(cls, keys[key][0], value, key, path, command)
        _note_old_spelling(key, value, cls, path)
    return resolve_paths(values, cls, os.path.dirname(os.path.abspath(path)))


def _read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist: check the --config path") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path} ({e.strerror}): check its permissions") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML ({e}): fix the line it names") from None


def _flag_keys(cls: type) -> list[str]:
    """The keys that are flag names: ``batch-size``, ``no-progress``, ``dtype``."""
    return [flag.removeprefix("--") for s in settings(cls) for flag in (s.flag, *s.aliases)]


def _nearest(key: str, names: Any) -> str:
    close = difflib.get_close_matches(key.replace("_", "-"), list(names), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_key(key: str, cls: type, problem: str) -> None:
    if key not in toml_keys(cls):
        flags = _flag_keys(cls)
        raise ConfigError(f"{problem}{_nearest(key, flags)}; valid keys: {', '.join(sorted(flags))}")


def _one_or_many(cls: type, name: str, value: Any, key: str, path: str, command: str) -> Any:
    """A scalar for a repeatable flag is a list of one; a list for a one-value flag is refused."""
    s = next((s for s in settings(cls) if s.name == name), None)
    if s is None:
        return value
    if s.multiple and not isinstance(value, list):
        return [value]
    if not s.multiple and isinstance(value, list):
        raise ConfigError(f"{path}: {key} = {json.dumps(value)} is a list, but {command}'s {s.flag} takes one value: "
                          f"give one (in a [{command}] table, if the list is for another command)")
    return value


def _note_old_spelling(key: str, value: Any, cls: type, path: str) -> None:
    """One line on stderr for a key that is a field's name but not its flag's (``temperatures``, ``progress``)."""
    if key in _flag_keys(cls):
        return
    s = next(s for s in settings(cls) if s.name == toml_keys(cls)[key][0])
    new = s.flag.removeprefix("--")
    shown = json.dumps(not value if s.negated and isinstance(value, bool) else value)
    print(f"distill: note: {path}: key {key!r} still works, but the keys are the flag names now: "
          f"write {new} = {shown}", file=sys.stderr)


# --- relative paths in a config file --------------------------------------------------------

OUTPUT_PATHS = frozenset({"out"})
"""Settings that name something a command writes: a relative one is always taken from the config file's directory."""
INPUT_PATHS = frozenset({"data", "eval_data", "labels", "teacher", "model", "weights", "tokenizer", "chat_template",
                         "runs", "path", "source"})
"""Settings that name a file or directory read, or a spec that may be one (``mnist1d``, ``mlp:hidden=64``):
a relative one is taken from the config file's directory when it names something there."""


def resolve_paths(values: dict[str, Any], cls: type, base: str) -> dict[str, Any]:
    """``values`` (TOML keys of ``cls``) with the relative paths of a config file in directory ``base`` made absolute.

    An output (``out``) always resolves against ``base``; an input only when ``base/value``
    exists, so built-in names and specs stay as they are, and an input found only from the
    current directory (how files were read before) still is. URLs and absolute paths are kept.
    """
    keys = toml_keys(cls)

    def resolved(name: str, value: Any) -> Any:
        if isinstance(value, list):
            return [resolved(name, v) for v in value]
        if not isinstance(value, str) or not value or "://" in value or os.path.isabs(os.path.expanduser(value)):
            return value
        candidate = os.path.normpath(os.path.join(base, value))
        return candidate if name in OUTPUT_PATHS or os.path.exists(candidate) else value

    return {key: resolved(keys[key][0], value) if keys[key][0] in OUTPUT_PATHS | INPUT_PATHS else value
            for key, value in values.items()}


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
        _check_key(key, cls, f"{source or 'config'}: unknown key {key!r}")
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
