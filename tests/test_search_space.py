"""The search space (Hydra sweep syntax → Optuna), conditional composition, and settings — no training."""

from __future__ import annotations

import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from rnnsearch.cli import rewrite_argv
from rnnsearch.errors import ConfigError
from rnnsearch.search.compose import compose_trial, config_groups, load_group_options, override_list, replay
from rnnsearch.search.conditions import applies
from rnnsearch.search.run import _cli_wins
from rnnsearch.search.settings import SweepSettings
from rnnsearch.search.space import Param, flatten, parse_param, parse_space
from rnnsearch.search.study import grid_space, objectives_and_directions


@pytest.mark.parametrize("text, dist", [
    ("choice(rnn, lstm, gru)", CategoricalDistribution(["rnn", "lstm", "gru"])),
    ("rnn,gru", CategoricalDistribution(["rnn", "gru"])),
    ("choice(true, false)", CategoricalDistribution([True, False])),
    ("range(1, 3)", IntDistribution(1, 2)),  # half-open, like Python's and Hydra's range
    ("range(32, 129, 32)", IntDistribution(32, 128, step=32)),
    ("range(0.1, 0.5, 0.1)", FloatDistribution(0.1, 0.4, step=0.1)),
    ("interval(0, 2)", FloatDistribution(0.0, 2.0)),
    ("tag(log, interval(1e-3, 3e-2))", FloatDistribution(1e-3, 3e-2, log=True)),
    ("tag(int, interval(1, 4))", IntDistribution(1, 4)),
    ("tag(log, range(1, 9))", IntDistribution(1, 8, log=True)),
])
def test_hydra_sweep_syntax_becomes_optuna_distributions(text: str, dist: object) -> None:
    assert parse_param("k", text).dist == dist


@pytest.mark.parametrize("raw, value", [("never", "never"), (3, 3), ("0.5", 0.5), ("null", None), (True, True)])
def test_plain_values_are_fixed(raw: object, value: object) -> None:
    p = parse_param("k", raw)
    assert p.fixed and p.value == value


@pytest.mark.parametrize("text, words", [
    ("choice(a", "cannot parse"),
    ("tag(log, interval(0, 1))", "low end must be > 0"),
    ("tag(fast, interval(1, 2))", "unknown tag"),
    ("range(3, 1)", "empty"),
    ("choice([a], [b])", "numbers, strings or booleans"),
])
def test_bad_spaces_name_the_key_and_the_problem(text: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words) as err:
        parse_param("model.x", text)
    assert "model.x" in str(err.value)


def test_nested_and_dotted_keys_flatten_alike_and_group_leaf_means_name() -> None:
    assert flatten({"model": {"hidden_size": 1, "wrappers": [{"name": "x"}]}, "optim.lr": 2}) == [
        ("model.hidden_size", 1), ("model.wrappers.0.name", "x"), ("optim.lr", 2)]
    assert [p.key for p in parse_space({"cell": "choice(rnn, gru)"}, groups=["cell"])] == ["cell.name"]


GROUPS = ["cell", "model", "task", "optim"]


@pytest.fixture(scope="module")
def base(request: pytest.FixtureRequest) -> dict:
    from omegaconf import OmegaConf

    from conftest import compose_config

    cfg = OmegaConf.to_container(compose_config(["tracking=none", "cell.activation=relu"]), resolve=True)
    return cfg


@pytest.fixture(scope="module")
def groups() -> tuple[list[str], dict]:
    names = config_groups(GROUPS)
    return names, load_group_options({"cell": ["rnn", "lstm", "gru"]})


SPACE = {
    "cell": {"name": "choice(rnn, lstm, gru)", "forget_bias": "interval(0, 2)"},
    "model": {"num_layers": "range(1, 4)", "merge_mode": "choice(concat, sum)",
              "layers": {"{k}": {"hidden_size": "choice(8, 16)"}, "2": {"cell": {"forget_bias": "interval(0, 1)"}}},
              "wrappers": [{"name": "choice(none, dropout, zoneout)", "output_keep_prob": "interval(0.5, 1)"}]},
    "optim": {"lr": "tag(log, interval(1e-4, 1e-1))"},
}


