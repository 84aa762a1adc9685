# %% [markdown]
# # 03 · Memory and speed
#
# Backprop through `N` solver steps normally stores every step: memory grows linearly
# in `N`. This notebook measures XLA's compiled temporary memory
# (`jit(f).lower(...).compile().memory_analysis().temp_size_in_bytes`, deterministic
# and read without running) of a batched value-and-grad against `N`, for each adjoint
# and for a store-all `lax.scan` baseline, and then times each against store-all
# backprop written as a plain Python loop, the fastest program a user could write.
#
# The idea to take away: `ReversibleAdjoint` rebuilds states instead of storing them,
# so with `FloatState` its memory is flat in `N`; `ExactState` adds only its
# information buffer: about `log2(1/|1 − β|)` bits per element per step, plus 4
# guard bits per update (two updates per step).

# %%
import statistics
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import revdeq


class Cell(eqx.Module):
    weight: jax.Array
    inject: jax.Array

    def __init__(self, dim, *, key):
        k1, k2 = jax.random.split(key)
        self.weight = 0.9 / dim**0.5 * jax.random.normal(k1, (dim, dim))
        self.inject = jax.random.normal(k2, (dim, dim)) / dim**0.5

    def __call__(self, z, x):
        return jnp.tanh(z @ self.weight + x @ self.inject)


dim, batch, beta = 128, 32, 0.8
kcell, kx = jax.random.split(jax.random.key(0))
cell = Cell(dim, key=kcell)
xs = jax.random.normal(kx, (batch, dim))


# %% [markdown]
# ## The functions measured
#
# Each is `jit(value_and_grad)` of a batched loss. The store-all baselines run the
# same reversible iteration and keep every step's residuals: as a `lax.scan` for the
# memory chart, and as a Python loop (straight-line code) for the timings. On CPU the
# loop form matters for convolutions, which XLA compiles far less well inside a loop
# body (jax-ml/jax#12868); a slow baseline would flatter every ratio.


# %%
def store_all(cell, x, steps):
    def step(carry, _):
        y, z = carry
        y = (1 - beta) * y + beta * cell(z, x)
        z = (1 - beta) * z + beta * cell(y, x)
        return (y, z), None

    z0 = jnp.zeros_like(x)
    (_, z), _ = jax.lax.scan(step, (z0, z0), None, length=steps)
    return z


def straight_line(cell, x, steps):
    y = z = jnp.zeros_like(x)
    for _ in range(steps):
        y = (1 - beta) * y + beta * cell(z, x)
        z = (1 - beta) * z + beta * cell(y, x)
    return z


def with_adjoint(solver, adjoint):
    def single(cell, x, steps):
        return revdeq.solve(
            cell, jnp.zeros_like(x), x, solver=solver, adjoint=adjoint, max_steps=steps
        ).value

    return single


def reversible(precision):
    return revdeq.Reversible(beta=beta, rtol=0, atol=0, precision=precision)


anderson = revdeq.Anderson(rtol=0, atol=0)
methods = {
    "store-all lax.scan": store_all,
    "UnrolledAdjoint": with_adjoint(
        reversible(revdeq.ExactState()), revdeq.UnrolledAdjoint()
    ),
    "ImplicitAdjoint (Anderson)": with_adjoint(anderson, revdeq.ImplicitAdjoint()),
    "PhantomAdjoint(5)": with_adjoint(anderson, revdeq.PhantomAdjoint(steps=5)),
    "Reversible, FloatState": with_adjoint(
        reversible(revdeq.FloatState()),
        revdeq.ReversibleAdjoint(drift_tolerance=float("inf")),
    ),
    "Reversible, ExactState": with_adjoint(
        reversible(revdeq.ExactState()), revdeq.ReversibleAdjoint()
    ),
}


def value_and_grad(single, steps):
    def loss(cell, xs):
        out = jax.vmap(lambda x: single(cell, x, steps))(xs)
        return jnp.mean(out**2)

    return jax.jit(jax.value_and_grad(loss))


def temp_memory(fn, *args):
    return fn.lower(*args).compile().memory_analysis().temp_size_in_bytes


# %% [markdown]
# ## Memory against steps

# %%
step_counts = [4, 16, 64, 256]
memory = {
    name: [
        temp_memory(value_and_grad(single, n), cell, xs) / 2**20 for n in step_counts
    ]
    for name, single in methods.items()
}
print(f"{'MiB':28s}" + "".join(f"{n:>9d}" for n in step_counts))
for name, row in memory.items():
    print(f"{name:28s}" + "".join(f"{m:9.2f}" for m in row))

# %%
fig, ax = plt.subplots(figsize=(7, 4.5))
for name, row in memory.items():
    ax.plot(step_counts, row, marker="o", label=name)
ax.set_xscale("log", base=2)
ax.set_yscale("log")
ax.set_xlabel("solver steps N")
ax.set_ylabel("compiled temporary memory (MiB)")
ax.set_title(f"Backward-pass memory against steps (d={dim}, batch {batch})")
ax.legend(fontsize=8)
ax.grid(True, which="both", alpha=0.3)
plt.show()


# %% [markdown]
# ## Time relative to straight-line store-all backprop
#
# Timings on a shared machine are noisy, so we run the functions *in turns* and take
# medians: load affects all of them alike. Each is compiled and warmed up first.


# %%
def interleaved_medians(fns, *args, repeats=5):
    for fn in fns.values():
        jax.block_until_ready(fn(*args))
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


timed_steps = [4, 16]
ratios = {name: [] for name in methods}
for n in timed_steps:
    timed = {"straight-line": straight_line, **methods}
    medians = interleaved_medians(
        {name: value_and_grad(single, n) for name, single in timed.items()}, cell, xs
    )
    base = medians["straight-line"]
    print(f"{n} steps: straight-line store-all {base * 1e3:.2f} ms")
    for name in methods:
        ratios[name].append(medians[name] / base)
        print(f"  {name:28s} {medians[name] / base:5.2f}x")

# %%
fig, ax = plt.subplots(figsize=(8, 4))
width = 0.8 / len(timed_steps)
positions = np.arange(len(methods))
for i, n in enumerate(timed_steps):
    ax.bar(
        positions + i * width,
        [ratios[m][i] for m in methods],
        width,
        label=f"{n} steps",
    )
ax.axhline(1.0, color="grey", ls=":")
ax.set_xticks(positions + width * (len(timed_steps) - 1) / 2)
ax.set_xticklabels(list(methods), rotation=20, ha="right", fontsize=8)
ax.set_ylabel("time / straight-line store-all time")
ax.set_title("Value-and-grad time relative to straight-line store-all (median)")
ax.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# **Reading the results.** Store-all memory grows linearly with `N`; implicit and
# phantom gradients are flat (they differentiate only the last iterate) but are not the
# exact gradient of the computed output (see notebook 02). `ReversibleAdjoint` with a
# float state is flat *and* exact for few steps; with `ExactState` it is exact for any
# `N` and grows only by its compact information buffer. Its extra time is integer
# arithmetic, a fixed cost per step that weighs most when `f` is as cheap as here.
# On CPU, part of every revdeq timing above is its run-time error checks: they are
# host callbacks, and JAX runs a program that contains one synchronously, without a
# second core's speed-up. `EQX_ON_ERROR=nan` (failures become NaNs, not exceptions)
# removes them; the README's measured results show both.
