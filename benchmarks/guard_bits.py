"""How far the cell's evaluations in the forward and backward passes disagree, in
quanta of `ExactState`'s injection, measured as the guard bits a bit-exact
reconstruction needs.

Run: `python benchmarks/guard_bits.py [--quick]` (about ten minutes on 2 CPU cores).
For each cell, path (the `lax.while_loop` and straight-line code), `beta` and number
of steps, a batch of 16 samples is solved and reversed under `jit` and `vmap`, as a
training step runs, with `ExactState(guard_bits=k)` for k = 0, 1, 2, ... The
smallest k whose drift is exactly 0 bounds the largest disagreement of an injection
`β·f·2^e` between the passes: below `2^(k − 1)` quanta, and at least `2^(k − 2)`
when k ≥ 2 (k = 0: the passes agree bit for bit). Prints a Markdown table and the
distribution of k over all solves.
"""

import argparse
import collections
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from _common import markdown_table

import revdeq


BATCH = 16
MAX_GUARD_BITS = 12


class AffineCell(eqx.Module):
    """`tanh(w ⊙ z + 0.37·x)` with non-power-of-two `w`: a multiply-add that XLA
    fuses into one FMA in some programs and not in others."""

    weight: jax.Array

    def __call__(self, z, x):
        return jnp.tanh(self.weight * z + 0.37 * x)


class GroupNormCell(eqx.Module):
    """Group norms alone, 2 channels per group: `N₂(relu(N₁(z) + x))`."""

    norm1: eqx.nn.GroupNorm
    norm2: eqx.nn.GroupNorm

    def __call__(self, z, x):
        return self.norm2(jax.nn.relu(self.norm1(z) + x))


def _cells(key):
    """`name -> (cell, per-sample shape, headroom bits at 12 steps)`."""
    k1, k2, k3, k4, k5 = jr.split(key, 5)
    transformer = revdeq.nn.TransformerCell(dim=16, num_heads=2, mlp_ratio=2, key=k4)
    return {
        "ConvCell, 8 channels, 2 per group": (
            revdeq.nn.ConvCell(8, 8, groups=4, key=k1),
            (8, 8, 8),
        ),
        "ConvCell, 16 channels, 4 per group": (
            revdeq.nn.ConvCell(16, 32, groups=4, key=k2),
            (16, 8, 8),
        ),
        "affine tanh(w·z + 0.37·x)": (
            AffineCell(0.3 + 0.6 * jr.uniform(k3, (64,))),
            (64,),
        ),
        "group norms only": (
            GroupNormCell(eqx.nn.GroupNorm(4, 8), eqx.nn.GroupNorm(4, 8)),
            (8, 8, 8),
        ),
        "TransformerCell, dim 16": (transformer, (8, 16)),
        "MLPCell": (revdeq.nn.MLPCell(dim=32, hidden=64, key=k5), (32,)),
    }


def _headroom(name, steps):
    # A residual cell grows with the steps: give it `DEQLanguageModel`'s headroom.
    if name.startswith("Transformer"):
        return 6 + max(0, math.ceil(math.log2(steps)) - 2)
    return 6


def _drift(cell, z0s, xs, *, beta, steps, unroll, headroom, guard_bits):
    precision = revdeq.ExactState(headroom_bits=headroom, guard_bits=guard_bits)
    solver = revdeq.Reversible(beta=beta, rtol=0, atol=0, precision=precision)

    @jax.jit
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
    cli = parser.parse_args()
    steps_list = (2, 4) if cli.quick else (2, 4, 12)
    rows, counts = [], collections.Counter()
    for name, (cell, shape) in _cells(jr.key(0)).items():
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
        markdown_table(["guard bits", "disagreement (quanta)", "solves", "share"], dist)
    )


if __name__ == "__main__":
    main()
