"""Strict conversion between nested config dataclasses and plain data (dicts, JSON, YAML files).

One loader for every config class (model, training stages, pipeline): a key the dataclass does not have, or a
value of the wrong type, is an error that names the key by its dotted path (``stages.stage2.optim.lrr: unknown key;
known: ...``), so a typo in a file never passes silently as a default. Supported field types are the ones the
configs use: ``bool``/``int``/``float``/``str``, ``Literal[...]``, ``X | None``, ``list[...]``, ``tuple[...]``,
``dict[..., ...]``, ``Any`` and nested dataclasses. No project imports here: every layer may use it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import types
import typing
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A value that does not fit its config dataclass; the message starts with the dotted key."""


def to_dict(obj: Any) -> Any:
    """Plain data of a (nested) config dataclass: dicts, lists (tuples become lists), scalars; JSON/YAML-ready."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list | tuple):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Mapping):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def from_dict(cls: type[T], data: Mapping[str, Any], base: T | None = None, path: str = "") -> T:
    """Build ``cls`` from plain data, checking every key and type against its annotations.

    Keys missing from ``data`` take ``base``'s values when a ``base`` instance is given, else the dataclass defaults.
    A mapping given for a nested dataclass overlays that section of ``base`` (or of the field's default), so
    ``{"stages": {"stage1": {"schedule": {"max_steps": 2}}}}`` changes one number of the default stage 1 and keeps the
rest (a dict of config sections overlays its entries the same way).
    ``path`` prefixes error messages.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path or cls.__name__}: expected a mapping of {cls.__name__} keys, got "
                          f"{type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in fields:
            raise ConfigError(f"{where}: unknown key; known: {', '.join(fields)}")
        sub_base = getattr(base, key) if base is not None else _default(fields[key], value)
        kwargs[key] = _convert(hints[key], value, where, sub_base)
    for name, spec in fields.items():
        if name in kwargs:
            continue
        if base is not None:
            kwargs[name] = copy.deepcopy(getattr(base, name))  # no section shared between two configs
        elif spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{path + '.' if path else ''}{name}: missing (the key has no default)")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError) or not path:
            raise
        raise ConfigError(f"{path}: {exc}") from exc


def merge(obj: T, changes: Mapping[str, Any]) -> T:
    """A copy of ``obj`` with ``changes`` applied, checked like a file: a mapping overlays a nested section
    (``{"schedule": {"max_steps": 3}}`` keeps the schedule's other keys), anything else replaces the value."""
    return from_dict(type(obj), changes, base=obj)


def check_choices(obj: Any) -> None:
    """Every ``Literal`` field of the dataclass instance ``obj`` holds one of its choices (for ``__post_init__``,
    so that a config built in Python is held to what a file is)."""
    for name, hint in _hints(type(obj)).items():
        choices = _choices(hint)
        value = getattr(obj, name)
        if choices is not None and not _is_choice(value, choices):
            raise ValueError(f"{name}={value!r}: choose one of {', '.join(map(repr, choices))}")


def dumps(obj: Any, fmt: str = "yaml") -> str:
    """``obj`` as YAML (keys in field order) or JSON text; :func:`loads` reads either back to an equal config."""
    data = to_dict(obj)
    if fmt == "json":
        return json.dumps(data, indent=2) + "\n"
    if fmt == "yaml":
        import yaml

        return yaml.safe_dump(data, sort_keys=False, default_flow_style=False)
    raise ValueError(f"format {fmt!r}: choose 'yaml' or 'json'")


def loads(text: str, cls: type[T], base: T | None = None, fmt: str = "yaml") -> T:
    """Parse YAML (a superset of JSON) or JSON text into ``cls`` (see :func:`from_dict`)."""
    if fmt == "json":
        data = json.loads(text)
    elif fmt == "yaml":
        import yaml

        data = yaml.safe_load(text)
    else:
        raise ValueError(f"format {fmt!r}: choose 'yaml' or 'json'")
    return from_dict(cls, {} if data is None else data, base=base)


def load(path: str | Path, cls: type[T], base: T | None = None) -> T:
    """Read a ``.json``, ``.yaml`` or ``.yml`` file into ``cls`` (see :func:`from_dict`)."""
    suffix = Path(path).suffix.lower()
    if suffix not in (".json", ".yaml", ".yml"):
        raise ConfigError(f"{path}: a config file must end in .json, .yaml or .yml")
    return loads(Path(path).read_text(), cls, base=base, fmt="json" if suffix == ".json" else "yaml")


# ------------------------------------------------------------------------------------------------ internals
@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _default(spec: dataclasses.Field, value: Any) -> Any:
    """The field's default instance, when ``value`` is a mapping that may overlay it (else nothing is built)."""
    if not isinstance(value, Mapping):
        return None
    if spec.default_factory is not dataclasses.MISSING:
        return spec.default_factory()
    return None if spec.default is dataclasses.MISSING else spec.default


def _choices(hint: Any) -> tuple | None:
    if typing.get_origin(hint) is typing.Literal:
        return typing.get_args(hint)
    if _is_union(hint):
        for arg in typing.get_args(hint):
            if (found := _choices(arg)) is not None:
                return found + ((None,) if type(None) in typing.get_args(hint) else ())
    return None


def _is_choice(value: Any, choices: tuple) -> bool:
    # 1 == True and 0 == 0.0 in Python: a choice must match in type too
    return any(value == c and type(value) is type(c) for c in choices)


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _convert(hint: Any, value: Any, where: str, base: Any = None) -> Any:
    """``value`` as the annotated type ``hint``, or a :class:`ConfigError` naming ``where``."""
    if hint is Any:
        return value
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if _is_union(hint):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _convert(option, value, where, base)
            except ConfigError as exc:
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        raise ConfigError(f"{where}: expected {' | '.join(_name(a) for a in args)}, got {value!r}")
    if origin is typing.Literal:
        if not _is_choice(value, args):
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if isinstance(value, Mapping):
            return from_dict(hint, value, base=base if isinstance(base, hint) else None, path=where)
        raise ConfigError(f"{where}: expected a mapping of {hint.__name__} keys, got {type(value).__name__}")
    if origin in (list, tuple, dict):
        return _convert_container(origin, args, value, where, base)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if isinstance(hint, type) and isinstance(value, hint):
        return value
    raise ConfigError(f"{where}: expected {_name(hint)}, got {value!r}")


def _convert_container(origin: type, args: tuple, value: Any, where: str, base: Any = None) -> Any:
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        key_type, value_type = args or (Any, Any)
        # A mapping of config sections (PipelineConfig.stages) overlays its base entry by entry, as a nested
        # dataclass does: {"stages": {"stage2.1": {"schedule": {"epochs": 1}}}} keeps every other stage and key.
        # Any other dict (e.g. a Hugging Face model config) is replaced whole.
        overlay = dataclasses.is_dataclass(value_type) and isinstance(base, Mapping)
        converted = {_convert(key_type, k, f"{where}.{k}"):
                     _convert(value_type, v, f"{where}.{k}", base.get(k) if overlay else None)
                     for k, v in value.items()}
        return {**copy.deepcopy(dict(base)), **converted} if overlay else converted
    if not isinstance(value, list | tuple):
        raise ConfigError(f"{where}: expected a list, got {value!r}")
    if origin is list:
        item = args[0] if args else Any
        return [_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
    if args and len(value) != len(args):
        raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
    return tuple(_convert(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args or [Any] * len(value), value,
                                                                                  strict=True)))
