"""`benchmarks/time_breakdown.py`, run as users run it, in a fresh Python."""

import os
import pathlib
import subprocess

import pytest

from .helpers import run_file


SCRIPT = (
    pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "time_breakdown.py"
)


def run(*args: str) -> subprocess.CompletedProcess:
    return run_file(SCRIPT, *args, timeout=600)


@pytest.mark.slow  # three fresh processes each compile six programs
def test_breakdown_table():
    result = run("--steps", "2", "--beta", "0.8")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    table = lines[
        lines.index("beta=0.8, 2 steps; times relative to the store-all step") + 1 :
    ]
    rows = [
        line.split(" | ")
        for line in table
        if line.startswith("| ") and not line.startswith("| process")
    ]
    cores = len(os.sched_getaffinity(0))
    assert [row[0].strip("| ") for row in rows] == [
        "1 core",
        f"{cores} cores",
        f"{cores} cores, EQX_ON_ERROR=nan",
    ]
    for row in rows:
        cells = [float(c.strip("| ")) for c in row[1:]]
        assert len(cells) == 9
        store_ms, store_fwd, float_fwd, float_step, exact_fwd, exact_step = cells[:6]
        assert store_ms > 0
        # A forward pass alone takes less than the whole step.
        assert 0 < store_fwd < 1 and 0 < float_fwd < float_step
        assert 0 < exact_fwd < exact_step
    counts = lines[-1].removeprefix("operations in the compiled step: ").split(", ")
    operations = {c.rsplit(" ", 1)[0]: int(c.rsplit(" ", 1)[1]) for c in counts}
    assert set(operations) == {"store-all", "FloatState", "ExactState"}
    # The integer updates are operations of their own.
    assert 0 < operations["FloatState"] < operations["ExactState"]
    assert operations["store-all"] > 0


@pytest.mark.parametrize(
    "args, message",
    [
        (("--steps", "0"), "--steps must be at least 1"),
        (("--beta", "1"), "--beta must lie in (0, 2) and differ from 1"),
    ],
)
def test_bad_arguments_name_the_flag(args, message):
    result = run(*args)
    assert result.returncode == 2
    assert message in result.stderr
