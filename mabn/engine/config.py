"""The configuration system both trainers share, in the spirit of detectron2's.

* Defaults live in code (``cls/config.py``, ``det/config.py``) as a :class:`CfgNode` tree; every leaf
  has a type, taken from its default value or declared with :func:`optional` / :func:`one_of`, and may be
  restricted to a range of values with :func:`in_range` / :func:`positive` / :func:`non_negative`.
  Numbers must be finite (a NaN or an infinity is refused wherever it is given).
* A YAML file may inherit another with ``_BASE_: relative/path.yaml`` and only states what differs.
* Trailing ``KEY VALUE`` pairs on the command line override both: ``SOLVER.BASE_LR 0.05 OUTPUT_DIR runs/x``.
* Unknown keys, wrongly typed values and values out of range are rejected with the key's name and the
  closest valid key or the allowed range, before any work starts.
"""
from __future__ import annotations

import copy
import difflib
import math
import os
from typing import Any, Iterable, Optional

import yaml

BASE_KEY = "_BASE_"


class ConfigError(ValueError):
    """A configuration file, key or value that cannot be used; the message names it."""


class _Optional:
    def __init__(self, kind: type, default=None):
        self.kind, self.default = kind, default


class _OneOf:
    def __init__(self, default, choices: tuple):
        self.default, self.choices = default, choices


def optional(kind: type, default=None) -> _Optional:
    """A leaf that is either ``None`` or of type ``kind`` (``float`` also accepts ints)."""
    return _Optional(kind, default)


class _Range:
    def __init__(self, kind: type, default, low, high, low_open: bool, high_open: bool, allow_none: bool):
        self.kind, self.default, self.allow_none = kind, default, allow_none
        self.low, self.high, self.low_open, self.high_open = low, high, low_open, high_open

    def describe(self) -> str:
        kind = "an integer" if self.kind is int else "a finite number"
        if self.high is None:
            bound = f"> {self.low}" if self.low_open else f">= {self.low}"
        elif self.low is None:
            bound = f"< {self.high}" if self.high_open else f"<= {self.high}"
        else:
            bound = f"in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"
        return f"{kind} {bound}" + (" (or null)" if self.allow_none else "")

    def contains(self, value) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)


def one_of(default, *choices) -> _OneOf:
    """A leaf restricted to ``choices`` (``default`` must be one of them)."""
    return _OneOf(default, (default,) + tuple(c for c in choices if c != default))


def in_range(default, low=None, high=None, *, low_open: bool = False, high_open: bool = False,
             kind: Optional[type] = None) -> _Range:
    """A number in ``[low, high]`` (``low_open`` / ``high_open``: that end excluded; None: unbounded), of the type of
    ``default`` (or ``kind``: give it for a ``None`` default, which makes the leaf optional)."""
    kind = kind or type(default)
    if kind not in (int, float):
        raise TypeError(f"in_range is for int and float leaves, got {kind.__name__}")
    spec = _Range(kind, default, low, high, low_open, high_open, allow_none=default is None)
    if default is not None and not spec.contains(default):
        raise ValueError(f"default {default!r} is not {spec.describe()}")
    return spec


def positive(default, *, kind: Optional[type] = None) -> _Range:
    """A number > 0 (an optional one with ``default=None, kind=int``)."""
    return in_range(default, 0, low_open=True, kind=kind)


def non_negative(default, *, kind: Optional[type] = None) -> _Range:
    """A number >= 0."""
    return in_range(default, 0, kind=kind)


_TYPE_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list"}


