"""Exactness, memory and time of reversible backprop under three precisions.

Run: `python benchmarks/exactness.py` (a minute or two on 2 CPU cores). For a tanh
cell `f(z, x) = tanh(z W + x U + b)` (d = 256, batch 64, `W` scaled to 0.9/sqrt(d),
float32 parameters, JAX's default config with x64 off), it prints for each
`beta` and number of steps:

- the relative error of the parameter gradient against a float64 truth: `jax.grad`
  of a plain Python loop of the same iteration, run in float64 from the same float32
  parameters;
- compiled temporary memory relative to store-everything backprop written as a
  Python loop, the fastest plain program;
- time relative to the same: medians of samples interleaved with it in one process
  (the float64 state, which needs x64, is not timed), with the reconstruction
  certificate off.

Configurations: a naive float32 `FloatState`, a float64 `FloatState` (x64 on), and
the default `ExactState`.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from _common import (
    batched_value_and_grad,
    interleaved_medians,
    markdown_table,
    solve_value,
)

import revdeq
from revdeq.testing import (
    TanhCell,
    compiled_memory,
    plain_reversible_loop,
    relative_error,
)


DIM, BATCH = 256, 64
BETAS = (0.5, 0.8, 0.9)
STEPS = (4, 8, 16, 32, 64)
UNCHECKED = revdeq.ReversibleAdjoint(drift_tolerance=float("inf"))
REPEATS = 9


def _solver(beta, precision):
    return revdeq.Reversible(beta=beta, rtol=0.0, atol=0.0, precision=precision)


def _truth(cell, z0s, xs, beta, steps):
    with jax.enable_x64(True):
        as64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), (cell, z0s, xs))
        single = functools.partial(plain_reversible_loop, beta=beta, steps=steps)
        _, grads = batched_value_and_grad(single)(*as64)
        return jax.tree.map(np.asarray, grads)


def _ours(cell, z0s, xs, beta, steps, precision, x64):
    single = functools.partial(
        solve_value, solver=_solver(beta, precision), adjoint=UNCHECKED, steps=steps
    )
    with jax.enable_x64(x64):
        args = (cell, z0s, xs)
        if x64:
            args = (cell, z0s.astype(jnp.float64), xs)
        fn = batched_value_and_grad(single)
        _, grads = fn(*args)
        return grads, fn, args


def main():
    keys = jax.random.split(jax.random.key(0), 2)
    cell = TanhCell(DIM, key=keys[0])
    z0s = jnp.zeros((BATCH, DIM))
    xs = jax.random.normal(keys[1], (BATCH, DIM))
    configs = {
        "float32 state": (revdeq.FloatState(), False),
        "float64 state": (None, True),
        "ExactState (default)": (revdeq.ExactState(), False),
    }
    rows = []
    for beta in BETAS:
        for steps in STEPS:
            truth = _truth(cell, z0s, xs, beta, steps)
            base = batched_value_and_grad(
                functools.partial(plain_reversible_loop, beta=beta, steps=steps)
            )
            base_memory = compiled_memory(base, cell, z0s, xs)
            row = [beta, steps]
            timed = {"store-all": functools.partial(base, cell, z0s, xs)}
            for name, (precision, x64) in configs.items():
                if precision is None:
                    with jax.enable_x64(True):
                        precision = revdeq.FloatState(jnp.float64)
                grads, fn, args = _ours(cell, z0s, xs, beta, steps, precision, x64)
                with jax.enable_x64(x64):
                    memory = compiled_memory(fn, *args)
                row += [
                    f"{relative_error(grads, truth):.1e}",
                    f"{memory / base_memory:.2f}",
                ]
                if not x64:  # timed against the float32 store-everything run
                    timed[name] = functools.partial(fn, *args)
            times = interleaved_medians(timed, repeats=REPEATS)
            row += [
                f"{times[name] / times['store-all']:.2f}"
                for name in ("float32 state", "ExactState (default)")
            ]
            rows.append(row)
            print(" | ".join(str(c) for c in row), flush=True)
    header = ["beta", "steps"]
    for name in configs:
        header += [f"{name}: grad error", f"{name}: memory / store-all"]
    header += ["float32 state: time / store-all", "ExactState: time / store-all"]
    print()
    print(markdown_table(header, rows))


if __name__ == "__main__":
    print(
        f"jax {jax.__version__} on {jax.devices()[0].device_kind}; d={DIM}, "
        f"batch={BATCH}, float32 parameters, x64 off unless stated\n"
    )
    main()
