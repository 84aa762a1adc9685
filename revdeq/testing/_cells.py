import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .. import nn


class AffineCell(eqx.Module):
    """`tanh(w ⊙ z + 0.37·x)` with non-power-of-two `w`: a multiply-add that XLA
    fuses into one FMA in some programs and not in others."""

    weight: Float[Array, " dim"]

    def __call__(
        self, z: Float[Array, " dim"], x: Float[Array, " dim"]
    ) -> Float[Array, " dim"]:
        return jnp.tanh(self.weight * z + 0.37 * x)


class GroupNormCell(eqx.Module):
    """Group norms alone: `N₂(relu(N₁(z) + x))`. Batched, XLA reduces them in
    different orders in different programs."""

    norm1: eqx.nn.GroupNorm
    norm2: eqx.nn.GroupNorm

    def __call__(self, z: Float[Array, "..."], x: Float[Array, "..."]) -> Array:
        return self.norm2(jax.nn.relu(self.norm1(z) + x))


def compiler_sensitive_cells(
    key: PRNGKeyArray,
) -> dict[str, tuple[eqx.Module, tuple[int, ...]]]:
    """Cells whose two evaluations at the same input, in a forward pass and in a
    backward pass, XLA:CPU may compile to different bits, to check a reversal on:
    every cell of `revdeq.nn`, a cell of group norms alone and an FMA-prone affine
    cell (see "What exactness assumes" in the precision guide).

    **Returns:**

    `name -> (cell, shape)`, where `shape` is that of one example's state, which is
    also the shape of its input `x`.

    !!! Example

        ```python
        import equinox as eqx
        import jax
        import jax.numpy as jnp
        import revdeq

        cells = revdeq.testing.compiler_sensitive_cells(jax.random.key(0))
        cell, shape = cells["conv-2-per-group"]
        xs = jax.random.normal(jax.random.key(1), (8, *shape))
        solver = revdeq.Reversible(beta=0.8, rtol=0, atol=0)


        @eqx.filter_jit
        def drifts(cell, xs):  # batched, as a training step runs
            def one(x):
                return revdeq.reconstruction_error(
                    cell, jnp.zeros_like(x), x, solver=solver, max_steps=4
                )

            return jax.vmap(one)(xs)


        assert bool((drifts(cell, xs) == 0).all())
        ```
    """
    k1, k2, k3, k4, k5 = jax.random.split(key, 5)
    k6 = jax.random.fold_in(key, 6)
    return {
        "conv-2-per-group": (nn.ConvCell(8, 8, groups=4, key=k1), (8, 8, 8)),
        "conv-4-per-group": (nn.ConvCell(16, 32, groups=4, key=k2), (16, 8, 8)),
        "affine": (AffineCell(0.3 + 0.6 * jax.random.uniform(k3, (64,))), (64,)),
        "group-norms": (
            GroupNormCell(eqx.nn.GroupNorm(4, 8), eqx.nn.GroupNorm(4, 8)),
            (8, 8, 8),
        ),
        "transformer": (
            nn.TransformerCell(dim=16, num_heads=2, mlp_ratio=2, key=k4),
            (8, 16),
        ),
        "mlp": (nn.MLPCell(dim=32, hidden=64, key=k5), (32,)),
        "deq-transformer": (
            nn.DEQTransformerCell(dim=16, num_heads=2, mlp_ratio=2, key=k6),
            (8, 16),
        ),
    }
