"""The cell registry: a cell registered from this test module, and cells shipped by another
"package" through the ``rnnsearch.cells`` entry-point group (a real dist-info on sys.path),
usable from Python and from the command line."""

from __future__ import annotations

import re
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import TINY
from rnnsearch import ConfigError, RNNCell, build_model, create_cell, list_cells, register_cell
from rnnsearch.cells import CELLS

PLUGIN = "rnnsearch_test_plugin"

PLUGIN_SOURCE = '''
"""A third-party cell package: a minimal gated unit, registered on import."""
import torch
from rnnsearch import RNNCell, register_cell


@register_cell("ep_mgu")
class MinimalGatedCell(RNNCell):
    def __init__(self, input_size, hidden_size, gate_bias=0.0):
        super().__init__(input_size, hidden_size)
        self.gate_bias = gate_bias
        self.lin = torch.nn.Linear(input_size + hidden_size, 2 * hidden_size)

    def forward(self, x_t, state):
        f, n = self.lin(torch.cat([x_t, state[0]], 1)).chunk(2, 1)
        f = torch.sigmoid(f + self.gate_bias)
        h = (1 - f) * state[0] + f * torch.tanh(n)
        return h, (h,)


class UndecoratedCell(RNNCell):
    """Registered by the entry point's name (it points at the class)."""
    def __init__(self, input_size, hidden_size):
        super().__init__(input_size, hidden_size)
        self.lin = torch.nn.Linear(input_size + hidden_size, hidden_size)

    def forward(self, x_t, state):
        h = torch.tanh(self.lin(torch.cat([x_t, state[0]], 1)))
        return h, (h,)
'''

ENTRY_POINTS = f"""
[rnnsearch.cells]
ep_mgu = {PLUGIN}
ep_plain = {PLUGIN}:UndecoratedCell
ep_broken = {PLUGIN}_does_not_exist
ep_empty = {PLUGIN}_empty
"""


def write_plugin(root: Path) -> Path:
    """A tiny installed distribution: module files plus a dist-info with entry_points.txt."""
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{PLUGIN}.py").write_text(PLUGIN_SOURCE)
    (root / f"{PLUGIN}_empty.py").write_text('"""Registers nothing."""\n')
    info = root / f"{PLUGIN}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {PLUGIN}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(ENTRY_POINTS)
    return root


@pytest.fixture
def isolated_cells(monkeypatch: pytest.MonkeyPatch):
    """Registrations made in the test are undone afterwards (the registry's dict is swapped for a copy)."""
    monkeypatch.setattr(CELLS, "_items", dict(CELLS._items))
    yield CELLS


