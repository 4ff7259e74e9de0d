"""Which config keys apply to a composition: the conditions of the conditional search space.

An option is searched only where it means something: ``cell.forget_bias`` only
when the chosen cell's constructor takes ``forget_bias`` (asked of the class in
the registry, so plug-in cells work too); ``model.layers.<k>...`` only for
layers that exist; a wrapper option (``model.wrappers.<i>.output_keep_prob``)
only when slot ``i`` holds a wrapper that takes it; an optimizer option only
when the chosen ``torch.optim`` class takes it; ``model.merge_mode`` only for
bidirectional models. Everything else always applies.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, Optional

from rnnsearch.errors import ConfigError
from rnnsearch.registry import accepted_options

from .space import NO_WRAPPER


@functools.lru_cache(maxsize=None)
def cell_options(name: str) -> Optional[frozenset[str]]:
    """Options the cell ``name`` takes (None: any, it has ``**kwargs``)."""
    from rnnsearch.cells import get_cell_class

    opts = accepted_options(get_cell_class(name).__init__, skip=("self", "input_size", "hidden_size"))
    return None if opts is None else frozenset(opts)


@functools.lru_cache(maxsize=None)
def wrapper_options(name: str) -> Optional[frozenset[str]]:
    """Options the wrapper ``name`` takes (None: any)."""
    from rnnsearch.cells.wrappers import WRAPPERS

    opts = accepted_options(WRAPPERS.get(name).__init__, skip=("self", "cell"))
    return None if opts is None else frozenset(opts)


@functools.lru_cache(maxsize=None)
def optimizer_options(name: str) -> Optional[frozenset[str]]:
    """Options of the ``torch.optim`` class called ``name`` (case-insensitive); None if unknown."""
    import torch

    cls = {n.lower(): getattr(torch.optim, n) for n in dir(torch.optim)}.get(str(name).lower())
    if not isinstance(cls, type):
        return None
    opts = accepted_options(cls.__init__, skip=("self", "params"))
    return None if opts is None else frozenset(opts)


def _takes(options: Optional[frozenset[str]], option: str) -> bool:
    return options is None or option in options


def _get(node: Any, key: Any, default: Any = None) -> Any:
    if isinstance(node, Mapping):
        for k in (key, str(key)) + ((int(key),) if str(key).isdigit() else ()):
            if k in node:
                return node[k]
        return default
    if isinstance(node, list) and str(key).isdigit():
        i = int(key)
        return node[i] if i < len(node) else default
    return default


def slot_name(wrappers: Any, index: int) -> Optional[str]:
    """Name of the wrapper in slot ``index`` of a wrappers list (None: empty slot)."""
    slot = _get(wrappers, index)
    if isinstance(slot, str):
        slot = {"name": slot}
    name = _get(slot, "name")
    return None if name in (None, NO_WRAPPER) else str(name)


def num_layers(cfg: Mapping[str, Any]) -> int:
    n = _get(_get(cfg, "model", {}), "num_layers", 1)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ConfigError(f"model.num_layers must be a positive integer, got {n!r}.")
    return n


def layer_cell_name(cfg: Mapping[str, Any], k: int) -> str:
    """The cell of layer ``k``: its ``model.layers.<k>.cell.name`` override, else ``cell.name``."""
    layer = _get(_get(_get(cfg, "model", {}), "layers", {}), k, {}) or {}
    name = _get(_get(layer, "cell", {}) or {}, "name") or _get(_get(cfg, "cell", {}), "name")
    if name is None:
        raise ConfigError("The cell config has no 'name' (e.g. cell=lstm).")
    return str(name)


def applies(key: str, cfg: Mapping[str, Any]) -> bool:
    """Whether the dotted config ``key`` means something for the composition ``cfg``."""
    parts = key.split(".")
    head = parts[0]
    if head == "cell" and len(parts) == 2 and parts[1] != "name":
        name = _get(cfg.get("cell", {}), "name")
        if name is None:
            raise ConfigError("The cell config has no 'name' (e.g. cell=lstm).")
        return _takes(cell_options(str(name)), parts[1])
    if head == "optim" and len(parts) == 2 and parts[1] not in ("name", "lr"):
        return _takes(optimizer_options(_get(cfg.get("optim", {}), "name", "adam")), parts[1])
    if head != "model" or len(parts) < 2:
        return True
    model = cfg.get("model", {})
    if parts[1] == "merge_mode":
        return bool(_get(model, "bidirectional", False))
    if parts[1] == "wrappers" and len(parts) >= 4 and parts[3] != "name":
        name = slot_name(_get(model, "wrappers", []), int(parts[2]))
        return name is not None and _takes(wrapper_options(name), parts[3])
    if parts[1] == "layers" and len(parts) >= 4:
        if not parts[2].isdigit():
            raise ConfigError(f"sweep key {key!r}: model.layers takes a layer index or {{k}}, got {parts[2]!r}.")
        k = int(parts[2])
        if k >= num_layers(cfg):
            return False
        rest = parts[3:]
        if rest[0] == "cell" and len(rest) == 2 and rest[1] != "name":
            return _takes(cell_options(layer_cell_name(cfg, k)), rest[1])
        if rest[0] == "wrappers" and len(rest) >= 3 and rest[2] != "name":
            layer = _get(_get(model, "layers", {}), k, {}) or {}
            wrappers = _get(layer, "wrappers") if _get(layer, "wrappers") is not None else _get(model, "wrappers", [])
            name = slot_name(wrappers, int(rest[1]))
            return name is not None and _takes(wrapper_options(name), rest[2])
    return True
