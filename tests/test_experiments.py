"""Smoke tests of the experiment scripts: each trains tiny models for one epoch on a
small slice of real data and writes complete reports."""

import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import revdeq


EXPERIMENTS = pathlib.Path(__file__).resolve().parents[1] / "experiments"
TINY = ["--epochs", "1", "--steps", "1", "--batch-size", "32"]


@pytest.fixture
def scripts(monkeypatch):
    """The experiment scripts, importable as modules."""
    monkeypatch.syspath_prepend(str(EXPERIMENTS))
    import image_classification
    import language_model

    return {"image": image_classification, "language": language_model}


def check_reports(
    out: pathlib.Path, models, keys, runs: str = "", yardsticks=()
) -> None:
    """`runs`: the directory of each model's run that holds its metrics;
    `yardsticks`: rows that are not trained models, e.g. n-grams."""
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {*models, *yardsticks}
    for model in models:
        assert set(keys) <= set(results[model])
        assert all(math.isfinite(results[model][key]) for key in keys)
        assert (out / model / runs / "metrics.jsonl").stat().st_size > 0
    table = (out / "results.md").read_text()
    assert table.startswith("| model |")
    rows = {line.split(" | ")[0].removeprefix("| ") for line in table.splitlines()[2:]}
    assert rows == set(results)
    assert (out / "learning_curves.png").stat().st_size > 0


TINY_IMAGES = ["--channels", "4", "--group-size", "2", "--limit-test", "10"]


@pytest.mark.slow  # about 4 minutes: seven models compile and train
@pytest.mark.standard_promotion  # optax's Adam
def test_image_comparison_trains_every_model(scripts, tmp_path):
    """Every model of the comparison, at two DEQ budgets, trains one step on a few
    images, and the reports are complete."""
    results = scripts["image"].main(
        [*TINY, *TINY_IMAGES, "--batch-size", "8", "--limit-train", "8",
         "--model", "all", "--deq-evals", "3", "5", "--out", str(tmp_path)]
    )  # fmt: skip
    models = ["revdeq", "deq-3", "deq-5", "deq-noreg", "phantom", "explicit",
              "explicit-1"]  # fmt: skip
    keys = ["test_accuracy", "images_per_second", "wall_time_s", "nfe_forward",
            "nfe_backward", "peak_memory_bytes", "num_params"]  # fmt: skip
    check_reports(tmp_path, models, keys, runs="seed-0")
    assert (tmp_path / "accuracy_vs_evals.png").stat().st_size > 0
    # One stage, k = 1: three evaluations per solve. The deq models' Jacobian penalty
    # evaluates the cell once more, and their fixed-point correction twice.
    evals = {model: results[model]["nfe_forward"] for model in models}
    assert evals == {"revdeq": 3, "deq-3": 6, "deq-5": 8, "deq-noreg": 3,
                     "phantom": 3, "explicit": 3, "explicit-1": 1}  # fmt: skip
    assert results["revdeq"]["nfe_backward"] == 2  # Two per reversible step.
    for model in ("revdeq", "deq-3", "deq-5", "deq-noreg", "phantom"):
        assert 0 <= results[model]["forward_residual"] < math.inf
    for model in ("deq-3", "deq-5", "deq-noreg"):
        assert 0 <= results[model]["backward_residual"] < math.inf
    params = {model: results[model]["num_params"] for model in models}
    assert params["explicit-1"] == params["revdeq"] == params["deq-noreg"]
    # Weight normalisation adds a gain per output channel of each convolution.
    assert params["deq-3"] == params["deq-noreg"] + 4 + 4


@pytest.mark.slow  # about 40 s: compiles a training step
@pytest.mark.standard_promotion  # optax's Adam
def test_image_revdeq_loss_falls(scripts):
    """The RevDEQ ResNet fits a tiny fixed batch: its loss falls within a few steps."""
    module = scripts["image"]
    args = module.parse_args(["--steps", "2", "--channels", "4", "--group-size", "2"])
    model = module.build_model(args, (1, 8, 8), 3, "revdeq", jax.random.key(0))
    images = jax.random.uniform(jax.random.key(1), (6, 8, 8, 1))
    batch = (images, jnp.arange(6) % 3)
    loss_fn = module.make_loss()
    optimiser = optax.adam(1e-2)
    opt_state = revdeq.train.init_optimiser(optimiser, model)
    step = revdeq.train.make_step(loss_fn, optimiser)
    losses = []
    for i in range(8):
        model, opt_state, metrics = step(model, opt_state, batch, jax.random.key(i))
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.9 * losses[0], losses


@pytest.mark.slow  # about 30 s: two training runs; keeps the default run's margin
@pytest.mark.standard_promotion  # optax's Adam
def test_image_classification_resume(scripts, tmp_path):
    args = [*TINY, *TINY_IMAGES, "--limit-train", "64", "--out", str(tmp_path)]
    first = scripts["image"].main(args)
    resumed = scripts["image"].main([*args, "--resume"])
    assert resumed["revdeq"]["test_accuracy"] == first["revdeq"]["test_accuracy"]


