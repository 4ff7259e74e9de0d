"""build_model: the fused torch.nn path equals the cell-by-cell path for the same weights,
per-layer overrides, every conf file composes and builds, bad model configs are ConfigErrors."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf

from conftest import CONF_DIR, assert_close, compose_config
from rnnsearch import ConfigError, build_model, list_tasks
from rnnsearch.fused import FusedStack
from rnnsearch.layers import BidirectionalLayer, CellStack
from rnnsearch.train import make_optimizer

IN, OUT, H = 3, 2, 6
LENGTHS = torch.tensor([5, 2, 4])  # unsorted on purpose


def _cfg(cell: dict[str, Any], **model: Any) -> dict[str, Any]:
    return {"cell": dict(cell), "model": {"hidden_size": H, **model}}


def _cells_of(layer) -> list[tuple[Any, str]]:
    if isinstance(layer, BidirectionalLayer):
        return [(layer.fw.cell, ""), (layer.bw.cell, "_reverse")]
    return [(layer.cell, "")]


def copy_cells_to_fused(cell_model, fused_model) -> None:
    """Load the cell path's weights into the fused module (forget_bias folded into bias_ih)."""
    fused_model.encoder.load_state_dict(cell_model.encoder.state_dict())
    fused_model.head.load_state_dict(cell_model.head.state_dict())
    rnn = fused_model.stack.rnn
    with torch.no_grad():
        for k, layer in enumerate(cell_model.stack.layers):
            for cell, sfx in _cells_of(layer):
                while not hasattr(cell, "weight_ih"):  # unwrap (e.g. output dropout)
                    cell = cell.cell
                for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr"):
                    if hasattr(cell, name):
                        getattr(rnn, f"{name}_l{k}{sfx}").copy_(getattr(cell, name))
                if cell.registry_name == "lstm":
                    getattr(rnn, f"bias_ih_l{k}{sfx}")[H : 2 * H] += cell.forget_bias


FUSABLE = [
    ({"name": "lstm", "forget_bias": 1.0}, {}),
    ({"name": "lstm", "forget_bias": 0.0}, {}),
    ({"name": "lstm", "forget_bias": 0.5, "num_proj": 4}, {}),
    ({"name": "gru", "reset_after": True}, {}),
    ({"name": "rnn", "activation": "tanh"}, {}),
    ({"name": "rnn", "activation": "relu"}, {}),
    ({"name": "lstm"}, {"wrappers": [{"name": "dropout", "output_keep_prob": 0.7}]}),
]


