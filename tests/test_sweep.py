"""Sweeps on a local Ray: a 2x2 grid, skipping finished runs, a failing run, bad sweep files."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from maestro_fl.config import ConfigError
from strategies.cli import main
from strategies.sweeps.sweep import load_sweep, run_sweep
from strategies.sweeps.tuning_protocol import is_protocol, load_protocol

BASE = """
[base]
model = "mlp"
num_clients = 4
clients_per_round = 4
rounds = 1
local_epochs = 1
partition = "iid"
tier_shares = [0.5, 0.5]
tier_fractions = [0.25, 1.0]
"""


def write(tmp_path: Path, grid: str, extra: str = "", name: str = "s.toml") -> Path:
    path = tmp_path / name
    path.write_text(f'[sweep]\nname = "t"\nout_dir = "{tmp_path / "out"}"\n{extra}\n{BASE}\n[grid]\n{grid}\n')
    return path


@pytest.mark.slow
def test_grid_runs_skips_finished_and_records_failures(shared_ray: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty"  # passes the config check (the folder exists), holds no MNIST: fails at run time
    empty.mkdir()
    spec = write(tmp_path, f'seed = [0, 1]\nalpha = [0.5, 1.0]\ndataset = ["digits", "mnist"]\ndata_root = ["{empty}"]')
    assert main(["sweep", str(spec)]) == 1  # failed runs: exit 1, naming them
    results = pd.read_csv(tmp_path / "out" / "t" / "results.csv")
    runs = results.drop_duplicates("run")
    assert len(runs) == 8
    failed = runs[runs["status"] == "failed"]
    assert len(failed) == 4 and failed["dataset"].eq("mnist").all()
    ok = results[results["status"] == "ok"]
    assert set(ok["tier"]) == {0, 1} and ok["accuracy"].between(0, 1).all()
    for run in failed["run"]:
        assert (tmp_path / "out" / "t" / run / "error.txt").read_text().strip()
    captured = capsys.readouterr()
    out = captured.out
    assert "[8/8 done, 0 running, 4 failed]" in out and "FAILED" in out  # runs done, running, failed
    assert "4 run(s) failed: " in captured.err and "dataset=mnist" in captured.err

    # again: the four finished runs are skipped, the four failed ones are tried again
    assert main(["sweep", str(spec)]) == 1
    out = capsys.readouterr().out
    assert "4 finished already" in out and "[4/4 done, 0 running, 4 failed]" in out
    again = pd.read_csv(tmp_path / "out" / "t" / "results.csv")
    pd.testing.assert_frame_equal(again[again["status"] == "ok"].reset_index(drop=True), ok.reset_index(drop=True))

    # the same sweep with other base settings must not reuse those runs: refused before anything runs
    spec.write_text(spec.read_text().replace("rounds = 1", "rounds = 2"))
    with pytest.raises(ConfigError, match=r"holds a run with other settings \(rounds: 1 there, 2 now\)"):
        run_sweep(spec)


@pytest.mark.parametrize(
    "grid,extra,message",
    [
        ('strategy = ["fedlod", "fedmagic"]', "", "strategy must be one of"),
        ("", "", r"\[grid\] is empty"),
        ("seed = []", "", "non-empty list"),
        ("sead = [0]", "", "unknown config key 'sead'"),
        ("seed = [0]", "workers = 3", r"\[sweep\]: unknown key"),
    ],
)
def test_bad_sweep_files_fail_before_anything_runs(tmp_path: Path, grid: str, extra: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_sweep(write(tmp_path, grid, extra))
    assert not (tmp_path / "out").exists()


def test_methods_cross_the_grid_and_bad_methods_fail(tmp_path: Path) -> None:
    spec = write(tmp_path, "seed = [0, 1]\n[methods.fedlod]\n[methods.dense]\nstrategy = \"fedavg_dense\"\n")
    sweep = load_sweep(spec)
    assert [name for name, _, _ in sweep.runs] == [
        "method=fedlod,seed=0", "method=fedlod,seed=1", "method=dense,seed=0", "method=dense,seed=1"
    ]
    assert [cfg.strategy for _, _, cfg in sweep.runs] == ["fedlod", "fedlod", "fedavg_dense", "fedavg_dense"]
    bad = write(tmp_path, "seed = [0]\n[methods.x]\nstrategy = \"heterofl2\"\n", name="bad.toml")
    with pytest.raises(ConfigError, match="run method=x,seed=0: strategy must be one of"):
        load_sweep(bad)


@pytest.mark.slow
def test_compare_runs_every_method_on_the_same_seeds(shared_ray: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from strategies.sweeps.compare import METHODS, run_compare

    overrides = [line.replace(" ", "").replace('"', "") for line in BASE.strip().splitlines()[1:]]
    overrides = [o.replace("[", "").replace("]", "") for o in overrides]
    root = run_compare(overrides, seeds=(0,), out_dir=str(tmp_path))
    table = pd.read_csv(root / "compare.csv")
    assert list(dict.fromkeys(table["method"])) == list(METHODS)
    printed = capsys.readouterr().out
    assert "fedavg_exclusive" in printed and "(one run)" in printed and "±" not in printed  # one seed: no spread
    dense = table[table["method"] == "fedavg_dense"]
    assert (dense["params"] == dense["params"].iloc[0]).all()  # everyone trains the same dense model
    # FedLoD deployed at every width baseline's tier footprint: never larger, in params or MACs
    matched = pd.read_csv(root / "matched.csv")
    assert set(matched["method"]) == {"heterofl", "heterofl_masked", "fjord", "fjord_kd"}
    assert (matched["fedlod_params"] <= matched["params"]).all() and (matched["fedlod_macs"] <= matched["macs"]).all()
    assert "FedLoD's global model deployed" in printed


@pytest.mark.slow
def test_compare_takes_a_subset_of_methods_and_seeds(shared_ray: None, tmp_path: Path) -> None:
    from maestro_fl.config import ConfigError
    from strategies.sweeps.compare import run_compare

    overrides = [line.replace(" ", "").replace('"', "") for line in BASE.strip().splitlines()[1:]]
    overrides = [o.replace("[", "").replace("]", "") for o in overrides]
    root = run_compare(overrides + ["methods=fedlod,fjord", "seeds=3"], out_dir=str(tmp_path))
    results = pd.read_csv(root / "results.csv")
    assert set(results["method"]) == {"fedlod", "fjord"} and set(results["seed"]) == {3}
    assert (root / "matched.csv").exists()
    for bad in (["methods=fedlod,nope"], ["methods="], ["seeds=a"]):
        with pytest.raises(ConfigError, match="methods must be|seeds must be"):
            run_compare(overrides + bad, out_dir=str(tmp_path))


def stand_in_play(path: Path, roles: int = 24) -> Path:
    """A file in the tinyshakespeare format with ``roles`` roles of a few thousand characters each."""
    words = ("thou", "art", "the", "king", "of", "night", "and", "my", "lord", "speak", "now", "hence")
    text = [f"ROLE {chr(65 + i)}:\n" + " ".join(words[(i + j) % len(words)] for j in range(600)) + "\n" for i in range(roles)]
    path.write_text("\n".join(text))
    return path


def test_shipped_sweep_files_are_valid(tmp_path: Path) -> None:
    """The sweep files in benchmarks/sweeps/ parse and every run's config validates (nothing runs).

    A file reading a user's copy of a dataset (Shakespeare's ``data_root``) that this checkout lacks is
    checked against a stand-in file of the same format, as the tests never need the real one.
    """
    root = Path(__file__).parents[1]
    files = sorted((root / "benchmarks" / "sweeps").glob("*.toml"))
    assert files
    for path in files:
        text = path.read_text()
        for line in text.splitlines():
            if line.startswith("data_root = ") and not (root / line.split('"')[1]).exists():
                text = text.replace(line, f'data_root = "{stand_in_play(tmp_path / "input.txt")}"')
        copy = tmp_path / path.name
        copy.write_text(text)
        sweep = load_protocol(copy)[0] if is_protocol(copy) else load_sweep(copy)
        assert len(sweep.runs) >= 3 and sweep.gpus_per_run >= 0


TWO_METHODS = """
[methods.fedlod]
strategy = "fedlod"

