"""The paper-scale benchmark, run at its reduced sizes in a fresh Python."""

import json
import math
import pathlib
import subprocess

import jax
import pytest

import revdeq

from .helpers import run_file


SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "paper_scale.py"


def run(*args: str) -> subprocess.CompletedProcess:
    return run_file(SCRIPT, *args, timeout=1200)


def reduced_parameter_counts() -> dict[str, int]:
    """The parameters of the reduced models, built here from the documented sizes:
    two image stages of 8 and 16 channels; width 32, 4 heads, sequences of 32 tokens
    and a vocabulary of 256; 4 reversible steps, so 9 evaluations per solve."""
    key = jax.random.key(0)
    trunk = dict(channels=(8, 16), width_expansions=(1, 3), group_size=4)
    implicit = revdeq.nn.ImplicitResNet((3, 32, 32), 10, key=key, **trunk)
    explicit = revdeq.nn.ExplicitResNet(
        (3, 32, 32), 10, key=key, num_layers=(9, 9), **trunk
    )
    sizes = dict(vocab_size=256, seq_len=32, dim=32, num_heads=4, mlp_depth=2)
    deq = revdeq.nn.DEQLanguageModel(**sizes, key=key)
    deq_transformer = revdeq.nn.DEQLanguageModel(
        **sizes, cell=revdeq.nn.DEQTransformerCell, key=key
    )
    transformer = revdeq.nn.ExplicitLanguageModel(**sizes, num_layers=9, key=key)
    count = revdeq.nn.count_parameters
    return {
        "image/revdeq": count(implicit),
        "image/deq": count(implicit),
        "image/explicit": count(explicit),
        "language/revdeq": count(deq),
        "language/deq": count(deq_transformer),
        "language/explicit": count(transformer),
    }


@pytest.mark.slow  # several minutes on 2 cores: six training steps compile
@pytest.mark.standard_promotion  # optax's Adam, in the script
def test_reduced_run(tmp_path):
    out = tmp_path / "paper_scale.json"
    result = run("--reduced", "--out", str(out))
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["reduced"] is True
    rows = report["configurations"]
    counts = reduced_parameter_counts()
    assert set(rows) == set(counts)
    for name, row in rows.items():
        assert row["num_params"] == counts[name], name
        assert len(row["step_seconds"]) == 2
        times = [row["seconds_per_step"], *row["step_seconds"]]
        assert all(0 < t < math.inf for t in times), name
        per_example = 1 if name.startswith("image") else 32
        assert row["examples_per_second"] == pytest.approx(
            2 * per_example / row["seconds_per_step"]
        )
        assert 0 < row["compiled_memory_bytes"] < math.inf
        assert math.isfinite(row["loss"])
        assert row["device"] == jax.devices()[0].device_kind
        assert row["jax_version"] == jax.__version__
    assert result.stdout.count("\n| image/") == 3


def test_bad_batch_size_names_the_flag():
    result = run("--reduced", "--batch-size", "0")
    assert result.returncode == 2
    assert "--batch-size must be at least 1" in result.stderr