def _pick(values: dict) -> object:
    """A suggest that takes each key's value from ``values`` (else the first choice / the low end)."""
    def suggest(key: str, dist: object) -> object:
        if key in values:
            return values[key]
        return dist.choices[0] if hasattr(dist, "choices") else dist.low
    return suggest


@pytest.mark.parametrize("cell, layers, wrapper, bi", [
    ("lstm", 3, "dropout", True), ("gru", 1, "none", False), ("rnn", 2, "zoneout", True), ("lstm", 2, "none", False)])
def test_conditional_params_are_sampled_only_where_they_apply(base: dict, groups: tuple, cell: str, layers: int,
                                                             wrapper: str, bi: bool) -> None:
    names, options = groups
    space = parse_space(SPACE, names)
    comp = compose_trial(base, space, _pick({"cell.name": cell, "model.num_layers": layers,
                                             "model.wrappers.0.name": wrapper}), options,
                         fixed=[Param("model.bidirectional", None, bi)])
    p = comp.params
    assert ("cell.forget_bias" in p) == (cell == "lstm")  # rnn and gru take no forget_bias
    assert [k for k in p if k.endswith(".hidden_size")] == [f"model.layers.{k}.hidden_size" for k in range(layers)]
    assert ("model.layers.2.cell.forget_bias" in p) == (layers == 3 and cell == "lstm")
    assert ("model.wrappers.0.output_keep_prob" in p) == (wrapper == "dropout")  # zoneout has no keep prob
    assert ("model.merge_mode" in p) == bi
    cfg = comp.cfg
    assert cfg["cell"]["name"] == cell and set(cfg["model"]["layers"]) == set(range(layers)) | (
        {2} if layers == 3 else set())
    assert cfg["model"]["wrappers"] == ([] if wrapper == "none" else [
        {"name": wrapper, **({"output_keep_prob": 0.5} if wrapper == "dropout" else {})}])
    # a switched cell comes from its own conf file, with the user's edits of the base cell carried over
    # where it has the key (as Hydra's `cell=gru cell.activation=relu` would)
    assert cfg["cell"]["activation"] == "relu"
    if cell == "gru":
        assert cfg["cell"]["reset_after"] is True and "forget_bias" not in cfg["cell"]


def test_composed_trial_builds_and_its_overrides_recompose_it(base: dict, groups: tuple) -> None:
    from omegaconf import OmegaConf

    from conftest import compose_config
    from rnnsearch.search.objective import count_params

    names, options = groups
    space = parse_space(SPACE, names)
    comp = compose_trial(base, space, _pick({"cell.name": "gru", "model.num_layers": 2,
                                             "model.wrappers.0.name": "dropout"}), options)
    assert count_params(comp.cfg) > 0
    reference = compose_trial(base, [], replay({}), options, [Param("cell.name", None, "gru")]).cfg
    overrides = override_list(comp, names, reference)
    assert "cell=gru" in overrides and any(o.startswith("model.wrappers=[{name:dropout") for o in overrides)
    again = OmegaConf.to_container(compose_config(["tracking=none", "cell.activation=relu", *overrides]), resolve=True)
    assert again["model"] == comp.cfg["model"] and again["cell"] == comp.cfg["cell"]
    assert again["optim"] == comp.cfg["optim"]


def test_applies_checks_the_registry_for_options() -> None:
    cfg = {"cell": {"name": "lstm"}, "model": {"num_layers": 1, "wrappers": [{"name": "dropout"}]},
           "optim": {"name": "sgd"}}
    assert applies("cell.forget_bias", cfg) and applies("cell.use_peepholes", cfg)
    assert not applies("cell.reset_after", cfg)
    assert applies("optim.momentum", cfg) and not applies("optim.betas", cfg)
    assert applies("model.wrappers.0.state_keep_prob", cfg) and not applies("model.wrappers.1.output_keep_prob", cfg)
    assert not applies("model.layers.1.hidden_size", cfg)


def test_grid_space_expands_layers_and_rejects_continuous() -> None:
    space = parse_space({"model": {"layers": {"{k}": {"hidden_size": "choice(8, 16)"}}, "num_layers": "range(1, 3)"}})
    assert grid_space(space, 2) == {"model.layers.0.hidden_size": [8, 16], "model.layers.1.hidden_size": [8, 16],
                                    "model.num_layers": [1, 2]}
    with pytest.raises(ConfigError, match="continuous"):
        grid_space(parse_space({"optim": {"lr": "interval(0.1, 1)"}}), 1)