[methods.fjord]
strategy = "fjord"
"""


@pytest.mark.slow
def test_the_protocol_tunes_on_validation_selects_per_method_and_reuses_the_tuning_run(shared_ray: None,
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = write(tmp_path, "lr = [0.01, 0.3]", extra=TWO_METHODS, name="p.toml")
    spec.write_text(spec.read_text() + "\n[protocol]\ntune_seed = 0\nseeds = [0, 1]\n")
    assert main(["sweep", str(spec)]) == 0
    root = tmp_path / "out" / "t"
    tune = pd.read_csv(root / "tune" / "results.csv")
    assert len(tune.drop_duplicates("run")) == 4  # 2 methods x 2 learning rates, at the tuning seed
    selected = pd.read_csv(root / "selected.csv").set_index("method")
    for method, runs in tune.groupby("method"):  # the best mean validation accuracy over tiers, per method
        scores = runs.groupby("run")["val_accuracy"].mean()
        assert selected.loc[method, "run"] == scores.idxmax()
        assert selected.loc[method, "lr"] == runs[runs["run"] == scores.idxmax()]["lr"].iloc[0]
    final = pd.read_csv(root / "final" / "results.csv")
    comparison = pd.read_csv(root / "comparison.csv")
    assert sorted(final.drop_duplicates("run")["run"]) == [
        "method=fedlod,seed=0", "method=fedlod,seed=1", "method=fjord,seed=0", "method=fjord,seed=1"]
    for method in ("fedlod", "fjord"):  # the seed-0 final run is the tuning run, copied
        copied = (root / "final" / f"method={method},seed=0" / "tiers.csv").read_text()
        assert copied == (root / "tune" / selected.loc[method, "run"] / "tiers.csv").read_text()
        assert (comparison[comparison["method"] == method]["lr"] == selected.loc[method, "lr"]).all()
    assert set(comparison["seeds"]) == {2} and set(comparison["method"]) == {"fedlod", "fjord"}
    assert (comparison["unaffordable"] == 0).all()
    matched = pd.read_csv(root / "matched.csv")  # FedLoD cut at FjORD's tiers: never larger
    assert set(matched["method"]) == {"fjord"}
    assert (matched["fedlod_params"] <= matched["params"]).all() and (matched["fedlod_macs"] <= matched["macs"]).all()
    mean = final[(final["method"] == "fjord") & (final["tier"] == 0)]["accuracy"].mean()
    assert comparison.query("method == 'fjord' and tier == 0")["acc_mean"].iloc[0] == pytest.approx(mean)
    # run again after a final run's selection changed (here: its stored lr edited): only that run is made
    # again, the old one kept aside; nothing else reruns
    stale = root / "final" / "method=fjord,seed=1"
    config = json.loads((stale / "config.json").read_text())
    (stale / "config.json").write_text(json.dumps(config | {"lr": 0.777}))
    capsys.readouterr()
    assert main(["sweep", str(spec)]) == 0
    out = capsys.readouterr().out
    assert "4 runs, 4 finished already" in out and "4 runs, 3 finished already" in out
    kept = list((root / "final" / "superseded").iterdir())
    assert len(kept) == 1 and json.loads((kept[0] / "config.json").read_text())["lr"] == 0.777
    assert json.loads((stale / "config.json").read_text())["lr"] == selected.loc["fjord", "lr"]


def test_a_dotted_method_name_is_named_in_the_error(tmp_path: Path) -> None:
    spec = write(tmp_path, "seed = [0]", extra='[methods.rank_0.5]\nstrategy = "fedlod"\n', name="d.toml")
    with pytest.raises(ConfigError, match=r"\[methods.rank_0.5\]: a method's name cannot contain a dot"):
        load_sweep(spec)


def test_a_protocol_file_sets_seeds_in_its_protocol_table(tmp_path: Path) -> None:
    spec = write(tmp_path, "seed = [0, 1]", name="p.toml")
    spec.write_text(spec.read_text() + "\n[protocol]\nseeds = [0, 1]\n")
    with pytest.raises(ConfigError, match="sets seeds in \\[protocol\\]"):
        load_protocol(spec)
    spec.write_text(spec.read_text().replace("seed = [0, 1]\n\n[protocol]", "lr = [0.1]\n\n[protocol]")
                    .replace("seeds = [0, 1]", "seeds = []"))
    with pytest.raises(ConfigError, match="seeds must be a non-empty list"):
        load_protocol(spec)


def test_a_field_the_method_never_reads_does_not_make_its_stored_run_another_experiment() -> None:
    """A width method ignores how LoD factors start, so a changed ``init`` default keeps its runs; FedLoD's differ."""
    from maestro_fl.config import SimConfig, to_dict
    from maestro_fl.methods import METHODS
    from strategies.sweeps.sweep import differing_fields

    for strategy, differs in [("heterofl", []), ("fjord", []), ("flanc", []), ("fedavg_dense", []),
                              ("fedlod", ["init"]), ("fiarse_rank", ["init"])]:
        stored = json.loads(json.dumps(to_dict(SimConfig(strategy=strategy, init="random"))))
        assert differing_fields(stored, SimConfig(strategy=strategy, init="svd")) == differs, strategy
        assert differing_fields(stored, SimConfig(strategy=strategy, init="random", lr=0.3)) == ["lr"]
    stored = json.loads(json.dumps(to_dict(SimConfig(strategy="fedlod", init="random"))))
    assert differing_fields(stored, SimConfig(strategy="heterofl", init="svd")) == ["init", "strategy"]
    assert "init" not in METHODS["fedlod"].unread_fields


def test_compare_names_a_misspelled_method_and_estimates_read_at_their_precision() -> None:
    from strategies.sweeps.compare import run_compare
    from strategies.sweeps.sweep import format_duration

    with pytest.raises(ConfigError, match="'fjrod': did you mean 'fjord'"):
        run_compare(["methods=fedlod,fjrod"])
    assert [format_duration(s) for s in (42, 600, 7200)] == ["42 s", "10 min", "2.0 h"]


def test_one_run_has_no_spread_and_says_so() -> None:
    from strategies.sweeps.compare import mean_std_text

    assert mean_std_text(0.97771, float("nan")) == "0.9777 (one run)"
    assert mean_std_text(0.97771, 0.0043) == "0.9777 ± 0.0043"
    assert mean_std_text(0.5, 0.0) == "0.5000 ± 0.0000"  # two equal runs: a spread of zero, measured
