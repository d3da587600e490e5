"""Config values as typed: a YAML or override value checked and converted to its key's
annotated type (bool, int, float, text, optional, lists), each failure one ConfigError line
naming the key. Used by config.py for every key it loads."""

from __future__ import annotations

import math
import types
import typing
from typing import Any, Union


from .errors import ConfigError

def _type_name(tp) -> str:
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string",
             dict: "a mapping"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def coerce(key: str, value: Any, annotation) -> Any:
    """Check `value` against the field's type; accept the conversions YAML users expect
    (1 for 1.0, the string "1e-4" that YAML leaves unparsed, "true")."""
    if isinstance(annotation, str):
        annotation = eval(annotation, {**typing.__dict__, **globals()})  # noqa: S307 - our own annotations
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None:
            return None
        errors = []
        for option in sorted(options, key=lambda t: t is str):  # try str last
            try:
                return coerce(key, value, option)
            except ConfigError as exc:
                errors.append(exc)
        if len(options) == 1:
            raise errors[0]
        raise ConfigError(f"config key '{key}' expects "
                          f"{' or '.join(_type_name(o) for o in options)}, got {value!r}")
    if value is None:
        raise ConfigError(f"config key '{key}' expects {_type_name(annotation)}, got null")
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif annotation is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):
                raise ConfigError(f"config key '{key}' expects a finite number, got {value!r}")
            return number
    elif annotation is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return ",".join(value)  # `dataset: [a, b]` means `dataset: a,b`
    elif annotation is dict:
        if isinstance(value, dict):
            return {str(k): v for k, v in value.items()}
    else:
        return value
    hint = ""
    if annotation is str and isinstance(value, bool):
        hint = (" (YAML reads on/off/yes/no/true/false as true or false; quote the name, e.g. "
                "'on')")
    raise ConfigError(f"config key '{key}' expects {_type_name(annotation)}, got {value!r}{hint}")


def is_text(annotation) -> bool:
    """str or Optional[str] (not a union that also takes bool, such as resume_from_checkpoint)."""
    if isinstance(annotation, str):
        annotation = eval(annotation, {**typing.__dict__, **globals()})  # noqa: S307 - our own annotations
    options = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    return options == [str]
