"""How close `ExactState`'s forward iterate stays to the float64 iteration, by β.

Run: `python benchmarks/exact_state_resolution.py`. For a small float32
`TanhCell` and each β it prints the fraction `n/d` that `ExactState` takes for
`1 − β` (its reversible multiplication `⌊(s·n + r) / d⌋`, with a digit `r ∈ [0, n)`
from the buffer, lies within one quantum of `s·n/d`), and the relative error of the
output of a fixed-step solve against the same iteration in float64: `ExactState`'s
beside that of the plain float32 loop. The reconstruction is bit for bit in every
row; this measures what it reconstructs.
"""

import jax
import jax.numpy as jnp
from _common import markdown_table

import revdeq
from revdeq._precision.fixed_point import rational
from revdeq.testing import TanhCell, plain_reversible_loop, relative_error


BETAS = (0.5, 0.8, 1.2, 1.5, 1.86, 1.875, 1.8595)
STEPS = (16, 153)


def main() -> None:
    jax.config.update("jax_enable_x64", True)
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    cell = TanhCell(3, key=k1, scale=0.5)
    z0 = 0.7 * jax.random.normal(k2, (3,), jnp.float32)
    x = jax.random.normal(k3, (3,), jnp.float32)
    as64 = jax.tree.map(lambda a: a.astype(jnp.float64), (cell, z0, x))
    rows = []
    for beta in BETAS:
        solver = revdeq.Reversible(beta=beta, rtol=0, atol=0)
        b = solver.effective_beta
        _, n, d = rational(1 - beta)
        for steps in STEPS:
            truth = plain_reversible_loop(*as64, b, steps)
            ours = revdeq.solve(cell, z0, x, solver=solver, max_steps=steps).value
            plain = plain_reversible_loop(cell, z0, x, b, steps)
            rows.append(
                [
                    beta,
                    f"{n}/{d}",
                    steps,
                    f"{relative_error(ours, truth):.1e}",
                    f"{relative_error(plain, truth):.1e}",
                ]
            )
    header = ["β", "1 − β = ±n/d", "steps", "ExactState", "float32 loop"]
    print("Relative error of the output against the float64 iteration\n")
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
