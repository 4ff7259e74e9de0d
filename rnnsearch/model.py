"""``build_model``: the PyTorch model a config describes.

``input layer → stack of recurrent layers → head``. The input layer is an
embedding for token inputs and a linear map otherwise (``model.embedding_size``;
0 feeds raw features straight to the first layer). The stack is built from
``cfg.cell`` and ``cfg.model`` — ``hidden_size``, ``num_layers``,
``bidirectional``, ``merge_mode``, ``wrappers`` and per-layer overrides in
``model.layers`` (``{2: {cell: {name: gru}}}``) — either cell by cell from the
registry or, when equivalent and ``model.fused`` allows, as one fused
``torch.nn.LSTM/GRU/RNN``; ``model.compile`` (auto | true | false) says whether
the cell-by-cell time loop may be ``torch.compile``'d (:mod:`rnnsearch.compile`;
``auto`` is decided by the training run from its budget). The head predicts
once per sequence (from each direction's last real step) or at every step.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from rnnsearch.cells import create_cell, create_wrapper
from rnnsearch.cells.base import RNNCell
from rnnsearch.compile import compile_mode
from rnnsearch.compile import install as install_compiled
from rnnsearch.errors import ConfigError, check_bool, check_known_keys, check_positive_int, choice_error
from rnnsearch.fused import FusedStack, LayerSpec, why_not_fusable
from rnnsearch.layers import MERGE_MODES, BidirectionalLayer, CellStack, RecurrentLayer

FUSED_MODES = ("auto", "always", "never")


def _plain(node: Any) -> Any:
    if isinstance(node, DictConfig) or OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=True)
    return node


def _layer_overrides(layers: Any, num_layers: int) -> dict[int, dict[str, Any]]:
    layers = _plain(layers) or {}
    if isinstance(layers, list):
        layers = {k: v for k, v in enumerate(layers) if v}
    if not isinstance(layers, Mapping):
        raise ConfigError(f"model.layers must map a layer index to overrides, e.g. {{1: {{cell: {{name: gru}}}}}}; got {layers!r}.")
    out: dict[int, dict[str, Any]] = {}
    for key, value in layers.items():
        try:
            k = int(key)
        except (TypeError, ValueError):
            k = -1
        if not 0 <= k < num_layers:
            raise ConfigError(f"model.layers has an override for layer {key!r}, but valid layer indices are 0..{num_layers - 1}.")
        value = dict(value or {})
        bad = set(value) - {"cell", "hidden_size", "wrappers"}
        if bad:
            raise ConfigError(f"model.layers.{key} has unknown key(s) {sorted(bad)}; valid keys: cell, hidden_size, wrappers.")
        out[k] = value
    return out


#: The ``model`` section's settings (conf/model/default.yaml); any other key is refused, not ignored.
MODEL_KEYS = ("hidden_size", "num_layers", "bidirectional", "merge_mode", "wrappers", "layers", "fused", "compile",
              "embedding_size")


def resolve_layers(cfg: Any) -> list[LayerSpec]:
    """Turn ``cfg.cell`` + ``cfg.model`` into one :class:`LayerSpec` per layer, checking sizes and names."""
    for section, example in (("model", "{hidden_size: 64}"), ("cell", "{name: lstm}")):
        if not isinstance(cfg.get(section) if isinstance(cfg, Mapping) else None, Mapping):
            raise ConfigError(f"build_model needs a config with a '{section}' mapping (e.g. {section}: {example}), "
                              f"got {section}={cfg.get(section) if isinstance(cfg, Mapping) else cfg!r}.")
    model = _plain(cfg["model"])
    check_known_keys("model", model.keys(), MODEL_KEYS)
    base_cell = dict(_plain(cfg["cell"]))
    num_layers = check_positive_int("model.num_layers", model.get("num_layers", 1))
    hidden = check_positive_int("model.hidden_size", model.get("hidden_size"))
    wrappers = _wrapper_list(model.get("wrappers") or [], "model.wrappers")
    overrides = _layer_overrides(model.get("layers"), num_layers)
    specs = []
    for k in range(num_layers):
        o = overrides.get(k, {})
        cell = dict(base_cell)
        if "cell" in o:
            oc = dict(o["cell"] or {})
            if "name" in oc and oc["name"] != base_cell.get("name"):
                cell = {}
            cell.update(oc)
        if "name" not in cell:
            raise ConfigError("The cell config has no 'name' (e.g. cell=lstm).")
        name = cell.pop("name")
        specs.append(LayerSpec(
            cell=name, options=cell,
            hidden_size=check_positive_int(f"model.layers.{k}.hidden_size", o.get("hidden_size", hidden)),
            wrappers=_wrapper_list(o["wrappers"], f"model.layers.{k}.wrappers") if "wrappers" in o else wrappers,
        ))
    return specs


def _wrapper_list(wrappers: Any, where: str) -> list[dict[str, Any]]:
    if isinstance(wrappers, Mapping):
        wrappers = [wrappers]
    if not isinstance(wrappers, list):
        raise ConfigError(f"{where} must be a list like [{{name: dropout, output_keep_prob: 0.9}}], got {wrappers!r}.")
    out = []
    for w in wrappers:
        if isinstance(w, str):
            w = {"name": w}
        if not isinstance(w, Mapping) or "name" not in w:
            raise ConfigError(f"Each entry of {where} needs a 'name' (e.g. {{name: dropout}}), got {w!r}.")
        out.append(dict(w))
    return out


def _make_cell(spec: LayerSpec, input_size: int) -> RNNCell:
    cell = create_cell(spec.cell, input_size, spec.hidden_size, **spec.options)
    for w in spec.wrappers:
        w = dict(w)
        cell = create_wrapper(w.pop("name"), cell, **w)
    return cell


class RecurrentModel(nn.Module):
    """Input layer, recurrent stack, head.

    Call arguments:
        x: ``[batch, time, features]`` floats, or ``[batch, time]`` token ids.
        lengths: optional ``[batch]`` int64 sequence lengths (padding is masked), on ``x``'s device
            or on the CPU (what the fused path's packing needs: no host–device sync then).

    Returns ``[batch, output_size]`` (per sequence) or ``[batch, time, output_size]`` (per step).
    """

    def __init__(self, encoder: nn.Module, stack: nn.Module, head: nn.Module, per_step: bool, fused: bool,
                 compile: str = "false") -> None:
        super().__init__()
        self.encoder = encoder
        self.stack = stack
        self.head = head
        self.per_step = per_step
        self.fused = fused
        self.compile_mode = compile  # model.compile: auto | true | false (train() decides auto)

    def forward(self, x: Tensor, lengths: Optional[Tensor] = None) -> Tensor:
        h = self.encoder(x)  # (b, t, e)
        if lengths is not None and not self.fused:
            lengths = lengths.to(h.device, non_blocking=True)  # the cell path masks on the device
        outputs, last, _ = self.stack(h, lengths)
        head_device = self.head.weight.device
        if self.per_step:
            return self.head(outputs.to(head_device))  # (b, t, out)
        return self.head(last.to(head_device))  # (b, out)


def build_model(cfg: Any, input_size: int, output_size: int, *, per_step: bool = False,
                token_input: bool = False) -> RecurrentModel:
    """Build the model ``cfg`` (with ``cfg.cell`` and ``cfg.model``) describes.

    Args:
        cfg: the composed config (or a mapping with ``cell`` and ``model``).
        input_size: features per step, or the vocabulary size when ``token_input``.
        output_size: width of each prediction.
        per_step: predict at every step (else once per sequence).
        token_input: inputs are token ids (an embedding is the input layer).

    Raises:
        ConfigError: a bad name, size or option, or ``model.fused=always`` on a stack that cannot fuse.

    With ``model.compile=true`` the cell-by-cell path's time loop is compiled
    (lazily, at the first training step); ``auto`` is left to :func:`rnnsearch.train`.
    """
    specs = resolve_layers(cfg)  # checks the sections first
    model = _plain(cfg["model"])
    bidirectional = check_bool("model.bidirectional", model.get("bidirectional", False))
    merge_mode = model.get("merge_mode", "concat")
    if merge_mode not in MERGE_MODES:
        raise choice_error("model.merge_mode", merge_mode, MERGE_MODES)
    fused_mode = model.get("fused", "auto")
    if fused_mode not in FUSED_MODES:
        raise choice_error("model.fused", fused_mode, FUSED_MODES)
    compiling = compile_mode(model.get("compile", "auto"))
    check_positive_int("input size", input_size)
    check_positive_int("output size", output_size)

    emb = model.get("embedding_size")
    emb = specs[0].hidden_size if emb is None else emb
    if token_input:
        encoder: nn.Module = nn.Embedding(input_size, check_positive_int("model.embedding_size", emb))
        width = emb
    elif emb == 0:
        encoder, width = nn.Identity(), input_size
    else:
        encoder, width = nn.Linear(input_size, check_positive_int("model.embedding_size", emb)), emb

    probe = width
    for spec in specs:  # validate every cell and wrapper option, whichever path runs
        probe = _make_cell(spec, probe).output_size * (2 if bidirectional and merge_mode == "concat" else 1)
    reason = why_not_fusable(specs, bidirectional, merge_mode)
    if fused_mode == "always" and reason is not None:
        raise ConfigError(f"model.fused=always, but this stack cannot run as one torch.nn module: {reason}. "
                          f"Use model.fused=auto (falls back to the cell-by-cell path) or never.")
    use_fused = reason is None and fused_mode != "never"
    if use_fused:
        stack: nn.Module = FusedStack(specs, width, bidirectional)
    else:
        layers = []
        for spec in specs:
            if bidirectional:
                layer: nn.Module = BidirectionalLayer(_make_cell(spec, width), _make_cell(spec, width), merge_mode)
            else:
                layer = RecurrentLayer(_make_cell(spec, width))
            layers.append(layer)
            width = layer.output_size
        stack = CellStack(layers)
    head = nn.Linear(stack.output_size, output_size)
    result = RecurrentModel(encoder, stack, head, per_step=per_step, fused=use_fused, compile=compiling)
    if compiling == "true" and not use_fused:
        install_compiled(result)
    return result


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
