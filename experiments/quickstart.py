"""A first look at revdeq: one small DEQ, solved and differentiated with each adjoint.

Run: `python experiments/quickstart.py`. For a tanh cell on a batch of inputs it
prints, per adjoint, the relative gradient error against `UnrolledAdjoint` (backprop
through the same iterations), the forward function evaluations and the compiled
temporary memory of the batched value-and-grad.
"""

import jax
import jax.numpy as jnp

import revdeq
from revdeq.testing import TanhCell, compiled_memory, relative_error


def main(dim=64, batch=32, steps=12):
    k1, k2 = jax.random.split(jax.random.key(0))
    cell = TanhCell(dim, key=k1, scale=0.8)
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
        if reference is None:
            reference = grads
        error = relative_error(grads, reference)
        memory = compiled_memory(fn, cell, xs)
        print(f"{name:30s} {error:24.2e} {int(evals):8d} {memory / 1024:13.0f}")
    drift = revdeq.reconstruction_error(
        cell, jnp.zeros(dim), xs[0], solver=reversible, max_steps=steps
    )
    print(f"\nReversible reconstruction drift (ExactState): {float(drift):.1e}")


if __name__ == "__main__":
    main()