@pytest.fixture
def plugin_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isolated_cells):
    """The plug-in distribution importable, and the registry's plug-in cache reset."""
    write_plugin(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(CELLS, "_plugins_loaded", False)
    yield tmp_path
    for mod in (PLUGIN, f"{PLUGIN}_empty"):
        sys.modules.pop(mod, None)


def test_register_a_cell_from_a_test_module(isolated_cells):
    @register_cell("test_elman")
    class TestElmanCell(RNNCell):
        def __init__(self, input_size: int, hidden_size: int, scale: float = 1.0) -> None:
            super().__init__(input_size, hidden_size)
            self.scale = scale
            self.lin = torch.nn.Linear(input_size + hidden_size, hidden_size)

        def forward(self, x_t, state):
            h = torch.tanh(self.scale * self.lin(torch.cat([x_t, state[0]], 1)))
            return h, (h,)

    assert "test_elman" in list_cells()
    cell = create_cell("test_elman", 3, 4, scale=0.5)
    assert isinstance(cell, TestElmanCell) and cell.scale == 0.5 and TestElmanCell.registry_name == "test_elman"
    out, (h,) = cell.forward_sequence(torch.randn(2, 5, 3), lengths=torch.tensor([5, 2]))
    assert out.shape == (2, 5, 4) and not out[1, 2:].any()
    with pytest.raises(ConfigError, match=r"'bogus'.*valid options: scale"):
        create_cell("test_elman", 3, 4, bogus=1)
    # usable in a model config, bidirectional, on the cell-by-cell path
    model = build_model({"cell": {"name": "test_elman", "scale": 2.0},
                         "model": {"hidden_size": 4, "num_layers": 2, "bidirectional": True}}, 2, 1)
    assert not model.fused and model(torch.randn(3, 4, 2)).shape == (3, 1)


def test_registering_a_name_twice_is_an_error_unless_replace(isolated_cells):
    class A(RNNCell):
        pass

    class B(RNNCell):
        pass

    register_cell("test_twice")(A)
    register_cell("test_twice")(A)  # the same class again is harmless
    with pytest.raises(ConfigError, match=r"'test_twice' is already registered.*replace=True"):
        register_cell("test_twice")(B)
    with pytest.raises(ConfigError, match="already registered"):
        register_cell("lstm")(B)
    register_cell("test_twice", replace=True)(B)
    assert CELLS.get("test_twice") is B


def test_overriding_forward_over_an_inherited_recur_is_refused():
    # sequence runs call project_input() + recur(): such a forward() would be skipped with no error
    from rnnsearch.cells.lstm import LSTMCell
    from rnnsearch.cells.wrappers import CellWrapper

    with pytest.raises(TypeError, match=r"ScaledLSTM overrides forward\(\) but inherits recur\(\) from LSTMCell"
                                         r".*project_input\(\)"):
        class ScaledLSTM(LSTMCell):
            def forward(self, x_t, state):
                return super().forward(2 * x_t, state)

    with pytest.raises(TypeError, match=r"DoubleOut overrides forward\(\) but inherits recur\(\) from CellWrapper"):
        class DoubleOut(CellWrapper):
            def forward(self, x_t, state):
                out, new = super().forward(x_t, state)
                return 2 * out, new


def test_a_forward_only_cell_and_its_forward_only_subclass_run_their_own_forward():
    class Echo(RNNCell):
        def forward(self, x_t, state):
            return x_t + state[0], (x_t + state[0],)

    class Double(Echo):  # inherits RNNCell.recur, which calls self.forward: allowed
        def forward(self, x_t, state):
            out, new = super().forward(x_t, state)
            return 2 * out, (2 * new[0],)

    x = torch.ones(2, 3, 4)
    out, _ = Double(4, 4).forward_sequence(x)
    assert torch.equal(out[:, :, 0], torch.tensor([[2.0, 6.0, 14.0]] * 2))


@pytest.mark.parametrize("lengths", [None, torch.tensor([3, 2])], ids=["full", "lengths"])
def test_a_step_that_returns_other_widths_than_declared_is_an_error(lengths):
    # a cell returning (h, c) under the default state_size (H,) lost c on every step with lengths, silently
    class TwoStates(RNNCell):
        def forward(self, x_t, state):
            h = torch.tanh(x_t + state[0])
            return h, (h, h)

    with pytest.raises(ValueError, match=r"TwoStates declares state_size \(4,\).*returned a state of widths \(4, 4\)"):
        TwoStates(4, 4).forward_sequence(torch.zeros(2, 3, 4), lengths=lengths)


def test_only_rnncell_classes_built_from_two_sizes_can_be_registered(isolated_cells):
    # a lambda, a non-cell class or a cell without (input_size, hidden_size) was accepted and failed only when built
    from rnnsearch import register_wrapper

    class NoSizes(RNNCell):
        def __init__(self, hidden_size):
            super().__init__(1, hidden_size)

        def forward(self, x_t, state):
            return x_t, state

    for obj, words in ((lambda i, h: None, "derived from rnnsearch.RNNCell"), (int, "derived from rnnsearch.RNNCell"),
                       (NoSizes, "(input_size, hidden_size)")):
        with pytest.raises(TypeError, match=re.escape(words)):
            register_cell("bad_one")(obj)
    assert "bad_one" not in list_cells()
    with pytest.raises(TypeError, match="derived from rnnsearch.cells.wrappers.CellWrapper"):
        register_wrapper("bad_wrapper")(NoSizes)


def test_build_model_without_a_cell_or_model_section_is_a_config_error():
    for cfg, words in (({"model": {"hidden_size": 4}}, "'cell' mapping"),
                       ({"cell": "gru", "model": {"hidden_size": 4}}, "cell='gru'"),
                       ({"cell": {"name": "gru"}}, "'model' mapping")):
        with pytest.raises(ConfigError, match=re.escape(words)):
            build_model(cfg, 2, 1)


def test_unknown_cell_lists_the_valid_names():
    with pytest.raises(ConfigError) as err:
        create_cell("lstn", 2, 2)
    assert str(err.value).startswith("Unknown cell 'lstn'; valid choices: ")
    assert all(n in str(err.value) for n in ("gru", "ln_lstm", "lstm", "rnn"))


def test_cells_from_an_entry_point(plugin_on_path):
    with pytest.warns(UserWarning) as caught:
        names = list_cells()
    assert {"ep_mgu", "ep_plain"} <= set(names)
    messages = " ".join(str(w.message) for w in caught)
    assert "'ep_broken'" in messages, "a broken plug-in becomes a warning"
    assert "'ep_empty'" in messages and "registered no cell" in messages
    assert "ep_broken" not in names and "ep_empty" not in names
    cell = create_cell("ep_mgu", 3, 4, gate_bias=1.0)
    assert type(cell).__module__ == PLUGIN and cell.gate_bias == 1.0
    assert cell.forward_sequence(torch.randn(2, 5, 3))[0].shape == (2, 5, 4)
    plain = create_cell("ep_plain", 3, 4)
    assert type(plain).__name__ == "UndecoratedCell" and type(plain).registry_name == "ep_plain"
    model = build_model({"cell": {"name": "ep_mgu"}, "model": {"hidden_size": 4}}, 2, 1)
    assert model(torch.randn(2, 3, 2)).shape == (2, 1)


def test_entry_points_load_lazily_on_first_lookup(plugin_on_path):
    assert PLUGIN not in sys.modules
    with pytest.warns(UserWarning):
        assert "ep_mgu" in CELLS
    assert PLUGIN in sys.modules
    assert "ep_mgu" in list_cells()  # loaded once; no second round of warnings or imports


@pytest.mark.slow
def test_cli_trains_a_cell_from_an_entry_point_with_its_own_conf(tmp_path: Path, cli):
    """The user story: ship a cell in a package, add conf/cell/NAME.yaml, run ``cell=NAME``."""
    plugin = write_plugin(tmp_path / "site")
    conf = tmp_path / "myconf" / "cell"
    conf.mkdir(parents=True)
    (conf / "ep_mgu.yaml").write_text(textwrap.dedent("""\
        # a cell shipped by rnnsearch_test_plugin
        name: ep_mgu
        gate_bias: 0.5
    """))
    res = cli("cell=ep_mgu", f"hydra.searchpath=[file://{tmp_path / 'myconf'}]", *TINY,
              env={"PYTHONPATH": str(plugin), "PYTHONWARNINGS": "ignore"})
    assert res.returncode == 0, res.stderr
    assert "cell-by-cell" in res.stdout and "final metrics" in res.stdout
    assert "test/mse" in res.stdout


def test_an_entry_point_to_something_that_is_not_a_cell_is_skipped_with_a_warning(tmp_path, monkeypatch,
                                                                                   isolated_cells):
    # decorated classes were checked, but an entry point naming an object was registered unchecked
    (tmp_path / "rnnsearch_badplugin.py").write_text("class NotACell:\n    pass\n")
    info = tmp_path / "rnnsearch_badplugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: rnnsearch_badplugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[rnnsearch.cells]\nnot_a_cell = rnnsearch_badplugin:NotACell\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(CELLS, "_plugins_loaded", False)
    try:
        with pytest.warns(UserWarning, match=r"plug-in 'not_a_cell' .* is not registered: .*derived from rnnsearch.RNNCell"):
            names = list_cells()
        assert "not_a_cell" not in names and "lstm" in names
    finally:
        sys.modules.pop("rnnsearch_badplugin", None)