@pytest.mark.slow  # about 4 minutes: seven models compile and train
@pytest.mark.standard_promotion  # optax's Adam
def test_language_comparison_trains_every_model(scripts, tmp_path):
    """Every model of the comparison, at two DEQ budgets, trains on a tiny slice:
    its loss falls, and the reports are complete."""
    results = scripts["language"].main(
        ["--epochs", "1", "--steps", "1", "--batch-size", "4", "--lr", "1e-2",
         "--model", "all", "--deq-evals", "3", "5", "--limit-train", "48",
         "--limit-test", "8", "--max-bytes", "100000", "--dim", "16",
         "--num-heads", "2", "--seq-len", "16", "--out", str(tmp_path)]
    )  # fmt: skip
    models = ["revdeq", "deq-3", "deq-5", "deq-noreg", "phantom", "explicit",
              "explicit-1"]  # fmt: skip
    keys = ["test_bits_per_token", "validation_bits_per_token", "tokens_per_second",
            "wall_time_s", "nfe_forward", "nfe_backward", "peak_memory_bytes",
            "num_params"]  # fmt: skip
    ngrams = ["1-gram", "2-gram", "3-gram", "4-gram"]
    check_reports(tmp_path, models, keys, runs="seed-0", yardsticks=ngrams)
    assert (tmp_path / "bits_vs_evals.png").stat().st_size > 0
    for ngram in ngrams:
        assert set(results[ngram]) == {
            "validation_bits_per_token",
            "test_bits_per_token",
        }
        assert all(0 < bits < 20 for bits in results[ngram].values())
    for model in models:
        records = revdeq.train.read_metrics(
            tmp_path / model / "seed-0" / "metrics.jsonl"
        )
        losses = [r["loss"] for r in records if r["split"] == "train"]
        assert losses[-1] < losses[0], model
    # The Jacobian penalty evaluates the cell once more.
    evals = {model: results[model]["nfe_forward"] for model in models}
    assert evals == {"revdeq": 3, "deq-3": 4, "deq-5": 6, "deq-noreg": 3,
                     "phantom": 3, "explicit": 3, "explicit-1": 1}  # fmt: skip
    # Relative to the cotangent; above 1 where the cell expands it.
    for model in ("deq-3", "deq-5", "deq-noreg"):
        assert 0 < results[model]["backward_residual"] < math.inf
    # Every equilibrium model reports how far its forward solve is from a fixed
    # point; the explicit ones have none.
    for model in ("revdeq", "deq-3", "deq-5", "deq-noreg", "phantom"):
        assert 0 < results[model]["forward_residual"] < math.inf, model
    assert "forward_residual" not in results["explicit"]
    header = (tmp_path / "results.md").read_text().splitlines()[0]
    assert {"forward_residual", "backward_residual"} <= set(header.split(" | "))
    deq_cell = "DEQTransformerCell + weight norm"
    cells = {model: results[model]["cell"] for model in models}
    assert cells == {"revdeq": "TransformerCell", "deq-3": deq_cell,
                     "deq-5": deq_cell, "deq-noreg": "DEQTransformerCell",
                     "phantom": deq_cell, "explicit": "3 × TransformerCell",
                     "explicit-1": "1 × TransformerCell"}  # fmt: skip
    explicit, deq = (results[m]["num_params"] for m in ("explicit-1", "deq-noreg"))
    assert explicit == deq


def test_language_yardstick_rows(scripts, tmp_path):
    """The n-gram rows join the table and the plot of the trained models, with the
    models' columns empty."""
    import _common

    module = scripts["language"]
    tokens = np.frombuffer(b"def f(x):\n    return x + 1\n" * 40, np.uint8)
    windows = revdeq.data.sequence_windows(tokens, 15)
    rows = module.ngram_rows(windows, {"validation": windows, "test": windows}, 256)
    assert list(rows) == ["1-gram", "2-gram", "3-gram", "4-gram"]
    bits = [row["test_bits_per_token"] for row in rows.values()]
    assert bits[1] < bits[0] < 8  # Below uniform; the previous byte helps.
    model = {"test_bits_per_token": 5.0, "nfe_forward": 3}
    results = {"revdeq": model, **rows}
    curve = [{"step": 0, "loss": 3.0}, {"step": 1, "loss": 2.0}]
    table = _common.write_reports(tmp_path, results, runs={"revdeq": curve})
    assert "| 4-gram | " + f"{bits[-1]:.4g} | – | " in table
    assert json.loads((tmp_path / "results.json").read_text()) == results
    _common.plot_against_evals(results, "test_bits_per_token", tmp_path / "b.png")
    assert (tmp_path / "b.png").stat().st_size > 0


@pytest.mark.parametrize("script", ["image_classification", "language_model", "demo"])
def test_help(script, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(EXPERIMENTS))
    module = __import__(script)
    parse = getattr(module, "parse_args", module.main)
    with pytest.raises(SystemExit) as exit_info:
        parse(["--help"])
    assert exit_info.value.code == 0
    assert "--model" in capsys.readouterr().out


def test_paper_image_model(scripts):
    module = scripts["image"]
    args = module.parse_args(["--paper", "--model", "revdeq"])
    assert args.dataset == "cifar10"
    model = module.build_model(args, (3, 32, 32), 10, "revdeq", jax.random.key(0))
    assert isinstance(model, revdeq.nn.ImplicitResNet)
    assert revdeq.nn.count_parameters(model) == 10_319_754
