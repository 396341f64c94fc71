"""The project's one config system: YAML files in `configs/` loaded into dataclasses, plus
`section.field=value` overrides from the command line.

Every config class is a dataclass that validates itself in `__post_init__` and raises
`ConfigError` naming the field to change. Nested dataclasses map to nested YAML mappings.
Unknown keys are errors (a typo must never silently fall back to a default).
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value is wrong; the message names the field and what to do.

    `field` is the dotted path as the user writes it (`unet.head_dim`): a `check` inside a
    nested section names only its own field, and `_build` prefixes the section path on the way
    out, so the path always comes from the nesting, never from a hand-written string.
    """

    def __init__(self, message: str, field: str | None = None, reason: str | None = None):
        super().__init__(message)
        self.field, self.reason = field, reason

    def under(self, section: str) -> ConfigError:
        """The same error seen from the enclosing section `section`."""
        if self.field is None or not section:
            return self
        return field_error(f"{section}.{self.field}", self.reason or "")


def field_error(field: str, msg: str) -> ConfigError:
    return ConfigError(f"config field '{field}': {msg}", field=field, reason=msg)


def check(cond: bool, field: str, msg: str) -> None:
    """Raise ConfigError for `field` (relative to the section being built) unless `cond` holds."""
    if not cond:
        raise field_error(field, msg)


def _resolve_type(tp: Any) -> Any:
    """Strip Optional[...] / X | None to the inner type; leave others alone."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _build(cls: type[T], data: dict[str, Any], where: str) -> T:
    if not isinstance(data, dict):
        section = where or "<root>"
        raise ConfigError(f"config section '{section}' must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join((where + '.' if where else '') + k for k in unknown)}; "
            f"valid keys of '{where or '<root>'}': {', '.join(sorted(fields))}"
        )
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        tp = _resolve_type(hints[name])
        path = f"{where}.{name}" if where else name
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            kwargs[name] = _build(tp, value, path)
        elif typing.get_origin(tp) in (tuple,) and isinstance(value, list):
            kwargs[name] = tuple(value)
        elif tp is float and isinstance(value, int) and not isinstance(value, bool):
            kwargs[name] = float(value)
        elif tp is float and isinstance(value, str):
            # YAML 1.1 reads `1e-8` (no dot) as a string; users mean the number.
            try:
                kwargs[name] = float(value)
            except ValueError:
                raise field_error(path, f"expected a number, got {value!r}") from None
        else:
            kwargs[name] = value
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise err.under(where) from None


def _set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{k}' is not a section")
    node[keys[-1]] = value


def parse_overrides(overrides: list[str] | None) -> dict[str, Any]:
    """`["video.frames=8", "models.vae=tiny"]` -> nested dict; values parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.field=value")
        key, raw = item.split("=", 1)
        _set_path(out, key.strip().lstrip("-"), yaml.safe_load(raw) if raw != "" else "")
    return out


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Dataclass `cls` from an optional YAML file plus command-line overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist; pass an existing YAML file (see configs/)")
        loaded = yaml.safe_load(p.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a YAML mapping at the top level")
        data = loaded
    data = _merge(data, parse_overrides(overrides))
    return _build(cls, data, "")


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config (for dumps, metadata and fingerprints)."""
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    return _build(cls, data, "")


def fingerprint(cfg: Any) -> str:
    """Stable digest of a config's values (field order independent)."""
    import hashlib

    blob = json.dumps(to_dict(cfg), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
