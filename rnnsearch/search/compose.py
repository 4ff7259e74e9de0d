"""One trial's config: the base config + ``sweep.overrides`` + the sampled params.

Keys are applied in a fixed order so that conditions can be checked against
the structure already chosen: first config-group choices (``cell.name``,
``optim.name``; switching to another option loads its file from ``conf/``, as
``cell=gru`` would, while keeping the current option keeps your overrides),
then ``model.num_layers`` and ``model.bidirectional``, then per-layer and
wrapper-slot names, then everything else. ``{k}`` keys expand to the layers that
exist, and a key that does not apply (see :mod:`rnnsearch.search.conditions`)
is neither sampled nor set, so a trial's params are exactly what it used.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from optuna.distributions import BaseDistribution

from rnnsearch.errors import ConfigError

from .conditions import applies, num_layers
from .space import LAYER_TEMPLATE, NO_WRAPPER, Param

_MISSING = object()
GroupOptions = dict[str, dict[str, dict[str, Any]]]  # group → option → that option's config
Suggest = Callable[[str, BaseDistribution], Any]


@dataclass
class Composition:
    """A trial's config, the values it sampled, and every key the sweep set (in order)."""

    cfg: dict[str, Any]
    params: dict[str, Any] = field(default_factory=dict)
    touched: list[str] = field(default_factory=list)


def _rank(key: str, groups: Iterable[str]) -> int:
    parts = key.split(".")
    if len(parts) == 2 and parts[1] == "name" and parts[0] in groups:
        return 0
    if key in ("model.num_layers", "model.bidirectional"):
        return 1
    return 2 if parts[-1] == "name" else 3


def _child_key(node: Any, seg: str) -> Any:
    if isinstance(node, list):
        return int(seg)
    if seg.isdigit():
        return int(seg) if int(seg) in node or seg not in node else seg
    return seg


def set_key(cfg: dict[str, Any], key: str, value: Any, groups: GroupOptions) -> None:
    """Set the dotted ``key`` of ``cfg`` to ``value``, creating containers as needed.

    Setting ``<group>.name`` to another option replaces the group's node with
    that option's config; setting any other ``....name`` to a new name (a layer's
    cell, a wrapper slot) resets that node to ``{name: value}``.
    """
    parts = key.split(".")
    if len(parts) == 2 and parts[1] == "name" and parts[0] in groups:
        current = cfg.get(parts[0]) or {}
        if current.get("name") != value:
            option = groups[parts[0]].get(str(value))
            new = copy.deepcopy(option) if option is not None else {"name": value}
            # carry the user's edits of the current option (cell.activation=relu) to the new one where
            # it has that key, as Hydra does for `cell=gru cell.activation=relu`
            file = groups[parts[0]].get(str(current.get("name")))
            if file is not None:
                for k, v in current.items():
                    if k != "name" and k in new and file.get(k, _MISSING) != v:
                        new[k] = copy.deepcopy(v)
            cfg[parts[0]] = new
        return
    node: Any = cfg
    for seg, nxt in zip(parts[:-1], parts[1:]):
        k = _child_key(node, seg)
        if isinstance(node, list):
            node.extend({} for _ in range(k + 1 - len(node)))
            if not isinstance(node[k], (dict, list)):
                node[k] = {"name": node[k]} if isinstance(node[k], str) else {}
        elif not isinstance(node.get(k), (dict, list)):
            node[k] = [] if nxt.isdigit() and seg == "wrappers" else {}
        node = node[k]
    last = _child_key(node, parts[-1])
    if isinstance(node, list):
        node.extend({} for _ in range(last + 1 - len(node)))
        node[last] = value
    elif parts[-1] == "name" and node.get("name") not in (None, value):
        node.clear()
        node["name"] = value
    else:
        node[last] = value


