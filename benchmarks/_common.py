"""Shared pieces of the benchmarks: cells, the store-everything baseline, and the
two measurements (compiled temporary memory, and interleaved median timings)."""

import math
import statistics
import time

import equinox as eqx
import jax
import jax.numpy as jnp

import revdeq


class TanhCell(eqx.Module):
    """`f(z, x) = tanh(z W + x U + b)` with `W` scaled to `0.9 / sqrt(d)`."""

    weight: jax.Array
    inject: jax.Array
    bias: jax.Array

    def __init__(self, dim, *, key):
        k1, k2, k3 = jax.random.split(key, 3)
        self.weight = 0.9 / dim**0.5 * jax.random.normal(k1, (dim, dim))
        self.inject = jax.random.normal(k2, (dim, dim)) / dim**0.5
        self.bias = 0.1 * jax.random.normal(k3, (dim,))

    def __call__(self, z, x):
        return jnp.tanh(z @ self.weight + x @ self.inject + self.bias)


def _reversible_step(cell, x, beta, y, z):
    y = (1 - beta) * y + beta * cell(z, x)
    z = (1 - beta) * z + beta * cell(y, x)
    return y, z


def store_all_loss(cell, z0, x, beta, steps):
    """The reversible iteration as a Python loop, so that backprop through it stores
    every step's residuals. The yardstick for memory and time: at a fixed step
    count, the fastest plain program a user could write (XLA:CPU compiles a
    convolution in a loop body several times slower, jax-ml/jax#12868)."""
    y = z = z0
    for _ in range(steps):
        y, z = _reversible_step(cell, x, beta, y, z)
    return z


def store_all_scan_loss(cell, z0, x, beta, steps):
    """The same iteration as a `lax.scan`: store-all backprop through a loop."""

    def step(carry, _):
        return _reversible_step(cell, x, beta, *carry), None

    (_, z), _ = jax.lax.scan(step, (z0, z0), None, length=steps)
    return z


def solve_value(cell, z0, x, *, solver, adjoint, steps):
    return revdeq.solve(
        cell, z0, x, solver=solver, adjoint=adjoint, max_steps=steps
    ).value


def batched_value_and_grad(single):
    """`value_and_grad` of a scalar loss of `single(cell, z0, x)` vmapped over a
    batch: how users call a DEQ layer."""

    def loss(cell, z0s, xs):
        out = jax.vmap(single, in_axes=(None, 0, 0))(cell, z0s, xs)
        return jnp.mean(out**2)

    return jax.jit(jax.value_and_grad(loss))


def temp_memory(fn, *args) -> int:
    """Compiled temporary memory in bytes: deterministic, and read without running."""
    return fn.lower(*args).compile().memory_analysis().temp_size_in_bytes


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
