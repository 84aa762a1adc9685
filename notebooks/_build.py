"""Generate the tutorial notebooks and execute them in place.

Run: `python notebooks/_build.py [name ...]` from the repository root. Each notebook
is written from the cell lists below, formatted with ruff, then executed top to
bottom in a fresh kernel and saved with its outputs.
"""

# ruff: noqa: E501 (the cells' source is formatted by ruff once written out)

import pathlib
import subprocess
import sys
import time

import nbclient
import nbformat


HERE = pathlib.Path(__file__).parent


def md(text):
    return nbformat.v4.new_markdown_cell(text.strip())


def code(text):
    return nbformat.v4.new_code_cell(text.strip())


QUICKSTART = [
    md(
        """
# 01 · Quickstart: solve a DEQ and differentiate it

A *deep equilibrium model* (DEQ) outputs a fixed point `z* = f(z*, x)` of a learned
cell `f`. revdeq finds it with `revdeq.solve` and differentiates through it with a
choice of **adjoint**. This notebook teaches one idea: the same solve can be
differentiated in several ways, and `ReversibleAdjoint` gives the *same* gradient as
backpropagating through every iteration (`UnrolledAdjoint`) without storing the
iterations, because the reversible iteration

    y ← (1 − β)·y + β·f(z, x)
    z ← (1 − β)·z + β·f(y, x)

can be run backwards, bit for bit.
"""
    ),
    code(
        """
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import revdeq
"""
    ),
    md(
        """
## A cell

Any function `fn(z, args)` works; an `eqx.Module` is convenient because its array
leaves are the parameters that receive gradients. The cell acts on *one* example;
we `vmap` over the batch outside the solve.
"""
    ),
    code(
        """
class Cell(eqx.Module):
    weight: jax.Array
    inject: jax.Array

    def __init__(self, dim, *, key):
        k1, k2 = jax.random.split(key)
        self.weight = 0.8 / dim**0.5 * jax.random.normal(k1, (dim, dim))
        self.inject = jax.random.normal(k2, (dim, dim)) / dim**0.5

    def __call__(self, z, x):
        return jnp.tanh(self.weight @ z + self.inject @ x)


dim, batch, steps = 32, 8, 12
kcell, kx = jax.random.split(jax.random.key(0))
cell = Cell(dim, key=kcell)
xs = jax.random.normal(kx, (batch, dim))
"""
    ),
    md(
        """
## Solving

`revdeq.solve` returns a `Solution` with the fixed-point estimate `value`, a
`result` code and `stats`. With `rtol=atol=0` the solver runs exactly `max_steps`
steps; reaching `max_steps` is a *budget*, reported in `result`, never an error.
"""
    ),
    code(
        """
reversible = revdeq.Reversible(beta=0.8, rtol=0, atol=0)
sol = revdeq.solve(
    cell,
    jnp.zeros(dim),
    xs[0],
    solver=reversible,
    adjoint=revdeq.ReversibleAdjoint(),
    max_steps=steps,
)
print("value[:4]  ", sol.value[:4])
print("stats      ", {k: float(v) for k, v in sol.stats.items()})
print("result     ", repr(revdeq.RESULTS[sol.result]))
print("fixed-point residual |f(z) - z|:", float(jnp.linalg.norm(cell(sol.value, xs[0]) - sol.value)))
"""
    ),
    md(
        """
`num_fn_evals` is `2·steps + 1`: two evaluations of `f` per reversible step plus one
at the start. With a tolerance the solver stops early and reports success (`""`):
"""
    ),
    code(
        """
sol = revdeq.solve(
    cell,
    jnp.zeros(dim),
    xs[0],
    solver=revdeq.Reversible(beta=0.8, rtol=1e-5, atol=1e-5),
    max_steps=100,
)
print({k: float(v) for k, v in sol.stats.items()}, repr(revdeq.RESULTS[sol.result]))
"""
    ),
    md(
        """
## Gradients with each adjoint

We build a batched loss (vmapped over the examples) for each `(solver, adjoint)`
pair and compare its parameter gradient with `UnrolledAdjoint`, which backpropagates
through the same reversible iterations and is our reference.

- `ReversibleAdjoint`: runs the iteration backwards; exact, constant memory in steps.
- `ImplicitAdjoint`: the implicit-function theorem at the final iterate; exact only
  at an exact fixed point (here after Anderson acceleration).
- `PhantomAdjoint(steps, damping)`: a few damped fixed-point steps of the adjoint
  equation; cheap and approximate.
"""
    ),
    code(
        """
anderson = revdeq.Anderson(rtol=0, atol=0)
runs = {
    "UnrolledAdjoint (reference)": (reversible, revdeq.UnrolledAdjoint()),
    "ReversibleAdjoint": (reversible, revdeq.ReversibleAdjoint()),
    "ImplicitAdjoint (Anderson)": (anderson, revdeq.ImplicitAdjoint()),
    "PhantomAdjoint (Anderson)": (anderson, revdeq.PhantomAdjoint(steps=5, damping=0.5)),
}


def make_grad(solver, adjoint):
    def loss(cell, xs):
        def one(x):
            sol = revdeq.solve(
                cell, jnp.zeros(dim), x, solver=solver, adjoint=adjoint, max_steps=steps
            )
            return jnp.sum(sol.value**2)

        return jnp.mean(jax.vmap(one)(xs))

    return jax.jit(jax.grad(loss))


def flatten(tree):
    return np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves(tree)])


grads = {name: flatten(make_grad(*pair)(cell, xs)) for name, pair in runs.items()}
reference = grads["UnrolledAdjoint (reference)"]
for name, g in grads.items():
    error = np.linalg.norm(g - reference) / np.linalg.norm(reference)
    print(f"{name:30s} relative gradient error vs unrolled: {error:.1e}")
"""
    ),
    md(
        """
The reversible gradient agrees with unrolled backprop to float32 round-off; the
implicit gradient is close because Anderson has nearly converged; the phantom
gradient is a deliberate approximation.

## The reconstruction is exact

The backward pass of `ReversibleAdjoint` rebuilds every state from the last one.
With the default precision, `revdeq.ExactState()`, the state is kept in fixed point
with an integer *information buffer* holding the bits that the multiplication by
`1 − β` discards, so the rebuilt initial state is identical to the true one.
`revdeq.reconstruction_error` measures this drift: it is exactly zero, even after
many steps. A plain float32 state (`FloatState()`) drifts.
"""
    ),
    code(
        """
for precision in [revdeq.ExactState(), revdeq.FloatState()]:
    for n in [4, 12, 64]:
        solver = revdeq.Reversible(beta=0.8, rtol=0, atol=0, precision=precision)
        drift = revdeq.reconstruction_error(
            cell, jnp.zeros(dim), xs[0], solver=solver, max_steps=n
        )
        print(f"{type(precision).__name__:11s} {n:3d} steps: drift = {float(drift):.1e}")
"""
    ),
    md(
        """
`ReversibleAdjoint` checks this drift in every backward pass (its *certificate*):
above `drift_tolerance` it raises under `throw=True` rather than return an inexact
gradient. Next: `02_exact_gradients.ipynb` measures how far each adjoint is from the
true gradient as the number of steps grows.
"""
    ),
]


