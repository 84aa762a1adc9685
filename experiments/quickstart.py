"""A first look at revdeq: one small DEQ, solved and differentiated with each adjoint.

Run: `python experiments/quickstart.py`. For a tanh cell on a batch of inputs it
prints, per adjoint, the relative gradient error against `UnrolledAdjoint` (backprop
through the same iterations), the forward function evaluations and the compiled
temporary memory of the batched value-and-grad.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import revdeq


class Cell(eqx.Module):
    weight: jax.Array
    inject: jax.Array

    def __init__(self, dim, *, key):
        k1, k2 = jax.random.split(key)
        self.weight = 0.8 / dim**0.5 * jax.random.normal(k1, (dim, dim))
        self.inject = jax.random.normal(k2, (dim, dim)) / dim**0.5

    def __call__(self, z, x):
        return jnp.tanh(self.weight @ z + self.inject @ x)


def main(dim=64, batch=32, steps=12):
    k1, k2 = jax.random.split(jax.random.key(0))
    cell = Cell(dim, key=k1)
    xs = jax.random.normal(k2, (batch, dim))
    reversible = revdeq.Reversible(beta=0.8, rtol=0, atol=0)
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

    def make(solver, adjoint):
        def loss(cell, xs):
            def one(x):
                sol = revdeq.solve(
                    cell,
                    jnp.zeros(dim),
                    x,
                    solver=solver,
                    adjoint=adjoint,
                    max_steps=steps,
                )
                return jnp.sum(sol.value**2), sol.stats["num_fn_evals"]

            losses, evals = jax.vmap(one)(xs)
            return jnp.mean(losses), evals[0]

        return jax.jit(jax.value_and_grad(loss, has_aux=True))

    reference = None
    print(f"tanh cell, d={dim}, batch={batch}, {steps} solver steps\n")
    print(
        f"{'adjoint':30s} {'grad error vs unrolled':>24s} {'f evals':>8s} "
        f"{'memory (KiB)':>13s}"
    )
    for name, (solver, adjoint) in runs.items():
        fn = make(solver, adjoint)
        (_, evals), grads = fn(cell, xs)
        flat = np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads)])
        if reference is None:
            reference = flat
        error = np.linalg.norm(flat - reference) / np.linalg.norm(reference)
        memory = fn.lower(cell, xs).compile().memory_analysis().temp_size_in_bytes
        print(f"{name:30s} {error:24.2e} {int(evals):8d} {memory / 1024:13.0f}")
    drift = revdeq.reconstruction_error(
        cell, jnp.zeros(dim), xs[0], solver=reversible, max_steps=steps
    )
    print(f"\nReversible reconstruction drift (ExactState): {float(drift):.1e}")


if __name__ == "__main__":
    main()
