"""Typed configs: dataclasses filled from a YAML file plus `key.sub=value` overrides.

Every recipe declares one top-level dataclass. `load_config(Cls, yaml_path, overrides)` builds it
and fails with a `ConfigError` that names the key, the file and the line on an unknown key, a wrong
type or a missing required value. `save_config` writes the resolved config next to a run's outputs.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

MISSING = dataclasses.MISSING


class ConfigError(ValueError):
    """A config problem, with the key and where it came from (file:line or the command line)."""


def required() -> Any:
    """A field with no default: loading fails unless the YAML or an override sets it."""
    return dataclasses.field(default=None, metadata={"required": True})


# --------------------------------------------------------------------------------------------
# YAML with line numbers: compose nodes so every mapping key keeps its position.


def _node_to_python(node: yaml.Node, where: dict[str, str], path: str, filename: str) -> Any:
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = key_node.value
            sub = f"{path}.{key}" if path else key
            where[sub] = f"{filename}:{key_node.start_mark.line + 1}"
            out[key] = _node_to_python(value_node, where, sub, filename)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_node_to_python(v, where, f"{path}[{i}]", filename) for i, v in enumerate(node.value)]
    return yaml.safe_load(yaml.serialize(node))


def read_yaml(path: str | Path) -> tuple[dict[str, Any], dict[str, str]]:
    """Read a YAML mapping; return (data, {dotted.key: 'file:line'})."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    try:
        node = yaml.compose(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {err}") from None
    where: dict[str, str] = {}
    if node is None:
        return {}, where
    data = _node_to_python(node, where, "", str(path))
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data, where


# --------------------------------------------------------------------------------------------
# Type checking and coercion


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{where}: '{key}' expects {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise ConfigError(f"{where}: '{key}' must be one of {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: '{key}' is a section ({tp.__name__}), got {value!r}")
        return _build(tp, value, {}, key, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: '{key}' expects a list, got {value!r}")
        (item_tp, *_) = get_args(tp) or (Any,)
        items = [_coerce(v, item_tp, f"{key}[{i}]", where) for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: '{key}' expects a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: '{key}' expects true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: '{key}' expects an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: '{key}' expects a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: '{key}' expects a string, got {value!r}")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{where}: '{key}' expects {_type_name(tp)}, got {value!r}")
    return value


def _unknown_key_error(cls: type, key: str, full_key: str, where: str) -> ConfigError:
    names = [f.name for f in dataclasses.fields(cls)]
    hint = difflib.get_close_matches(key, names, n=1)
    parent = full_key.rsplit(".", 1)[0] + "." if "." in full_key else ""
    did_you_mean = f" (did you mean '{parent}{hint[0]}'?)" if hint else ""
    return ConfigError(
        f"{where}: unknown key '{full_key}'{did_you_mean}; valid keys of "
        f"{cls.__name__}: {', '.join(names)}"
    )


def _build(cls: type, data: dict[str, Any], where_map: dict[str, str], prefix: str, default_where: str) -> Any:
    hints = get_type_hints(cls)
    field_names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in field_names:
            full = f"{prefix}.{key}" if prefix else key
            raise _unknown_key_error(cls, key, full, where_map.get(full, default_where))
    kwargs = {}
    for f in dataclasses.fields(cls):
        full = f"{prefix}.{f.name}" if prefix else f.name
        where = where_map.get(full, default_where)
        tp = hints[f.name]
        if f.name in data:
            value = data[f.name]
            if dataclasses.is_dataclass(tp) and isinstance(value, dict):
                kwargs[f.name] = _build(tp, value, where_map, full, where)
            else:
                kwargs[f.name] = _coerce(value, tp, full, where)
        elif f.metadata.get("required"):
            raise ConfigError(f"{default_where}: missing required value '{full}' ({_type_name(tp)})")
        elif dataclasses.is_dataclass(tp) and f.default is MISSING and f.default_factory is MISSING:
            kwargs[f.name] = _build(tp, {}, where_map, full, default_where)
    return cls(**kwargs)


# --------------------------------------------------------------------------------------------
# Overrides


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"command line: override '{text}' must look like key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("+")
    if not key:
        raise ConfigError(f"command line: override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def load_config(cls: type, yaml_path: str | Path | None = None, overrides: list[str] | None = None) -> Any:
    """Build `cls` from the YAML file (if any) and `key.sub=value` overrides (later wins)."""
    data: dict[str, Any] = {}
    where_map: dict[str, str] = {}
    default_where = "defaults"
    if yaml_path is not None:
        data, where_map = read_yaml(yaml_path)
        default_where = str(yaml_path)
    for text in overrides or []:
        key, value = parse_override(text)
        where_map[key] = f"command line override '{text}'"
        _set_dotted(data, key, value)
    return _build(cls, data, where_map, "", default_where)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write the resolved config as YAML (the exact values the run used)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")
    return path


def add_config_arguments(parser: argparse.ArgumentParser, default_config: str | None) -> None:
    """The arguments every config-driven stage shares: --config and key=value overrides."""
    parser.add_argument("--config", default=default_config, help=f"YAML config (default: {default_config})")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override any config key")


def resolve_path(path: str) -> Path:
    """A path as given, or relative to the repository root (so configs work from any directory)."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    in_repo = Path(__file__).resolve().parents[1] / p
    return in_repo if in_repo.exists() else p