EXACT = [
    md(
        """
# 02 · Exact gradients: how far is each adjoint from the truth?

A DEQ's forward pass computes `z_N` after `N` solver steps. The *exact* gradient is
the derivative of that computed `z_N`, the one backprop through every step would give
in infinite precision. This notebook measures, for N = 2 … 64, the relative error of
each adjoint's parameter gradient against a **float64 truth**: `jax.grad` of a plain
Python loop of the reversible iteration, run with x64 enabled from the same
parameters.

- `ImplicitAdjoint` (after Anderson) is exact only at an exact fixed point.
- `PhantomAdjoint` is an approximation by design.
- `ReversibleAdjoint` with `FloatState()` (float32) must *recompute* earlier states by
  dividing by `1 − β`, which amplifies rounding by `1/|1 − β|` per step.
- `ReversibleAdjoint` with `ExactState()` (the default) reverses bit for bit.
"""
    ),
    code(
        """
import equinox as eqx
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import revdeq


class Cell(eqx.Module):
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


dim, batch, beta = 32, 4, 0.8
kcell, kx = jax.random.split(jax.random.key(0))
cell = Cell(dim, key=kcell)
xs = jax.random.normal(kx, (batch, dim))
step_counts = [2, 4, 8, 16, 32, 64]
"""
    ),
    md(
        """
## The float64 truth

A plain Python loop of the reversible iteration, differentiated with `jax.grad`
under `jax.enable_x64(True)`, with parameters and inputs cast to float64.
"""
    ),
    code(
        """
def loop_loss(cell, xs, steps):
    def one(x):
        y = z = jnp.zeros_like(x)
        for _ in range(steps):
            y = (1 - beta) * y + beta * cell(z, x)
            z = (1 - beta) * z + beta * cell(y, x)
        return jnp.sum(z**2)

    return jnp.mean(jax.vmap(one)(xs))


def truth(steps):
    with jax.enable_x64(True):
        cell64, xs64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), (cell, xs))
        grads = jax.jit(jax.grad(loop_loss), static_argnums=2)(cell64, xs64, steps)
        return jax.tree.map(np.asarray, grads)


def relative_error(grads, reference):
    g = np.concatenate([np.ravel(np.asarray(a, np.float64)) for a in jax.tree.leaves(grads)])
    r = np.concatenate([np.ravel(a) for a in jax.tree.leaves(reference)])
    return float(np.linalg.norm(g - r) / np.linalg.norm(r))
"""
    ),
    md(
        """
## The adjoints under test

All in float32 with x64 off. The reversible runs disable the drift certificate
(`drift_tolerance=inf`) so that the float32 state's inexact gradient is returned and
measured instead of rejected.
"""
    ),
    code(
        """
unchecked = revdeq.ReversibleAdjoint(drift_tolerance=float("inf"))
configs = {
    "Implicit (Anderson)": (revdeq.Anderson(rtol=0, atol=0), revdeq.ImplicitAdjoint()),
    "Phantom(5, 0.5) (Anderson)": (
        revdeq.Anderson(rtol=0, atol=0),
        revdeq.PhantomAdjoint(steps=5, damping=0.5),
    ),
    "Reversible, FloatState f32": (
        revdeq.Reversible(beta=beta, rtol=0, atol=0, precision=revdeq.FloatState()),
        unchecked,
    ),
    "Reversible, ExactState": (
        revdeq.Reversible(beta=beta, rtol=0, atol=0, precision=revdeq.ExactState()),
        unchecked,
    ),
}


def grad_with(solver, adjoint, steps):
    def loss(cell, xs):
        def one(x):
            sol = revdeq.solve(
                cell, jnp.zeros(dim), x, solver=solver, adjoint=adjoint, max_steps=steps
            )
            return jnp.sum(sol.value**2)

        return jnp.mean(jax.vmap(one)(xs))

    return jax.jit(jax.grad(loss))(cell, xs)


errors = {name: [] for name in configs}
for steps in step_counts:
    reference = truth(steps)
    for name, (solver, adjoint) in configs.items():
        errors[name].append(relative_error(grad_with(solver, adjoint, steps), reference))

print(f"{'steps':>5s} " + " ".join(f"{n:>27s}" for n in configs))
for i, steps in enumerate(step_counts):
    print(f"{steps:5d} " + " ".join(f"{errors[n][i]:27.1e}" for n in configs))
"""
    ),
    md(
        """
Note the comparison: the implicit and phantom gradients are compared with the
gradient of the *reversible* iteration's output. For few steps the two solvers have
not converged to the same point, so part of their error is the difference between
solvers; for many steps both converge and what remains is the adjoint's own error.
"""
    ),
    code(
        """
fig, ax = plt.subplots(figsize=(7, 4.5))
for name, errs in errors.items():
    errs = np.array(errs)
    errs = np.where(np.isfinite(errs), errs, np.nan)
    ax.plot(step_counts, errs, marker="o", label=name)
ax.axhline(np.finfo(np.float32).eps, color="grey", ls=":", label="float32 eps")
ax.set_xscale("log", base=2)
ax.set_yscale("log")
ax.set_xlabel("solver steps N")
ax.set_ylabel("relative gradient error vs float64 truth")
ax.set_title(f"Gradient error against steps (tanh cell, d={dim}, β={beta})")
ax.legend(fontsize=8)
ax.grid(True, which="both", alpha=0.3)
plt.show()
"""
    ),
    md(
        """
**Reading the plot.** `ExactState` stays at float32 round-off for every step count:
the reversal is exact, so the only error is that of float32 arithmetic in `f` and its
VJPs. A float32 `FloatState` is exact for a couple of steps and then loses
`log2(1/|1 − β|) ≈ 2.3` bits per step until its gradient is noise (or NaN, which
the plot leaves out). The implicit gradient improves as Anderson converges and,
once Anderson has reached the fixed point to machine precision (here by 64 steps),
matches the truth as well; before that it is off by orders of magnitude. The
phantom gradient levels off at its approximation error.
"""
    ),
]