def test_settings_errors_list_the_valid_choices() -> None:
    with pytest.raises(ConfigError, match="valid choices: cmaes, gp, grid, nsga2, random, tpe"):
        SweepSettings.from_config({"sampler": "bayes"})
    with pytest.raises(ConfigError, match="Unknown sweep setting"):
        SweepSettings.from_config({"n_trial": 3})
    with pytest.raises(ConfigError, match="workers"):
        SweepSettings.from_config({"workers": 0})


def test_objective_directions() -> None:
    s = SweepSettings(objectives=["best/val/mse", "params", "epoch_seconds"])
    assert objectives_and_directions(s, "mse", "minimize")[1] == ["minimize"] * 3
    assert objectives_and_directions(SweepSettings(), "accuracy", "maximize") == (["best/val/accuracy"], ["maximize"])
    with pytest.raises(ConfigError, match="sweep.directions"):
        objectives_and_directions(SweepSettings(objectives=["val/weird"]), "mse", "minimize")


def test_cli_quotes_search_spaces_so_hydra_keeps_them() -> None:
    assert rewrite_argv(["+sweep", "sweep.params.model.hidden_size=choice(32,64)", "+sweep.params.x=range(1,3)",
                         "sweep.n_trials=3", "sweep.params.y='interval(0,1)'"]) == [
        "+sweep=default", "sweep.params.model.hidden_size='choice(32,64)'", "+sweep.params.x='range(1,3)'",
        "sweep.n_trials=3", "sweep.params.y='interval(0,1)'"]


def test_command_line_keys_win_over_sweep_overrides() -> None:
    fixed = parse_space({"task": {"seq_len": 20, "train_size": 1000}, "train": {"epochs": 6}})
    kept, dropped = _cli_wins(fixed, ["task.seq_len=100", "+sweep=default", "sweep.n_trials=3", "cell=gru"])
    assert [p.key for p in kept] == ["task.train_size", "train.epochs"] and dropped == ["task.seq_len=20"]
    kept, dropped = _cli_wins(fixed, ["task=copy"])
    assert [p.key for p in kept] == ["train.epochs"] and len(dropped) == 2


@pytest.mark.parametrize("sampler", ["tpe", "random", "gp", "cmaes", "grid", "nsga2"])
def test_every_sampler_drives_the_conditional_space(sampler: str) -> None:
    import optuna

    from rnnsearch.search.objective import suggest_with
    from rnnsearch.search.study import make_pruner, make_sampler

    if sampler == "cmaes":
        pytest.importorskip("cmaes")
    space = parse_space({"cell": {"name": "choice(rnn, lstm)", "forget_bias": "choice(0.0, 1.0)"},
                         "model": {"hidden_size": "range(4, 9, 4)"}})
    settings = SweepSettings(sampler=sampler, sampler_options={"n_startup_trials": 2} if sampler in ("tpe", "gp")
                             else {})
    study = optuna.create_study(sampler=make_sampler(settings, space, 0, 6, 1), pruner=make_pruner(settings, 3))
    base = {"cell": {"name": "rnn"}, "model": {"num_layers": 1}}

    def objective(trial: optuna.Trial) -> float:
        comp = compose_trial(base, space, suggest_with(trial), {})
        return comp.cfg["model"]["hidden_size"] + (comp.cfg["cell"].get("forget_bias") or 0.0)

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study.optimize(objective, n_trials=6)
    assert len(study.trials) == 6
    for t in study.trials:
        assert ("cell.forget_bias" in t.params) == (t.params["cell.name"] == "lstm")


@pytest.mark.parametrize("pruner", ["median", "hyperband", "successive_halving", "none"])
def test_pruner_factory(pruner: str) -> None:
    import optuna

    from rnnsearch.search.study import make_pruner

    p = make_pruner(SweepSettings(pruner=pruner), epochs=6)
    assert isinstance(p, {"median": optuna.pruners.MedianPruner, "hyperband": optuna.pruners.HyperbandPruner,
                          "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
                          "none": optuna.pruners.NopPruner}[pruner])
    with pytest.raises(ConfigError, match="pruner_options"):
        make_pruner(SweepSettings(pruner=pruner, pruner_options={"bogus": 1}), epochs=6)
