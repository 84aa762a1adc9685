# %% [markdown]
# # 01 · Quickstart: solve a DEQ and differentiate it
#
# A *deep equilibrium model* (DEQ) outputs a fixed point `z* = f(z*, x)` of a learned
# cell `f`. revdeq finds it with `revdeq.solve` and differentiates through it with a
# choice of **adjoint**. This notebook teaches one idea: the same solve can be
# differentiated in several ways, and `ReversibleAdjoint` gives the *same* gradient as
# backpropagating through every iteration (`UnrolledAdjoint`) without storing the
# iterations, because the reversible iteration
#
#     y ← (1 − β)·y + β·f(z, x)
#     z ← (1 − β)·z + β·f(y, x)
#
# can be run backwards, bit for bit.

# %%
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import revdeq


# %% [markdown]
# ## A cell
#
# Any function `fn(z, args)` works; an `eqx.Module` is convenient because its array
# leaves are the parameters that receive gradients. The cell acts on *one* example;
# we `vmap` over the batch outside the solve.


# %%
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

# %% [markdown]
# ## Solving
#
# `revdeq.solve` returns a `Solution` with the fixed-point estimate `value`, a
# `result` code and `stats`. With `rtol=atol=0` the solver runs exactly `max_steps`
# steps and the solve is successful (`""`): the budget is the plan.

# %%
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
print(
    "fixed-point residual |f(z) - z|:",
    float(jnp.linalg.norm(cell(sol.value, xs[0]) - sol.value)),
)

# %% [markdown]
# `num_fn_evals` is `2·steps + 1`: two evaluations of `f` per reversible step plus one
# at the start. With a tolerance the solver stops early and reports success (`""`):

# %%
sol = revdeq.solve(
    cell,
    jnp.zeros(dim),
    xs[0],
    solver=revdeq.Reversible(beta=0.8, rtol=1e-5, atol=1e-5),
    max_steps=100,
)
print({k: float(v) for k, v in sol.stats.items()}, repr(revdeq.RESULTS[sol.result]))

# %% [markdown]
# ## Gradients with each adjoint
#
# We build a batched loss (vmapped over the examples) for each `(solver, adjoint)`
# pair and compare its parameter gradient with `UnrolledAdjoint`, which backpropagates
# through the same reversible iterations and is our reference.
#
# - `ReversibleAdjoint`: runs the iteration backwards; exact, constant memory in steps.
# - `ImplicitAdjoint`: the implicit-function theorem at the final iterate; exact only
#   at an exact fixed point (here after Anderson acceleration).
# - `PhantomAdjoint(steps, damping)`: a few damped fixed-point steps of the adjoint
#   equation; cheap and approximate.

# %%
anderson = revdeq.Anderson(rtol=0, atol=0)
runs = {
    "UnrolledAdjoint (reference)": (reversible, revdeq.UnrolledAdjoint()),
    "ReversibleAdjoint": (reversible, revdeq.ReversibleAdjoint()),
    "ImplicitAdjoint (Anderson)": (anderson, revdeq.ImplicitAdjoint()),
    "PhantomAdjoint (Anderson)": (
        anderson,
        revdeq.PhantomAdjoint(steps=5, damping=0.5),
    ),
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

# %% [markdown]
# The reversible gradient agrees with unrolled backprop to float32 round-off; the
# implicit gradient is close because Anderson has nearly converged; the phantom
# gradient is a deliberate approximation.
#
# ## The reconstruction is exact
#
# The backward pass of `ReversibleAdjoint` rebuilds every state from the last one.
# With the default precision, `revdeq.ExactState()`, the state is kept in fixed point
# with an integer *information buffer* holding the bits that the multiplication by
# `1 − β` discards, so the rebuilt initial state is identical to the true one.
# `revdeq.reconstruction_error` measures this drift: it is exactly zero, even after
# many steps. A plain float32 state (`FloatState()`) drifts.

# %%
for precision in [revdeq.ExactState(), revdeq.FloatState()]:
    for n in [4, 12, 64]:
        solver = revdeq.Reversible(beta=0.8, rtol=0, atol=0, precision=precision)
        drift = revdeq.reconstruction_error(
            cell, jnp.zeros(dim), xs[0], solver=solver, max_steps=n
        )
        print(
            f"{type(precision).__name__:11s} {n:3d} steps: drift = {float(drift):.1e}"
        )

# %% [markdown]
# `ReversibleAdjoint` checks this drift in every backward pass (its *certificate*):
# above `drift_tolerance` it raises under `throw=True` rather than return an inexact
# gradient. Next: `02_exact_gradients.ipynb` measures how far each adjoint is from the
# true gradient as the number of steps grows.
