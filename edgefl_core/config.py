"""Strict YAML -> dataclass configuration (no schemas here: each side owns its own).

``build_dataclass(cls, mapping)`` checks every key and type and names the offending dotted key;
``apply_overrides(mapping, ["edge.lr=0.05"])`` implements the CLIs' ``--set`` before validation.
"""
from __future__ import annotations

import dataclasses
import types
import typing

from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration is malformed; the message names the key and what was expected."""


# ---------------------------------------------------------------------------------------------
# generic strict loader


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {_type_name(tp)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported field type {tp}")  # a schema bug, not a user error


def build_dataclass(cls: type, data: Any, prefix: str = ""):
    """Build ``cls`` from a mapping; unknown keys, wrong types and failed checks name the dotted key."""
    where = prefix or "config"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else str(unknown[0])
        raise ConfigError(f"unknown config key {key!r}; valid keys under {where}: {', '.join(fields)}")
    kwargs = {name: _coerce(value, hints[name], f"{prefix}.{name}" if prefix else name)
              for name, value in data.items()}
    try:
        obj = cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"{where}: {e}") from None
    check = getattr(obj, "check", None)
    if check is not None:
        try:
            check()
        except ConfigError as e:
            raise ConfigError(f"{prefix}.{e}" if prefix else str(e)) from None
    return obj


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data


def resolve_paths(data: dict, keys: tuple[str, ...], base: Path) -> dict:
    """Make the dotted ``keys`` of ``data`` that hold relative paths relative to ``base`` (a config file's
    directory), in place: a bundle of a config and its files can be copied anywhere as one folder.
    ``~`` is expanded; absolute paths and absent or null keys are left alone."""
    for key in keys:
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or not isinstance(node.get(leaf), str) or not node[leaf]:
            continue
        path = Path(node[leaf]).expanduser()
        node[leaf] = str(path if path.is_absolute() else (base / path))
    return data


def load_config_file(path: str | Path | None, overrides: list[str] | None, path_keys: tuple[str, ...]) -> dict:
    """A config file's mapping with its relative ``path_keys`` resolved against the file's directory, then
    ``--set`` overrides applied (a path given with ``--set`` is relative to the current directory)."""
    data = {}
    if path is not None:
        data = resolve_paths(read_yaml(path), path_keys, Path(path).resolve().parent)
    return apply_overrides(data, overrides)


def apply_overrides(data: dict, overrides: list[str] | None) -> dict:
    """Apply ``dotted.key=value`` strings (values parsed as YAML) to a nested mapping, in place."""
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected dotted.key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item!r}: value is not valid YAML ({e})") from None
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = value
    return data


def to_dict(obj: Any) -> Any:
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj


def require(ok: bool, key: str, message: str) -> None:
    """Schema checks: raise a ConfigError naming ``key`` (``build_dataclass`` prefixes the section)."""
    if not ok:
        raise ConfigError(f"{key}: {message}")