MEMORY = [
    md(
        """
# 03 · Memory and speed

Backprop through `N` solver steps normally stores every step: memory grows linearly
in `N`. This notebook measures XLA's compiled temporary memory
(`jit(f).lower(...).compile().memory_analysis().temp_size_in_bytes`, deterministic
and read without running) of a batched value-and-grad against `N`, for each adjoint
and for a store-all `lax.scan` baseline, and then times each against store-all
backprop written as a plain Python loop, the fastest program a user could write.

The idea to take away: `ReversibleAdjoint` rebuilds states instead of storing them,
so with `FloatState` its memory is flat in `N`; `ExactState` adds only its
information buffer, about `log2(1/|1 − β|)` bits per element per step.
"""
    ),
    code(
        """
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
"""
    ),
    md(
        """
## The functions measured

Each is `jit(value_and_grad)` of a batched loss. The store-all baselines run the
same reversible iteration and keep every step's residuals: as a `lax.scan` for the
memory chart, and as a Python loop (straight-line code) for the timings. On CPU the
loop form matters for convolutions, which XLA compiles far less well inside a loop
body (jax-ml/jax#12868); a slow baseline would flatter every ratio.
"""
    ),
    code(
        """
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
    "UnrolledAdjoint": with_adjoint(reversible(revdeq.ExactState()), revdeq.UnrolledAdjoint()),
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
"""
    ),
    md("## Memory against steps"),
    code(
        """
step_counts = [4, 16, 64, 256]
memory = {
    name: [temp_memory(value_and_grad(single, n), cell, xs) / 2**20 for n in step_counts]
    for name, single in methods.items()
}
print(f"{'MiB':28s}" + "".join(f"{n:>9d}" for n in step_counts))
for name, row in memory.items():
    print(f"{name:28s}" + "".join(f"{m:9.2f}" for m in row))
"""
    ),
    code(
        """
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
"""
    ),
    md(
        """
## Time relative to straight-line store-all backprop

Timings on a shared machine are noisy, so we run the functions *in turns* and take
medians: load affects all of them alike. Each is compiled and warmed up first.
"""
    ),
    code(
        """
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
"""
    ),
    code(
        """
fig, ax = plt.subplots(figsize=(8, 4))
width = 0.8 / len(timed_steps)
positions = np.arange(len(methods))
for i, n in enumerate(timed_steps):
    ax.bar(positions + i * width, [ratios[m][i] for m in methods], width, label=f"{n} steps")
ax.axhline(1.0, color="grey", ls=":")
ax.set_xticks(positions + width * (len(timed_steps) - 1) / 2)
ax.set_xticklabels(list(methods), rotation=20, ha="right", fontsize=8)
ax.set_ylabel("time / straight-line store-all time")
ax.set_title("Value-and-grad time relative to straight-line store-all (median)")
ax.legend()
plt.tight_layout()
plt.show()
"""
    ),
    md(
        """
**Reading the results.** Store-all memory grows linearly with `N`; implicit and
phantom gradients are flat (they differentiate only the last iterate) but are not the
exact gradient of the computed output (see notebook 02). `ReversibleAdjoint` with a
float state is flat *and* exact for few steps; with `ExactState` it is exact for any
`N` and grows only by its compact information buffer. Its extra time is integer
arithmetic, a fixed cost per step that weighs most when `f` is as cheap as here.
On CPU, part of every revdeq timing above is its run-time error checks: they are
host callbacks, and JAX runs a program that contains one synchronously, without a
second core's speed-up. `EQX_ON_ERROR=nan` (failures become NaNs, not exceptions)
removes them; the README's measured results show both.
"""
    ),
]


