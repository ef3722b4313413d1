"""Component specs: a short registered name, or a ``package.module:name`` path.

Every place that turns a user's string into a component (a model, a dataset) goes
through here, so the grammar and the errors are the same everywhere:

    name                      a registered built-in, with its defaults
    name:key=value,key=value  a registered built-in with options (ints, floats, strings)
    package.module:name       a callable in the user's own code (runs that code, by design)
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

from distill.errors import ConfigError

__all__ = ["parse_options", "split_builtin", "resolve_callable"]


def _value(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def parse_options(text: str, what: str) -> dict[str, Any]:
    """``"a=1,b=x"`` -> ``{"a": 1, "b": "x"}``; a malformed item is a ConfigError."""
    options: dict[str, Any] = {}
    for item in filter(None, text.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"{what}: option {item!r} is not key=value: write e.g. {what.split()[-1]}:hidden=256")
        options[key.strip().replace("-", "_")] = _value(value.strip())
    return options


def split_builtin(spec: str, registry: dict) -> tuple[str, dict[str, Any]] | None:
    """``(name, options)`` when ``spec`` names an entry of ``registry``, else None."""
    name, colon, rest = spec.partition(":")
    if name not in registry:
        return None
    if colon and rest and "=" not in rest:
        return None  # "name:attr" is a module path that happens to share a built-in's name
    return name, parse_options(rest, f"built-in {name!r}") if colon else {}


def resolve_callable(spec: str, what: str) -> Callable:
    """Import ``package.module:name`` and return the callable it names.

    This imports and so runs the user's module: specs of this form are code the user
    chose to run. ``what`` ("model", "data") only shapes the error message.
    """
    module_name, colon, attr = spec.partition(":")
    if not colon or not module_name or not attr.isidentifier() and not all(p.isidentifier() for p in attr.split(".")):
        raise ConfigError(f"{what} spec {spec!r} is not a known name or package.module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"{what} spec {spec!r}: cannot import {module_name!r} ({e}); check the name and PYTHONPATH") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{what} spec {spec!r}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{what} spec {spec!r}: {attr!r} is not callable")
    return obj
