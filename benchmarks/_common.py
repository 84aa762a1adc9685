"""Shared pieces of the benchmarks: a solve and the batched training step around it,
and interleaved median timings. The cell, the store-everything yardstick
(`plain_reversible_loop`), the relative error and the compiled-memory reading are
`revdeq.testing`'s."""

import math
import statistics
import time

import jax
import jax.numpy as jnp

import revdeq


def solve_value(cell, z0, x, *, solver, adjoint, steps):
    return revdeq.solve(
        cell, z0, x, solver=solver, adjoint=adjoint, max_steps=steps
    ).value


def batched_loss(single):
    """A scalar loss of `single(cell, z0, x)` vmapped over a batch: how users call a
    DEQ layer."""

    def loss(cell, z0s, xs):
        out = jax.vmap(single, in_axes=(None, 0, 0))(cell, z0s, xs)
        return jnp.mean(out**2)

    return loss


def batched_value_and_grad(single):
    """`value_and_grad` of `batched_loss(single)`, jitted."""
    return jax.jit(jax.value_and_grad(batched_loss(single)))


def interleaved_medians(fns: dict, *args, repeats=7, min_sample_seconds=0.05) -> dict:
    """Median wall time per call of each function, run in turns so that load on the
    machine affects all alike. Each is compiled and warmed up first.

    One sample times as many consecutive calls as make the first function's sample
    last `min_sample_seconds`, so that runs of a few milliseconds are not lost in
    timer and scheduling noise; every function gets the same number of calls.
    """
    for fn in fns.values():
        jax.block_until_ready(fn(*args))
    first = next(iter(fns.values()))
    start = time.perf_counter()
    jax.block_until_ready(first(*args))
    calls = max(1, math.ceil(min_sample_seconds / (time.perf_counter() - start)))
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(calls):
                jax.block_until_ready(fn(*args))
            times[name].append((time.perf_counter() - start) / calls)
    return {name: statistics.median(ts) for name, ts in times.items()}


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
