from collections.abc import Callable

import equinox as eqx
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Float, Int, PyTree, Scalar

from .._tree import tree_rms
from .base import (
    AbstractSolver,
    ConvergenceState,
    Unsegmented,
    check_tolerances,
    no_progress,
)


class _AndersonState(eqx.Module):
    iterates: Float[Array, "history n"]
    residuals: Float[Array, "history n"]
    count: Int[Array, ""]
    progress: ConvergenceState


class Anderson(Unsegmented, AbstractSolver):
    """Anderson acceleration (type II) over the joint state of all pytree leaves.

    Keeps the last `history` pairs `(z_i, g_i = f(z_i) − z_i)` and steps to
    `Σ α_i (z_i + damping · g_i)`, where `α` minimises `‖Σ α_i g_i‖²` subject to
    `Σ α_i = 1`, with a Tikhonov term scaled by the mean of `‖g_i‖²` so that the
    regularisation is free of the problem's units. One evaluation of `f` per step.

    The least squares couples every element of the state: `vmap` over a batch so that
    each sample is solved on its own, and avoid it where elements must stay
    independent (the positions of a causal language model).

    **Arguments:**

    - `history`: number of past iterates kept (at least 1; 1 is damped iteration).
    - `damping`: the mixing weight of the residual, in (0, 2).
    - `regularisation`: relative Tikhonov weight of the least squares.
    - `rtol`, `atol`: stop once `rms(f(z) − z) < atol + rtol · rms(f(z))`.

    ??? cite "Reference"

        ```bibtex
        @article{walker2011anderson,
            title={Anderson acceleration for fixed-point iterations},
            author={Walker, Homer F and Ni, Peng},
            journal={SIAM Journal on Numerical Analysis},
            volume={49}, number={4}, pages={1715--1735}, year={2011}
        }
        ```

    !!! Example

        ```python
        import jax.numpy as jnp
        import revdeq


        def cell(z, x):
            return jnp.tanh(0.5 * z + x)


        z0, x = jnp.zeros(4), jnp.ones(4)

        sol = revdeq.solve(cell, z0, x, solver=revdeq.Anderson(history=5),
                           adjoint=revdeq.ImplicitAdjoint(), max_steps=30)
        ```
    """

    history: int = 5
    damping: float = eqx.field(converter=float, default=1.0)
    regularisation: float = eqx.field(converter=float, default=1e-8)
    rtol: float = eqx.field(converter=float, default=1e-4)
    atol: float = eqx.field(converter=float, default=1e-6)
    norm: Callable[[PyTree], Scalar] = tree_rms

    def __check_init__(self):
        check_tolerances(self)
        if self.history < 1:
            raise ValueError(f"`history` must be >= 1, got {self.history}.")
        if not 0 < self.damping < 2:
            raise ValueError(f"`damping` must lie in (0, 2), got {self.damping}.")
        if self.regularisation < 0:
            raise ValueError(
                f"`regularisation` must be >= 0, got {self.regularisation}."
            )

    def init(self, fn, y, args, options, f_struct, aux_struct, tags):
        del fn, args, options, f_struct, aux_struct, tags
        flat, _ = ravel_pytree(y)
        empty = jnp.zeros((self.history, flat.size), flat.dtype)
        return _AndersonState(empty, empty, jnp.array(0), no_progress(flat.dtype))

    def step(self, fn, y, args, options, state, tags):
        del options, tags
        fy, aux = fn(y, args)
        flat_y, unravel = ravel_pytree(y)
        flat_f, _ = ravel_pytree(fy)
        slot = state.count % self.history
        iterates = state.iterates.at[slot].set(flat_y)
        residuals = state.residuals.at[slot].set(flat_f - flat_y)
        valid = jnp.arange(self.history) <= state.count
        alpha = _mixing_weights(residuals, valid, self.regularisation)
        new_flat = alpha @ (iterates + self.damping * residuals)
        progress = self.progress(fy, y, state.progress, 1)
        new_state = _AndersonState(iterates, residuals, state.count + 1, progress)
        return unravel(new_flat.astype(flat_y.dtype)), new_state, aux


def _mixing_weights(residuals, valid, regularisation):
    """Solve `min ‖αᵀG‖²` s.t. `Σα = 1` over the valid rows of `G`."""
    both = valid[:, None] & valid[None, :]
    gram = jnp.where(both, residuals @ residuals.T, 0)
    mean_sq = jnp.trace(gram) / jnp.sum(valid, dtype=gram.dtype)
    tiny = jnp.finfo(gram.dtype).tiny
    ridge = jnp.maximum(regularisation * mean_sq, tiny)
    # Invalid rows become identity rows with a zero right-hand side, so α_i = 0.
    gram = gram + jnp.diag(jnp.where(valid, ridge, 1))
    alpha = jnp.linalg.solve(gram, valid.astype(gram.dtype))
    return alpha / jnp.sum(alpha)