class CfgNode(dict):
    """A dict with attribute access whose leaves are type-checked on every merge.

    ``new_allowed=True`` makes a free-form section (e.g. options passed on to a norm layer), whose keys are
    checked by whoever consumes them.
    """

    def __init__(self, init: Optional[dict] = None, new_allowed: bool = False, _path: str = ""):
        super().__init__()
        object.__setattr__(self, "_new_allowed", new_allowed)
        object.__setattr__(self, "_frozen", False)
        object.__setattr__(self, "_path", _path)
        object.__setattr__(self, "_specs", {})
        for key, value in (init or {}).items():
            self._declare(key, value)

    # ------------------------------------------------------------------ declaration and access
    def _declare(self, key: str, value: Any) -> None:
        path = self._child_path(key)
        if isinstance(value, CfgNode):
            node = CfgNode(dict(value), new_allowed=value._new_allowed, _path=path)
            node._specs.update(value._specs)
            for k, v in value.items():
                if isinstance(v, CfgNode):
                    dict.__setitem__(node, k, CfgNode._copy_tree(v, _join(path, k)))
            dict.__setitem__(self, key, node)
        elif isinstance(value, dict):
            dict.__setitem__(self, key, CfgNode(value, _path=path))
        elif isinstance(value, _Optional):
            self._specs[key] = value
            dict.__setitem__(self, key, value.default)
        elif isinstance(value, (_OneOf, _Range)):
            self._specs[key] = value
            dict.__setitem__(self, key, value.default)
        else:
            dict.__setitem__(self, key, value)

    @staticmethod
    def _copy_tree(node: "CfgNode", path: str) -> "CfgNode":
        copied = CfgNode(new_allowed=node._new_allowed, _path=path)
        copied._specs.update(node._specs)
        for k, v in node.items():
            dict.__setitem__(copied, k, CfgNode._copy_tree(v, _join(path, k)) if isinstance(v, CfgNode) else copy.deepcopy(v))
        return copied

    def _child_path(self, key: str) -> str:
        return _join(self._path, key)

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"config has no key {self._child_path(name)!r}") from None

    def __setattr__(self, name: str, value) -> None:
        if name.startswith("_"):
            object.__setattr__(self, name, value)
            return
        self._set(name, value, "code")

    def __deepcopy__(self, memo):
        return CfgNode._copy_tree(self, self._path)

    def clone(self) -> "CfgNode":
        return copy.deepcopy(self)

    def freeze(self) -> "CfgNode":
        object.__setattr__(self, "_frozen", True)
        for value in self.values():
            if isinstance(value, CfgNode):
                value.freeze()
        return self

    # ------------------------------------------------------------------ merging
    def _keys_flat(self) -> list[str]:
        keys = []
        for key, value in self.items():
            keys.append(self._child_path(key))
            if isinstance(value, CfgNode):
                keys += value._keys_flat()
        return keys

    def _unknown(self, key: str, source: str, root: "CfgNode") -> ConfigError:
        full = self._child_path(key)
        close = difflib.get_close_matches(full, root._keys_flat(), n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return ConfigError(f"unknown config key {full!r} in {source}{hint}")

    def _set(self, key: str, value, source: str, root: Optional["CfgNode"] = None) -> None:
        root = root or self
        if self._frozen:
            raise ConfigError(f"config is frozen; cannot set {self._child_path(key)!r}")
        if key not in self:
            if not self._new_allowed:
                raise self._unknown(key, source, root)
            dict.__setitem__(self, key, CfgNode(value, new_allowed=True, _path=self._child_path(key)) if isinstance(value, dict) else value)
            return
        current = self[key]
        if isinstance(current, CfgNode):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {self._child_path(key)!r} in {source} is a section; got {value!r}")
            for k, v in value.items():
                current._set(k, v, source, root)
            return
        dict.__setitem__(self, key, self._checked(key, current, value, source))

    def _checked(self, key: str, current, value, source: str):
        full = self._child_path(key)
        spec = self._specs.get(key)
        if isinstance(spec, _OneOf):
            value = _choice_read_back(value, spec.choices)
            if value not in spec.choices:
                close = difflib.get_close_matches(str(value), [str(c) for c in spec.choices], n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(f"config key {full!r} in {source}: {value!r} is not one of {list(spec.choices)}{hint}")
            return value
        if isinstance(spec, _Optional):
            return None if value is None else _coerce(full, spec.kind, value, source)
        if isinstance(spec, _Range):
            if value is None and spec.allow_none:
                return None
            number = _coerce_type(full, spec.kind, value, source)
            if not (math.isfinite(number) and spec.contains(number)):
                raise ConfigError(f"config key {full!r} in {source} must be {spec.describe()}, got {value!r}")
            return number
        if current is None:  # an untyped leaf: anything YAML can express
            return value
        return _coerce(full, type(current), value, source, example=current)

    def merge_from_dict(self, values: dict, source: str = "a dict") -> "CfgNode":
        for key, value in values.items():
            if key == BASE_KEY:
                continue
            self._set(key, value, source)
        return self

    def merge_from_file(self, path: str) -> "CfgNode":
        """Merge a YAML file, after the chain of ``_BASE_`` files it inherits from."""
        for source, values in _load_chain(path):
            self.merge_from_dict(values, source)
        return self

    def merge_from_list(self, opts: Iterable[str]) -> "CfgNode":
        """Merge ``['A.B', 'value', ...]``; values are parsed as YAML scalars (``0.05``, ``true``, ``[30, 60]``)."""
        opts = list(opts)
        if len(opts) % 2:
            raise ConfigError(f"config overrides come in KEY VALUE pairs; {opts[-1]!r} has no value")
        for dotted, raw in zip(opts[0::2], opts[1::2]):
            *parents, leaf = dotted.split(".")
            node = self
            for part in parents:
                if part not in node:
                    raise node._unknown(part, "the command line", self)
                if not isinstance(node[part], CfgNode):
                    raise ConfigError(f"config key {node._child_path(part)!r} is not a section; cannot set {dotted!r}")
                node = node[part]
            node._set(leaf, _parse_scalar(raw), "the command line", self)
        return self

    # ------------------------------------------------------------------ output
    def to_dict(self) -> dict:
        return {k: v.to_dict() if isinstance(v, CfgNode) else copy.deepcopy(v) for k, v in self.items()}

    def dump(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)

    def save(self, path: str) -> None:
        """Write the resolved config (atomically: a reader never sees half a file)."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(self.dump())
        os.replace(tmp, path)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _parse_scalar(raw: str):
    if raw == "":
        return raw  # `KEY ""` clears a string key; YAML would read it as null
    try:
        return yaml.safe_load(raw) if isinstance(raw, str) else raw
    except yaml.YAMLError:
        return raw


def _choice_read_back(value, choices: tuple):
    """YAML reads some words as booleans (``off``, ``no``, ``on``): a choice spelled so is that string again."""
    if isinstance(value, bool) and value not in choices:
        for choice in choices:
            if isinstance(choice, str) and yaml.safe_load(choice) is value:
                return choice
    return value


def _coerce(full: str, kind: type, value, source: str, example=None):
    number = _coerce_type(full, kind, value, source, example)
    if isinstance(number, float) and not math.isfinite(number):
        raise ConfigError(f"config key {full!r} in {source} expects a finite number, got {value!r}")
    return number


def _coerce_type(full: str, kind: type, value, source: str, example=None):
    if kind is float and isinstance(value, str):  # YAML reads 1e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # e.g. OUTPUT_DIR 2024 or a run name given as a number
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind in (list, tuple) and isinstance(value, (list, tuple)):
        if example:
            element = type(example[0])
            return [_coerce(f"{full}[{i}]", element, v, source) for i, v in enumerate(value)]
        return list(value)
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    expected = _TYPE_NAMES.get(kind, kind.__name__)
    raise ConfigError(f"config key {full!r} in {source} expects {expected}, got {value!r} ({type(value).__name__})")


def _load_chain(path: str, seen: Optional[list] = None) -> list[tuple[str, dict]]:
    seen = seen or []
    path = os.path.abspath(path)
    if path in seen:
        raise ConfigError(f"config {path} inherits from itself through {BASE_KEY}: {' -> '.join(seen + [path])}")
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path) as f:
            values = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys, got {type(values).__name__}")
    chain = []
    base = values.get(BASE_KEY)
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"{BASE_KEY} in {path} must be a path, got {base!r}")
        chain += _load_chain(os.path.join(os.path.dirname(path), base), seen + [path])
    return chain + [(path, values)]


def load_config(defaults: CfgNode, config_file: Optional[str], overrides: Iterable[str] = ()) -> CfgNode:
    """``defaults`` <- ``config_file`` (with its bases) <- ``overrides``; returns a new, frozen config."""
    cfg = defaults.clone()
    if config_file:
        cfg.merge_from_file(config_file)
    cfg.merge_from_list(overrides)
    return cfg.freeze()
