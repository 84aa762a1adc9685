"""Where the time of a reversible training step goes, against store-all backprop.

Run: `python benchmarks/time_breakdown.py [--beta 0.9] [--steps 4]` (about a minute
per step count on 2 CPU cores). For the tanh cell of `benchmarks/exactness.py`, it
times the forward pass alone and the whole batched `value_and_grad` of three
programs: store-all backprop as straight-line code, and the reversible adjoint with
a `FloatState` and with the default `ExactState`. It measures them in three fresh
processes: pinned to one core; on all the cores this process may use; and on all of
them with `EQX_ON_ERROR=nan`, under which the solve's checks return NaNs instead of
raising through host callbacks (store-all has no checks). It prints every time
relative to the store-all step of the same process, with:

- the reversible structure, `FloatState − store-all`: the evaluations of `f` that
  the reverse pass repeats, and its chaining of them;
- the integer arithmetic, `ExactState − FloatState`, in the forward pass and in all;
- the operations in each compiled step (XLA:CPU runs each as one task, loop bodies
  counted once).
"""

import argparse
import functools
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
from _common import (
    batched_loss,
    batched_value_and_grad,
    interleaved_medians,
    markdown_table,
    solve_value,
)
from exactness import BATCH, DIM, UNCHECKED

import revdeq
from revdeq.testing import TanhCell, plain_reversible_loop


PROGRAMS = ("store-all", "FloatState", "ExactState")
REPEATS = 15


def _singles(beta: float, steps: int) -> dict:
    def reversible(precision):
        solver = revdeq.Reversible(beta=beta, rtol=0.0, atol=0.0, precision=precision)
        return functools.partial(
            solve_value, solver=solver, adjoint=UNCHECKED, steps=steps
        )

    return {
        "store-all": functools.partial(plain_reversible_loop, beta=beta, steps=steps),
        "FloatState": reversible(revdeq.FloatState()),
        "ExactState": reversible(revdeq.ExactState()),
    }


_TRIVIAL = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast"}


def _operations(compiled_text: str) -> int:
    """The operations of a compiled XLA:CPU program outside fusions: the entry
    computation and the bodies of its loops and branches, each counted once."""
    count = 0
    for header, body in re.findall(
        r"^((?:ENTRY )?%\S+) .*?\{\n(.*?)\n\}", compiled_text, re.S | re.M
    ):
        if "fused" in header or "wrapped" in header or "_computation" in header:
            continue
        ops = re.findall(r"= \S+ ([\w\-]+)\(", body)
        count += sum(op not in _TRIVIAL for op in ops)
    return count


def measure(beta: float, steps: int) -> dict:
    """Times relative to the store-all step, and operation counts, on the cores
    this process may use."""
    keys = jax.random.split(jax.random.key(0), 2)
    args = (
        TanhCell(DIM, key=keys[0]),
        jnp.zeros((BATCH, DIM)),
        jax.random.normal(keys[1], (BATCH, DIM)),
    )
    timed, operations = {}, {}
    for name, single in _singles(beta, steps).items():
        step = batched_value_and_grad(single)
        timed[f"{name} step"] = functools.partial(step, *args)
        forward = jax.jit(batched_loss(single))
        timed[f"{name} forward"] = functools.partial(forward, *args)
        operations[name] = _operations(step.lower(*args).compile().as_text())
    times = interleaved_medians(timed, repeats=REPEATS)
    base = times["store-all step"]
    return {
        "relative": {name: t / base for name, t in times.items()},
        "store-all step ms": base * 1e3,
        "operations": operations,
    }


def _in_fresh_process(cores: list[int], on_error: str, beta: float, steps: int) -> dict:
    """`measure` in a fresh process that may run only on `cores`, with
    `EQX_ON_ERROR=on_error`."""
    command = [sys.executable, __file__, "--worker", f"--beta={beta}"]
    out = subprocess.run(
        [*command, f"--steps={steps}"],
        capture_output=True,
        text=True,
        env={**os.environ, "EQX_ON_ERROR": on_error},
        preexec_fn=lambda: os.sched_setaffinity(0, cores),
        cwd=os.path.dirname(os.path.abspath(__file__)),
    )
    if out.returncode != 0:
        raise RuntimeError(f"The run on {len(cores)} core(s) failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(beta: float, steps: int) -> None:
    available = sorted(os.sched_getaffinity(0))
    settings = {"1 core": (available[:1], "raise")}
    settings[f"{len(available)} cores"] = (available, "raise")
    settings[f"{len(available)} cores, EQX_ON_ERROR=nan"] = (available, "nan")
    header = ["process", "store-all step (ms)", "store-all forward"]
    header += [f"{p} {part}" for p in PROGRAMS[1:] for part in ("forward", "step")]
    header += ["reversible structure", "integer arithmetic: forward", "… in all"]
    rows, operations = [], None
    for setting, (cores, on_error) in settings.items():
        result = _in_fresh_process(cores, on_error, beta, steps)
        rel = result["relative"]
        operations = result["operations"]
        row = [
            setting,
            f"{result['store-all step ms']:.2f}",
            f"{rel['store-all forward']:.2f}",
        ]
        row += [
            f"{rel[f'{p} {part}']:.2f}"
            for p in PROGRAMS[1:]
            for part in ("forward", "step")
        ]
        row += [
            f"{rel['FloatState step'] - 1:+.2f}",
            f"{rel['ExactState forward'] - rel['FloatState forward']:+.2f}",
            f"{rel['ExactState step'] - rel['FloatState step']:+.2f}",
        ]
        rows.append(row)
        print(" | ".join(str(c) for c in row), flush=True)
    print()
    print(f"beta={beta}, {steps} steps; times relative to the store-all step")
    print(markdown_table(header, rows))
    assert operations is not None
    print()
    print(
        "operations in the compiled step: "
        + ", ".join(f"{p} {operations[p]}" for p in PROGRAMS)
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--beta", type=float, default=0.9)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    cli = parser.parse_args()
    if cli.steps < 1:
        parser.error("--steps must be at least 1")
    if not 0 < cli.beta < 2 or cli.beta == 1:
        parser.error("--beta must lie in (0, 2) and differ from 1")
    if cli.worker:
        print(json.dumps(measure(cli.beta, cli.steps)))
    else:
        print(f"jax {jax.__version__}; d={DIM}, batch={BATCH}\n")
        main(cli.beta, cli.steps)