TRAIN = [
    md(
        """
# 04 · Training a RevDEQ on Fashion-MNIST

This notebook shows that a reversible DEQ trains like any other layer. It runs the
repository's experiment script `experiments/image_classification.py` (a small
convolutional stem, an equilibrium layer over a feature vector, a linear head) on a
small slice of Fashion-MNIST for two epochs, for two variants at an **equal budget of
forward evaluations**:

- `revdeq`: `Reversible` solver + `ReversibleAdjoint` (exact gradient, constant
  memory in steps);
- `deq`: `Anderson` solver + `ImplicitAdjoint` (implicit-function-theorem gradient).

The data are read offline from Debian's `dataset-fashion-mnist` package. Everything
is kept tiny so that it runs in about a minute on a CPU; the full comparison is
`python experiments/demo.py --model all`.
"""
    ),
    code(
        """
import pathlib
import sys
import tempfile

from IPython.display import Image, Markdown, display


experiments = pathlib.Path.cwd().parent / "experiments"
sys.path.insert(0, str(experiments))
import _common  # noqa: E402
import image_classification  # noqa: E402
"""
    ),
    md(
        """
## Train both variants

`main(argv)` takes the script's command-line arguments and returns its results. Each
variant writes its metrics under `out/<variant>/`.
"""
    ),
    code(
        """
out = pathlib.Path(tempfile.mkdtemp()) / "fashion"
common = [
    "--epochs", "2", "--steps", "4", "--batch-size", "32",
    "--limit-train", "2048", "--limit-test", "1000",
    "--channels", "8", "--width", "32", "--hidden", "64",
    "--out", str(out),
]  # fmt: skip
results = {}
for variant in ["revdeq", "deq"]:
    results |= image_classification.main(["--model", variant, *common])
"""
    ),
    md(
        """
## Results

Per model: test accuracy, wall time, forward and backward evaluations of the cell
per example and solve, the compiled memory of a training step and the parameter
count. Both see the same `2·steps + 1 = 9` forward evaluations; the backward
evaluations differ (RevDEQ: exactly two per reversible step).
"""
    ),
    code(
        """
table = _common.write_reports(out, results)
display(Markdown(table))
"""
    ),
    code(
        """
display(Image(filename=str(out / "learning_curves.png")))
"""
    ),
    md(
        """
Both models start from the same initialisation and see the same batches, so their
curves nearly coincide: at this size the two gradients drive training alike. The
difference is the backward cost (RevDEQ's exact gradient takes 8 evaluations of the
cell, the implicit one's GMRES solve three times as many). After two epochs on 2,048
images both are far from their final accuracy (about 91% after 8 epochs on the full
set, see the README).
"""
    ),
]