def _drop_empty_slots(node: Any) -> Any:
    """Remove wrapper slots named ``none`` (or left empty) from every ``wrappers`` list."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "wrappers" and isinstance(v, list):
                node[k] = [w for w in v if isinstance(w, (dict, str)) and w
                           and (w if isinstance(w, str) else w.get("name")) not in (None, NO_WRAPPER)]
            else:
                _drop_empty_slots(v)
    return node


def expand(key: str, cfg: Mapping[str, Any]) -> list[str]:
    """``model.layers.{k}.x`` → one key per existing layer; other keys unchanged."""
    if LAYER_TEMPLATE not in key:
        return [key]
    return [key.replace(LAYER_TEMPLATE, str(k)) for k in range(num_layers(cfg))]


def compose_trial(base: Mapping[str, Any], space: list[Param], suggest: Suggest, groups: GroupOptions,
                  fixed: Iterable[Param] = ()) -> Composition:
    """The config of one trial.

    Args:
        base: the composed config without ``sweep`` (plain containers).
        space: the parsed ``sweep.params``.
        suggest: ``(key, distribution) -> value``; an Optuna trial's suggest, or a lookup to replay a trial.
        groups: the config-group options the space can switch to.
        fixed: ``sweep.overrides`` as fixed params, applied before ``space``.
    """
    comp = Composition(copy.deepcopy(dict(base)))
    entries = sorted([*fixed, *space], key=lambda p: _rank(p.key, groups))  # stable: overrides, then params
    for p in entries:
        for key in expand(p.key, comp.cfg):
            if not applies(key, comp.cfg):
                continue
            value = p.value if p.fixed else suggest(key, p.dist)
            if not p.fixed:
                comp.params[key] = value
            set_key(comp.cfg, key, value, groups)
            if key not in comp.touched:
                comp.touched.append(key)
    _drop_empty_slots(comp.cfg)
    return comp


def replay(params: Mapping[str, Any]) -> Suggest:
    """A ``suggest`` that returns a finished trial's values (to rebuild its config)."""

    def suggest(key: str, dist: BaseDistribution) -> Any:
        if key not in params:
            raise ConfigError(f"The trial has no value for {key!r}: the search space changed since it ran.")
        return params[key]

    return suggest


def load_group_options(groups: Mapping[str, Iterable[Any]]) -> GroupOptions:
    """Load each named option of each config group from Hydra's config search path.

    Uses the running Hydra app's search path when there is one (``python -m
    rnnsearch``), else the package's ``conf/``. An option without a config file
    (e.g. a plug-in cell) becomes ``{name: option}``.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from rnnsearch.cli import CONF_DIR

    def load() -> GroupOptions:
        loader = GlobalHydra.instance().config_loader()
        out: GroupOptions = {}
        for group, options in groups.items():
            available = set(loader.get_group_options(group))
            out[group] = {}
            for opt in options:
                if str(opt) in available:
                    cfg = compose(config_name="config", overrides=[f"{group}={opt}"])
                    from omegaconf import OmegaConf

                    out[group][str(opt)] = OmegaConf.to_container(cfg[group], resolve=True)
        return out

    if GlobalHydra.instance().is_initialized():
        return load()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return load()


def config_groups(keys: Iterable[str]) -> list[str]:
    """Which of the top-level ``keys`` are Hydra config groups (``cell``, ``optim``, ``task``, ...)."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from rnnsearch.cli import CONF_DIR

    def find() -> list[str]:
        loader = GlobalHydra.instance().config_loader()
        return [k for k in keys if loader.get_group_options(k)]

    if GlobalHydra.instance().is_initialized():
        return find()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return find()


def override_list(comp: Composition, groups: Iterable[str], reference: Mapping[str, Any]) -> list[str]:
    """The trial as Hydra command-line overrides (``cell=gru model.hidden_size=64 ...``).

    Wrapper and per-layer keys become whole lists/maps (``model.wrappers=[{...}]``);
    a key missing from ``reference`` (the base config with the same group
    choices) gets Hydra's ``++`` (add or override).
    """
    out: list[str] = []
    seen: set[str] = set()
    groups = set(groups)
    for key in comp.touched:
        parts = key.split(".")
        if len(parts) == 2 and parts[1] == "name" and parts[0] in groups:
            item, value = parts[0], comp.cfg[parts[0]].get("name")
        else:
            if parts[0] == "model" and len(parts) > 2 and parts[1] in ("wrappers", "layers"):
                parts = parts[:2]
            item = ".".join(parts)
            value = _lookup(comp.cfg, parts)
            if _lookup(reference, parts, missing=_MISSING) is _MISSING:
                item = "++" + item
        if item not in seen:
            seen.add(item)
            out.append(f"{item}={hydra_value(value)}")
    return out



def _lookup(cfg: Any, parts: list[str], missing: Any = None) -> Any:
    node = cfg
    for seg in parts:
        if isinstance(node, list) and seg.isdigit() and int(seg) < len(node):
            node = node[int(seg)]
        elif isinstance(node, Mapping) and (seg in node or (seg.isdigit() and int(seg) in node)):
            node = node[seg] if seg in node else node[int(seg)]
        else:
            return missing
    return node


def hydra_value(value: Any) -> str:
    """``value`` in Hydra's override syntax (``[{name:dropout,output_keep_prob:0.8}]``, ``null``, ...)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    text = str(value)
    if text and all(c.isalnum() or c in "_-./" for c in text) and text not in ("null", "true", "false"):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"
