"""Config files, dotted overrides and eager validation (big_vision style).

A config is a Python file in ``configs/`` defining ``get_config()`` that returns an ``ml_collections.ConfigDict``.
Command lines override leaves with ``--set key.sub=value``; the value is parsed and type-checked against the
default's type. ``validate`` checks the whole config before any work starts and names the key and the fix.
"""
from __future__ import annotations

import ast
import difflib
import importlib.util
import os
import re
from typing import Any, Iterable

import ml_collections

ConfigDict = ml_collections.ConfigDict


class ConfigError(ValueError):
    """A config or override problem; the message names the key and how to fix it."""


def load_config_file(path: str) -> ConfigDict:
    """Import ``path`` (a Python file) and call its ``get_config()``."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    spec = importlib.util.spec_from_file_location(f"_edit_r1_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path}: a config file must define get_config() returning an ml_collections.ConfigDict")
    cfg = module.get_config()
    if not isinstance(cfg, ConfigDict):
        raise ConfigError(f"{path}: get_config() returned {type(cfg).__name__}, expected ml_collections.ConfigDict")
    return cfg


def _all_keys(cfg: Any, prefix: str = "") -> list[str]:
    out = []
    for k, v in cfg.items():
        full = f"{prefix}{k}"
        out.append(full)
        if isinstance(v, ConfigDict):
            out.extend(_all_keys(v, full + "."))
    return out


def _parse_value(raw: str, default: Any, key: str) -> Any:
    """Parse a command-line string into the type of ``default``."""
    if isinstance(default, bool):
        low = raw.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"--set {key}={raw}: expected a bool (true/false) like the default {default!r}")
    if isinstance(default, int):
        try:
            val = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            val = raw
        if isinstance(val, bool) or not isinstance(val, int):
            if isinstance(val, float) and val.is_integer():
                return int(val)
            raise ConfigError(f"--set {key}={raw}: expected an int like the default {default!r}")
        return val
    if isinstance(default, float):
        try:
            return float(raw)
        except ValueError as e:
            raise ConfigError(f"--set {key}={raw}: expected a float like the default {default!r}") from e
    if isinstance(default, str):
        return raw
    if default is None:  # untyped placeholder: best-effort literal, else string
        try:
            return ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            return raw
    if isinstance(default, (tuple, list)):
        try:
            val = ast.literal_eval(raw)
        except (ValueError, SyntaxError) as e:
            raise ConfigError(f"--set {key}={raw}: expected a {type(default).__name__} literal, e.g. {default!r}") from e
        if not isinstance(val, (tuple, list)):
            val = (val,)
        return type(default)(val)
    raise ConfigError(f"--set {key}: cannot override a value of type {type(default).__name__} from the command line")


def apply_overrides(cfg: ConfigDict, overrides: Iterable[str]) -> ConfigDict:
    """Apply ``key.sub=value`` strings in order; unknown keys raise with the nearest known key suggested."""
    keys = _all_keys(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set train.lr=1e-5")
        key, raw = item.split("=", 1)
        key = key.strip()
        parent, leaf = cfg, key
        parts = key.split(".")
        try:
            for p in parts[:-1]:
                parent = parent[p]
            leaf = parts[-1]
            if not isinstance(parent, ConfigDict) or leaf not in parent:
                raise KeyError(key)
        except (KeyError, TypeError, AttributeError):
            near = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
            hint = f" Did you mean '{near[0]}'?" if near else ""
            raise ConfigError(f"unknown config key '{key}'.{hint} (see the config file for the valid keys)") from None
        default = parent[leaf]
        if isinstance(default, ConfigDict):
            raise ConfigError(f"--set {key}: '{key}' is a group, set one of its fields, e.g. {key}."
                              f"{next(iter(default.keys()), 'x')}=...")
        with parent.unlocked() if hasattr(parent, "unlocked") else _null():
            parent[leaf] = _parse_value(raw, default, key)
    return cfg


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


# Integer leaves whose key matches this pattern are sizes and must be > 0.
_POSITIVE_KEY = re.compile(r"(^|_)(size|steps|dim|layers|heads|depth|len|length|batch|num_[a-z_]+|width|height)$|^num_")
_ALLOW_NONPOSITIVE = {"mesh.data", "mesh.fsdp", "mesh.tensor"}
_ALLOW_ZERO = re.compile(r"warmup_steps$")   # may be 0, never negative


def validate(cfg: ConfigDict, num_devices: int | None = None) -> ConfigDict:
    """Eager checks: positive sizes, mesh product == device count, global batch divisible by data parallelism."""
    for key in _all_keys(cfg):
        val = cfg
        for p in key.split("."):
            val = val[p]
        leaf = key.split(".")[-1]
        if key in _ALLOW_NONPOSITIVE or isinstance(val, bool) or not isinstance(val, (int, float)):
            continue
        if _ALLOW_ZERO.search(leaf):
            if val < 0:
                raise ConfigError(f"{key}={val}: must be >= 0. Fix: --set {key}=0")
            continue
        if _POSITIVE_KEY.search(leaf) and val <= 0:
            raise ConfigError(f"{key}={val}: must be > 0 (it is a size). Fix: --set {key}=<positive value>")
    if "mesh" in cfg and num_devices is not None:
        from edit_r1_jax.parallel import resolve_mesh_shape
        try:
            data, fsdp, tensor = resolve_mesh_shape(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, num_devices)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        dp = data * fsdp
        for key in _all_keys(cfg):
            if key.endswith("global_batch_size"):
                val = cfg
                for p in key.split("."):
                    val = val[p]
                if val % dp:
                    raise ConfigError(
                        f"{key}={val} is not divisible by the data-parallel size data*fsdp = {data}*{fsdp} = {dp}. "
                        f"Fix: --set {key}={max(dp, (val // dp) * dp)} or change mesh.data/mesh.fsdp")
    return cfg


def get_config(path: str, overrides: Iterable[str] = (), num_devices: int | None = None) -> ConfigDict:
    """Load, override and validate a config. ``num_devices=None`` skips the mesh/batch checks."""
    cfg = load_config_file(path)
    apply_overrides(cfg, overrides)
    return validate(cfg, num_devices)


def add_config_args(parser) -> None:
    """The shared ``--config FILE`` / ``--set key=value`` flags."""
    parser.add_argument("--config", required=True, help="Python config file exposing get_config(), e.g. configs/tiny.py")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config leaf, e.g. --set train.lr=1e-5 --set mesh.fsdp=4 (repeatable)")