LANGUAGE = [
    md(
        """
# 05 · A tiny byte-level language model

A DEQ layer can be the whole trunk of a transformer: `revdeq.nn.DEQLanguageModel`
embeds the tokens and solves `z* = f(z*, x)` for a causal transformer cell `f`
(attention + MLP) with a fixed number of reversible steps, then a head gives the
next-token logits at every position. Backprop through the solve uses
`ReversibleAdjoint`, so training memory does not grow with the number of steps.

The one idea here: a DEQ language model is an ordinary model to train and sample
from. We train a very small byte-level model for a couple of hundred steps on the Python
standard library's own sources (offline: `revdeq.data.load_text_corpus`), then
generate text greedily and with a temperature. After so little training the text is
only Python-flavoured noise; the loss curve is the point.
"""
    ),
    code(
        """
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import revdeq


corpus = revdeq.data.load_text_corpus(max_bytes=200_000)
train = corpus["train"]
print({split: len(tokens) for split, tokens in corpus.items()})
print(bytes(train[:120].astype(np.uint8)).decode("utf-8", "replace"))
"""
    ),
    md(
        """
## The model

256 byte values, sequences of 64 bytes, width 64, 4 heads, 4 reversible steps (the
default solver: `Reversible(beta=0.5)` with a float state, which keeps positions
independent so the model stays exactly causal).
"""
    ),
    code(
        """
seq_len, batch_size, num_steps = 64, 16, 200
model = revdeq.nn.DEQLanguageModel(256, seq_len, 64, 4, key=jax.random.key(0), max_steps=4)
print("parameters:", revdeq.nn.count_parameters(model))

optimiser = optax.adamw(3e-3)
opt_state = optimiser.init(eqx.filter(model, eqx.is_array))


def loss_fn(model, inputs, targets):
    logits = jax.vmap(model)(inputs)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


@eqx.filter_jit
def make_step(model, opt_state, inputs, targets):
    loss, grads = eqx.filter_value_and_grad(loss_fn)(model, inputs, targets)
    updates, opt_state = optimiser.update(grads, opt_state, eqx.filter(model, eqx.is_array))
    return eqx.apply_updates(model, updates), opt_state, loss


def sample_batch(rng):
    starts = rng.integers(0, len(train) - seq_len - 1, size=batch_size)
    window = np.stack([train[s : s + seq_len + 1] for s in starts]).astype(np.int32)
    return jnp.asarray(window[:, :-1]), jnp.asarray(window[:, 1:])
"""
    ),
    md("## Training"),
    code(
        """
rng = np.random.default_rng(0)
losses = []
start = time.perf_counter()
for step in range(num_steps):
    model, opt_state, loss = make_step(model, opt_state, *sample_batch(rng))
    losses.append(float(loss))
    if step % 25 == 0 or step == num_steps - 1:
        print(f"step {step:3d}  loss {losses[-1]:.3f}")
print(f"{num_steps} steps in {time.perf_counter() - start:.1f} s (including compilation)")
"""
    ),
    code(
        """
fig, ax = plt.subplots(figsize=(6, 3.5))
ax.plot(losses)
ax.axhline(np.log(256), color="grey", ls=":", label="uniform over bytes (log 256)")
ax.set_xlabel("training step")
ax.set_ylabel("cross-entropy (nats / byte)")
ax.set_title("DEQ language model: training loss")
ax.legend()
plt.show()
"""
    ),
    md(
        """
## Sampling

The model takes a fixed-length window. We place the prompt at the start of a window
and, since the model is causal, read the logits at the last filled position; once
the window is full it slides along. `temperature=0` is greedy decoding.
"""
    ),
    code(
        """
@eqx.filter_jit
def next_logits(model, window, position):
    return model(window)[position]


def generate(model, prompt, length, temperature=0.0, seed=0):
    tokens = list(prompt.encode())
    key = jax.random.key(seed)
    for _ in range(length):
        context = tokens[-seq_len:]
        window = jnp.zeros(seq_len, jnp.int32).at[: len(context)].set(jnp.array(context))
        logits = next_logits(model, window, jnp.asarray(len(context) - 1))
        if temperature == 0:
            token = int(jnp.argmax(logits))
        else:
            key, sub = jax.random.split(key)
            token = int(jax.random.categorical(sub, logits / temperature))
        tokens.append(token)
    return bytes(tokens).decode("utf-8", "replace")


prompt = "def "
print("greedy:\\n" + generate(model, prompt, 80))
print("\\ntemperature 0.8:\\n" + generate(model, prompt, 80, temperature=0.8))
"""
    ),
    md(
        """
For a real run, `python experiments/language_model.py --model revdeq` trains on the
whole corpus with the shared training loop (warmup, cosine decay, checkpoints,
perplexity on held-out splits).
"""
    ),
]


NOTEBOOKS = {
    "01_quickstart": QUICKSTART,
    "02_exact_gradients": EXACT,
    "03_memory_and_speed": MEMORY,
    "04_train_fashion_mnist": TRAIN,
    "05_language_model": LANGUAGE,
}


def build(name, cells, execute=True):
    nb = nbformat.v4.new_notebook()
    nb.cells = cells
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    path = HERE / f"{name}.ipynb"
    nbformat.write(nb, path)
    ruff = pathlib.Path(sys.executable).parent / "ruff"
    subprocess.run([ruff, "format", "--quiet", path], check=True)
    subprocess.run([ruff, "check", "--fix", "--quiet", path], check=True)
    if execute:
        execute_in_place(path)


def execute_in_place(path):
    nb = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    nbclient.NotebookClient(
        nb,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(HERE)}},
    ).execute()
    nbformat.write(nb, path)
    print(f"{path.name}: executed in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    args = sys.argv[1:]
    if args and args[0] == "--execute-only":
        for name in args[1:] or NOTEBOOKS:
            execute_in_place(HERE / f"{name}.ipynb")
    else:
        for name in args or NOTEBOOKS:
            build(name, NOTEBOOKS[name])
