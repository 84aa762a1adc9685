"""Smoke tests of the experiment scripts: each trains tiny models for one epoch on a
small slice of real data and writes complete reports."""

import json
import math
import pathlib

import jax
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


def check_reports(out: pathlib.Path, models, keys) -> None:
    results = json.loads((out / "results.json").read_text())
    assert set(results) == set(models)
    for row in results.values():
        assert set(keys) <= set(row)
        assert all(math.isfinite(row[key]) for key in keys)
    for model in models:
        assert (out / model / "metrics.jsonl").stat().st_size > 0
    assert (out / "results.md").read_text().startswith("| model |")
    assert (out / "learning_curves.png").stat().st_size > 0


@pytest.mark.slow  # about 70 s: four models compile and train
@pytest.mark.standard_promotion  # optax's Adam
def test_image_classification(scripts, tmp_path):
    scripts["image"].main(
        [*TINY, "--model", "all", "--limit-train", "256", "--limit-test", "100",
         "--channels", "8", "--width", "16", "--hidden", "16", "--out",
         str(tmp_path)]
    )  # fmt: skip
    keys = ["test_accuracy", "wall_time_s", "nfe_forward", "nfe_backward",
            "peak_memory_bytes", "num_params"]  # fmt: skip
    check_reports(tmp_path, ["revdeq", "deq", "phantom", "explicit"], keys)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["revdeq"]["nfe_backward"] == 2  # Two per reversible step.


@pytest.mark.standard_promotion  # optax's Adam
def test_image_classification_resume(scripts, tmp_path):
    args = [*TINY, "--limit-train", "64", "--limit-test", "50", "--channels", "8",
            "--width", "16", "--hidden", "16", "--out", str(tmp_path)]  # fmt: skip
    first = scripts["image"].main(args)
    resumed = scripts["image"].main([*args, "--resume"])
    assert resumed["revdeq"]["test_accuracy"] == first["revdeq"]["test_accuracy"]


@pytest.mark.standard_promotion  # optax's Adam
def test_language_model(scripts, tmp_path):
    scripts["language"].main(
        [*TINY, "--limit-train", "64", "--limit-test", "32",
         "--max-bytes", "100000", "--dim", "16", "--num-heads", "2", "--seq-len",
         "16", "--out", str(tmp_path)]
    )  # fmt: skip
    keys = ["validation_perplexity", "test_perplexity", "tokens_per_second",
            "wall_time_s", "nfe_forward", "nfe_backward", "peak_memory_bytes",
            "num_params"]  # fmt: skip
    check_reports(tmp_path, ["revdeq"], keys)


@pytest.mark.parametrize("script", ["image_classification", "language_model", "demo"])
def test_help(script, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(EXPERIMENTS))
    module = __import__(script)
    parse = getattr(module, "parse_args", module.main)
    with pytest.raises(SystemExit) as exit_info:
        parse(["--help"])
    assert exit_info.value.code == 0
    assert "--model" in capsys.readouterr().out


def test_language_model_refuses_implicit_deq(scripts, capsys):
    with pytest.raises(SystemExit) as exit_info:
        scripts["language"].parse_args(["--model", "deq"])
    assert exit_info.value.code == 2
    assert "contractive" in capsys.readouterr().err


def test_paper_image_model(scripts):
    module = scripts["image"]
    args = module.parse_args(["--paper", "--model", "revdeq"])
    assert args.dataset == "cifar10"
    model = module.build_model(args, (3, 32, 32), 10, "revdeq", jax.random.key(0))
    assert isinstance(model, revdeq.nn.ImplicitResNet)
    assert revdeq.nn.count_parameters(model) == 10_319_754
