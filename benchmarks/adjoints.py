"""Memory, time and evaluation counts of each adjoint.

Run: `python benchmarks/adjoints.py` (a few minutes on 2 CPU cores). Prints three
Markdown tables:

1. compiled temporary memory of a batched `value_and_grad` for each adjoint at
   4, 16, 64 and 256 solver steps (a tanh cell, d = 256, batch 64);
2. the time of reversible backprop over store-everything unrolled backprop at equal
   steps, for an MLP cell and a conv cell, measured side by side;
3. the evaluations of `f` per step in the reversible backward pass, counted.
"""

import functools

import jax
import jax.numpy as jnp
from _common import (
    ConvCell,
    TanhCell,
    batched_value_and_grad,
    interleaved_medians,
    markdown_table,
    solve_value,
    store_all_loss,
    temp_memory,
)

import revdeq


BETA = 0.8
FIXED = dict(rtol=0.0, atol=0.0)  # every solve runs exactly `max_steps` steps
# Cost is measured here, not exactness (see exactness.py): no certificate check.
UNCHECKED = revdeq.ReversibleAdjoint(drift_tolerance=float("inf"))


def _variants(steps):
    reversible = revdeq.Reversible(beta=BETA, **FIXED)
    iteration = revdeq.FixedPointIteration(damping=BETA, **FIXED)
    float_state = revdeq.Reversible(beta=BETA, precision=revdeq.FloatState(), **FIXED)
    solve = functools.partial(solve_value, steps=steps)
    return {
        "store-all scan": functools.partial(store_all_loss, beta=BETA, steps=steps),
        "UnrolledAdjoint (checkpointed)": functools.partial(
            solve, solver=reversible, adjoint=revdeq.UnrolledAdjoint()
        ),
        "ImplicitAdjoint": functools.partial(
            solve, solver=iteration, adjoint=revdeq.ImplicitAdjoint()
        ),
        "PhantomAdjoint(steps=5)": functools.partial(
            solve, solver=iteration, adjoint=revdeq.PhantomAdjoint(steps=5)
        ),
        "ReversibleAdjoint, ExactState": functools.partial(
            solve, solver=reversible, adjoint=UNCHECKED
        ),
        "ReversibleAdjoint, FloatState": functools.partial(
            solve, solver=float_state, adjoint=UNCHECKED
        ),
    }


def memory_table(dim=256, batch=64, steps_grid=(4, 16, 64, 256)):
    keys = jax.random.split(jax.random.key(0), 2)
    cell = TanhCell(dim, key=keys[0])
    z0s = jnp.zeros((batch, dim))
    xs = jax.random.normal(keys[1], (batch, dim))
    rows = {}
    for steps in steps_grid:
        for name, single in _variants(steps).items():
            fn = batched_value_and_grad(single)
            rows.setdefault(name, []).append(temp_memory(fn, cell, z0s, xs))
    table = [
        [name, *(f"{b / 2**20:.2f}" for b in mem), f"{mem[-1] / mem[0]:.2f}"]
        for name, mem in rows.items()
    ]
    header = ["adjoint", *(f"{s} steps (MiB)" for s in steps_grid), "256 / 4"]
    return markdown_table(header, table)


def time_table(steps=8):
    keys = jax.random.split(jax.random.key(1), 4)
    problems = {
        "MLP (tanh) cell, d=256, batch 64": (
            TanhCell(256, key=keys[0]),
            jnp.zeros((64, 256)),
            jax.random.normal(keys[1], (64, 256)),
        ),
        "conv cell, 16×16×16, batch 32": (
            ConvCell(16, key=keys[2]),
            jnp.zeros((32, 16, 16, 16)),
            jax.random.normal(keys[3], (32, 16, 16, 16)),
        ),
    }
    rows = []
    for name, (cell, z0s, xs) in problems.items():
        variants = _variants(steps)
        fns = {
            label: batched_value_and_grad(variants[label])
            for label in (
                "store-all scan",
                "ReversibleAdjoint, ExactState",
                "ReversibleAdjoint, FloatState",
            )
        }
        t = interleaved_medians(fns, cell, z0s, xs)
        base = t["store-all scan"]
        rows.append(
            [
                name,
                f"{base * 1e3:.1f}",
                f"{t['ReversibleAdjoint, ExactState'] / base:.2f}",
                f"{t['ReversibleAdjoint, FloatState'] / base:.2f}",
            ]
        )
    header = [
        f"cell ({steps} steps)",
        "store-all (ms)",
        "ExactState / store-all",
        "FloatState / store-all",
    ]
    return markdown_table(header, rows)


def backward_evaluations(steps=6):
    cell = TanhCell(16, key=jax.random.key(2))
    count = []

    def counted(z, x):
        jax.debug.callback(lambda: count.append(None))
        return cell(z, x)

    solver = revdeq.Reversible(beta=BETA, **FIXED)
    out, vjp = jax.vjp(
        lambda x: (
            revdeq.solve(
                counted, jnp.zeros(16), x, solver=solver, max_steps=steps
            ).value
        ),
        jnp.ones(16),
    )
    jax.block_until_ready(out)
    forward = len(count)
    jax.block_until_ready(vjp(jnp.ones(16)))
    backward = len(count) - forward
    return markdown_table(
        ["steps", "forward evals", "backward evals", "backward evals / step"],
        [[steps, forward, backward, f"{backward / steps:.2f}"]],
    )


if __name__ == "__main__":
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, beta = {BETA}\n")
    print("Compiled temporary memory of batched value_and_grad\n")
    print(memory_table(), "\n")
    print("Time of a jitted, vmapped value_and_grad, relative to store-all\n")
    print(time_table(), "\n")
    print("Evaluations of f in the reversible backward pass\n")
    print(backward_evaluations())
