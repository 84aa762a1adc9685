"""How far the cell's evaluations in the forward and backward passes disagree, in
steps of the grid of `ExactState`'s injection (the larger of a quantum and a unit in
the last place of `β·f`), measured as the guard bits a bit-exact reconstruction
needs.

Run: `python benchmarks/guard_bits.py [--quick] [--cells NAME ...]` (about half an hour
on 2 CPU cores).
For each cell, path (the `lax.while_loop` and straight-line code), `beta` and number
of steps, a batch of 16 samples is solved and reversed under `jit` and `vmap`, as a
training step runs, with `ExactState(guard_bits=k)` for k = 0, 1, 2, ... The
smallest k whose drift is exactly 0 bounds the largest disagreement of an injection
`β·f·2^e` between the passes: below `2^(k − 1)` steps, and at least `2^(k − 2)`
when k ≥ 2 (k = 0: the passes agree bit for bit). Prints a Markdown table and the
distribution of k over all solves.
"""

import argparse
import collections

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from _common import markdown_table

import revdeq
from revdeq.nn._models import residual_headroom_bits
from revdeq.testing import compiler_sensitive_cells


BATCH = 16
MAX_GUARD_BITS = 12


def _headroom(name, steps):
    # A residual cell grows with the steps: `DEQLanguageModel`'s headroom.
    default = revdeq.ExactState()
    if name == "transformer":
        return residual_headroom_bits(default, steps)
    return default.headroom_bits


def _drift(cell, z0s, xs, *, beta, steps, unroll, headroom, guard_bits):
    precision = revdeq.ExactState(headroom_bits=headroom, guard_bits=guard_bits)
    solver = revdeq.Reversible(beta=beta, rtol=0, atol=0, precision=precision)

    @eqx.filter_jit
    def batched(cell, z0s, xs):
        def one(z0, x):
            return revdeq.reconstruction_error(
                cell, z0, x, solver=solver, max_steps=steps, unroll=unroll
            )

        return jnp.max(jax.vmap(one)(z0s, xs))

    return float(batched(cell, z0s, xs))


def _needed_guard_bits(cell, z0s, xs, **kwargs) -> int | None:
    """The smallest number of guard bits with a drift of exactly 0, if any."""
    for k in range(MAX_GUARD_BITS + 1):
        if _drift(cell, z0s, xs, guard_bits=k, **kwargs) == 0:
            return k
    return None


def _radius(k: int | None) -> str:
    if k is None:
        return f">= {2 ** (MAX_GUARD_BITS - 1)}"
    return f"< {2 ** (k - 1)}" if k else "0"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 and 4 steps only")
    parser.add_argument("--cells", nargs="*", help="only these cells (default: all)")
    cli = parser.parse_args()
    steps_list = (2, 4) if cli.quick else (2, 4, 12)
    rows, counts = [], collections.Counter()
    for name, (cell, shape) in compiler_sensitive_cells(jr.key(0)).items():
        if cli.cells and name not in cli.cells:
            continue
        xs = jr.normal(jr.key(1), (BATCH, *shape))
        z0s = jnp.zeros_like(xs)
        for unroll in (False, True):
            for beta in (0.5, 0.8, 1.2):
                for steps in steps_list:
                    if unroll and steps > revdeq.internal.UNROLL_MAX_STEPS:
                        continue
                    k = _needed_guard_bits(
                        cell,
                        z0s,
                        xs,
                        beta=beta,
                        steps=steps,
                        unroll=unroll,
                        headroom=_headroom(name, steps),
                    )
                    counts[k] += 1
                    path = "straight-line" if unroll else "loop"
                    shown = f"> {MAX_GUARD_BITS}" if k is None else k
                    rows.append([name, path, beta, steps, shown])
                    print(rows[-1], flush=True)
    print()
    print(markdown_table(["cell", "path", "beta", "steps", "guard bits needed"], rows))
    print()
    total = sum(counts.values())
    dist = [
        [k, _radius(k), n, f"{n / total:.0%}"]
        for k, n in sorted(counts.items(), key=lambda kv: (kv[0] is None, kv[0]))
    ]
    print(
        markdown_table(
            ["guard bits", "disagreement (grid steps)", "solves", "share"], dist
        )
    )


if __name__ == "__main__":
    main()