@pytest.mark.parametrize("with_lengths", [False, True], ids=["full", "lengths"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("cell,extra", FUSABLE, ids=["lstm", "lstm-fb0", "lstm-proj", "gru", "rnn-tanh", "rnn-relu",
                                                      "lstm-outdrop"])
def test_fused_equals_cell_path(cell, extra, num_layers, bidirectional, with_lengths):
    cfg = _cfg(cell, num_layers=num_layers, bidirectional=bidirectional, **extra)
    cell_model = build_model({**cfg, "model": {**cfg["model"], "fused": "never"}}, IN, OUT).double().eval()
    fused_model = build_model({**cfg, "model": {**cfg["model"], "fused": "always"}}, IN, OUT).double().eval()
    assert isinstance(fused_model.stack, FusedStack) and fused_model.fused
    assert isinstance(cell_model.stack, CellStack) and not cell_model.fused
    copy_cells_to_fused(cell_model, fused_model)
    x = torch.randn(len(LENGTHS), 5, IN, dtype=torch.float64)
    lengths = LENGTHS if with_lengths else None
    assert_close(fused_model(x, lengths), cell_model(x, lengths), what="per-sequence prediction")
    for m in (cell_model, fused_model):
        m.per_step = True
    per_step_fused, per_step_cell = fused_model(x, lengths), cell_model(x, lengths)
    assert_close(per_step_fused, per_step_cell, what="per-step predictions")
    assert fused_model.stack.output_size == cell_model.stack.output_size
    # final states agree too (torch's h_n layout: layer-major, then direction)
    _, _, fused_finals = fused_model.stack(fused_model.encoder(x), lengths)
    _, _, cell_finals = cell_model.stack(cell_model.encoder(x), lengths)
    h_n = fused_finals[0] if isinstance(fused_finals, tuple) else fused_finals
    flat = [s for fin in cell_finals for s in (fin if bidirectional else (fin,))]
    for idx, state in enumerate(flat):
        assert_close(h_n[idx], state[0], what=f"h_n[{idx}]")


@pytest.mark.parametrize("cell,extra,reason", [
    ({"name": "lstm", "use_peepholes": True}, {}, "use_peepholes"),
    ({"name": "lstm", "cell_clip": 3.0}, {}, "cell_clip"),
    ({"name": "lstm", "num_proj": 2, "proj_clip": 1.0}, {}, "proj_clip"),
    ({"name": "gru", "reset_after": False}, {}, "reset_after"),
    ({"name": "ln_lstm"}, {}, "ln_lstm"),
    ({"name": "lstm"}, {"bidirectional": True, "merge_mode": "sum"}, "merge_mode"),
    ({"name": "lstm"}, {"wrappers": [{"name": "dropout", "output_keep_prob": 0.5, "variational_recurrent": True}]},
     "dropout"),
    ({"name": "lstm"}, {"wrappers": [{"name": "dropout", "input_keep_prob": 0.5}]}, "dropout"),
    ({"name": "lstm"}, {"wrappers": [{"name": "zoneout"}]}, "wrappers"),
    ({"name": "lstm"}, {"num_layers": 2, "layers": {1: {"hidden_size": 3}}}, "layer 1"),
    ({"name": "lstm"}, {"num_layers": 2, "layers": {1: {"cell": {"name": "gru"}}}}, "layer 1"),
])
def test_unfusable_stacks_use_the_cell_path_and_refuse_always(cell, extra, reason):
    cfg = _cfg(cell, **extra)
    model = build_model(cfg, IN, OUT)
    assert not model.fused and isinstance(model.stack, CellStack)
    cfg["model"]["fused"] = "always"
    with pytest.raises(ConfigError, match="model.fused=always") as err:
        build_model(cfg, IN, OUT)
    assert reason in str(err.value) and "auto" in str(err.value) and "never" in str(err.value)


@pytest.mark.parametrize("forget_bias", [1.0, -0.5])
def test_fused_lstm_folds_forget_bias_into_the_initial_bias(forget_bias):
    """The fused LSTM starts as the cell path would: torch's init plus forget_bias on every forget-gate bias_ih."""
    models = {}
    for fb in (0.0, forget_bias):
        torch.manual_seed(5)
        models[fb] = build_model(_cfg({"name": "lstm", "forget_bias": fb}, num_layers=2, bidirectional=True,
                                      fused="always"), IN, OUT).stack.rnn
    plain, folded = (dict(models[fb].named_parameters()) for fb in (0.0, forget_bias))
    for name, p in folded.items():
        delta = p - plain[name]
        if name.startswith("bias_ih"):
            assert_close(delta[H : 2 * H], torch.full((H,), forget_bias), tol=1e-6, what=name)
            delta = torch.cat([delta[:H], delta[2 * H:]])
        assert not delta.any(), f"{name} changed"


def test_auto_uses_the_fused_path_when_equivalent():
    assert build_model(_cfg({"name": "lstm"}, fused="auto"), IN, OUT).fused
    assert not build_model(_cfg({"name": "lstm"}, fused="never"), IN, OUT).fused


def test_per_layer_overrides():
    cfg = _cfg({"name": "lstm", "forget_bias": 1.0}, num_layers=3, layers={
        0: {"cell": {"forget_bias": 0.0}},
        1: {"hidden_size": 4, "wrappers": [{"name": "zoneout"}]},
        2: {"cell": {"name": "gru", "reset_after": False}},
    })
    model = build_model(cfg, IN, OUT)
    c0, c1, c2 = (layer.cell for layer in model.stack.layers)
    assert c0.registry_name == "lstm" and c0.forget_bias == 0.0 and c0.hidden_size == H
    assert c1.registry_name == "zoneout" and c1.cell.registry_name == "lstm" and c1.cell.forget_bias == 1.0
    assert c1.hidden_size == 4 and c2.input_size == 4  # widths chain through
    assert c2.registry_name == "gru" and c2.reset_after is False
    assert model(torch.randn(2, 4, IN), torch.tensor([4, 2])).shape == (2, OUT)


def test_per_layer_override_from_the_command_line_syntax():
    cfg = compose_config(["model.num_layers=3", "model.hidden_size=4", "model.layers={2: {cell: {name: gru}}}"])
    model = build_model(cfg, IN, OUT)
    assert [layer.cell.registry_name for layer in model.stack.layers] == ["lstm", "lstm", "gru"]


def test_per_layer_override_in_bidirectional_stack_and_list_form():
    cfg = _cfg({"name": "lstm"}, num_layers=2, bidirectional=True, layers=[None, {"cell": {"name": "rnn"}}])
    model = build_model(cfg, IN, OUT)
    assert model.stack.layers[1].fw.cell.registry_name == "rnn"
    assert model.stack.layers[1].fw.cell.input_size == 2 * H


def test_token_input_and_raw_features():
    emb = build_model(_cfg({"name": "gru"}, embedding_size=4), 10, OUT, token_input=True, per_step=True)
    assert isinstance(emb.encoder, torch.nn.Embedding)
    assert emb(torch.randint(0, 10, (2, 5))).shape == (2, 5, OUT)
    raw = build_model(_cfg({"name": "gru"}, embedding_size=0), IN, OUT)
    assert isinstance(raw.encoder, torch.nn.Identity)
    assert raw.fused and raw.stack.rnn.input_size == IN


def _conf_names(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize("model_conf", _conf_names("model"))
@pytest.mark.parametrize("cell_conf", _conf_names("cell"))
def test_every_cell_and_model_conf_composes_and_builds(cell_conf, model_conf):
    cfg = compose_config([f"cell={cell_conf}", f"model={model_conf}", "model.hidden_size=8"])
    assert cfg.cell.name == cell_conf, "the registry key equals the conf file name"
    for bidirectional in (False, True):
        cfg.model.bidirectional = bidirectional
        cfg.model.num_layers = 2
        model = build_model(cfg, input_size=2, output_size=1)
        x = torch.randn(3, 4, 2)
        out = model(x, torch.tensor([4, 1, 3]))
        assert out.shape == (3, 1) and torch.isfinite(out).all()
        out.sum().backward()


@pytest.mark.parametrize("optim_conf", _conf_names("optim"))
def test_every_optim_conf_composes_and_makes_an_optimizer(optim_conf):
    cfg = compose_config([f"optim={optim_conf}"])
    opt = make_optimizer(OmegaConf.to_container(cfg.optim), [torch.nn.Parameter(torch.zeros(2))])
    assert opt.param_groups[0]["lr"] == cfg.optim.lr


@pytest.mark.parametrize("task_conf", _conf_names("task"))
def test_every_task_conf_composes_and_names_a_registered_task(task_conf):
    cfg = compose_config([f"task={task_conf}"])
    assert cfg.task.name in list_tasks()


BAD_MODELS = [
    (["cell.name=nope"], ["'nope'", "gru", "lstm", "rnn"]),
    (["cell.forget_bias=nan"], ["forget_bias", "nan"]),
    (["+cell.bogus=1"], ["'bogus'", "forget_bias"]),
    (["model.hidden_size=0"], ["model.hidden_size", "0"]),
    (["model.hidden_size=-4"], ["model.hidden_size", "-4"]),
    (["model.num_layers=0"], ["model.num_layers", "0"]),
    (["model.fused=sometimes"], ["'sometimes'", "always, auto, never"]),
    (["model.merge_mode=max"], ["'max'", "ave, concat, mul, sum"]),
    (["cell.use_peepholes=true", "model.fused=always"], ["model.fused=always", "use_peepholes", "auto", "never"]),
    (["cell=ln_lstm", "model.fused=always"], ["model.fused=always", "'ln_lstm'"]),
    (["model.wrappers=[{name: nope}]"], ["'nope'", "dropout", "zoneout"]),
    (["model.wrappers=[{name: dropout, output_keep_prob: 0}]"], ["output_keep_prob", "(0, 1]"]),
    (["model.wrappers=[{output_keep_prob: 0.5}]"], ["'name'"]),
    (["model.num_layers=2", "model.layers={5: {hidden_size: 3}}"], ["5", "0..1"]),
    (["model.layers={0: {colour: red}}"], ["colour", "cell, hidden_size, wrappers"]),
    (["model.layers={0: {hidden_size: 0}}"], ["model.layers.0.hidden_size", "0"]),
    (["model.embedding_size=-1"], ["model.embedding_size", "-1"]),
    # accepted before, and something else was built: a misspelt key ignored, any string taken as true
    (["+model.num_layer=3"], ["'num_layer'", "num_layers", "hidden_size"]),
    (["model.bidirectional=no"], ["model.bidirectional", "true or false", "'no'"]),
    (["model.fused=never", "cell.use_peepholes=no"], ["use_peepholes", "true or false", "'no'"]),
    (["cell=gru", "model.fused=never", "cell.reset_after='false'"], ["reset_after", "true or false", "'false'"]),
    (["model.wrappers=[{name: dropout, output_keep_prob: 0.5, variational_recurrent: 'no'}]"],
     ["variational_recurrent", "'no'"]),
    (["cell=ln_lstm", "cell.eps=-1"], ["eps", "-1"]),
]


@pytest.mark.parametrize("overrides,words", BAD_MODELS, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bad_model_config_is_a_config_error(overrides, words):
    cfg = compose_config(overrides)
    with pytest.raises(ConfigError) as err:
        build_model(cfg, input_size=2, output_size=1)
    msg = str(err.value)
    assert all(w in msg for w in words), msg
    assert "\n" not in msg.strip(), "one paragraph"


def test_build_is_seeded():
    cfg = _cfg({"name": "lstm"}, fused="never", num_layers=2)
    torch.manual_seed(3)
    a = build_model(cfg, IN, OUT).state_dict()
    torch.manual_seed(3)
    b = build_model(cfg, IN, OUT).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert math.isfinite(sum(v.sum().item() for v in a.values()))


@pytest.mark.parametrize("optim", [{"name": "adamw", "lr": 3e-3, "weight_decay": 0.01},
                                   {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 0.01}],
                         ids=["adamw", "sgd-l2"])
def test_weight_decay_treats_the_fused_forget_bias_as_the_cell_path_does(optim):
    """The fused LSTM keeps TF's constant forget bias inside bias_ih: decay must not shrink that constant."""
    from rnnsearch.fused import keep_folds_out_of_weight_decay

    cfg = {"cell": {"name": "lstm", "forget_bias": 1.0}, "model": {"hidden_size": H, "num_layers": 2,
                                                                   "bidirectional": True}}
    cells = build_model({**cfg, "model": {**cfg["model"], "fused": "never"}}, IN, OUT).double()
    fused = build_model({**cfg, "model": {**cfg["model"], "fused": "always"}}, IN, OUT).double()
    copy_cells_to_fused(cells, fused)
    x = torch.randn(3, 5, IN, dtype=torch.float64)
    folds = []
    for model in (cells, fused):
        opt = make_optimizer(optim, model.parameters())
        folds.append(keep_folds_out_of_weight_decay(model, opt))
        for _ in range(100):  # a zero loss: only the decay moves the weights
            opt.zero_grad()
            (0.0 * model(x, None).sum()).backward()
            opt.step()
    assert folds == [0, 4], "bias_ih of 2 layers x 2 directions carry the fold"
    with torch.no_grad():
        assert_close(fused(x, None), cells(x, None), tol=1e-10, what="outputs after 100 decayed steps")
