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


class _BroydenState(eqx.Module):
    residual: Float[Array, " n"]
    us: Float[Array, "history n"]
    vs: Float[Array, "history n"]
    count: Int[Array, ""]
    progress: ConvergenceState


class Broyden(Unsegmented, AbstractSolver):
    """Limited-memory ("good") Broyden's method on `g(z) = f(z) − z = 0`.

    Keeps the inverse Jacobian of `g` as `H = −I + Σ u_i v_iᵀ` with the last `history`
    rank-one updates, and steps `z ← z − H g(z)`. It evaluates `f` once at
    initialisation and once per step, and the returned iterate is the last evaluated
    one, so its residual is exact. Like [`revdeq.Anderson`][], it couples every
    element of the state: `vmap` over a batch.

    **Arguments:**

    - `history`: the number of rank-one updates kept (at least 1).
    - `rtol`, `atol`: stop once `rms(f(z) − z) < atol + rtol · rms(f(z))`.

    ??? cite "Reference"

        ```bibtex
        @article{broyden1965class,
            title={A class of methods for solving nonlinear simultaneous equations},
            author={Broyden, Charles G},
            journal={Mathematics of Computation},
            volume={19}, number={92}, pages={577--593}, year={1965}
        }
        ```

    !!! Example

        ```python
        import jax.numpy as jnp
        import revdeq


        def cell(z, x):
            return jnp.tanh(0.5 * z + x)


        z0, x = jnp.zeros(4), jnp.ones(4)

        sol = revdeq.solve(cell, z0, x, solver=revdeq.Broyden(history=8),
                           adjoint=revdeq.ImplicitAdjoint(), max_steps=30)
        ```
    """

    history: int = 8
    rtol: float = eqx.field(converter=float, default=1e-4)
    atol: float = eqx.field(converter=float, default=1e-6)
    norm: Callable[[PyTree], Scalar] = tree_rms

    def __check_init__(self):
        check_tolerances(self)
        if self.history < 1:
            raise ValueError(f"`history` must be >= 1, got {self.history}.")

    def init(self, fn, y, args, options, f_struct, aux_struct, tags):
        del options, f_struct, aux_struct, tags
        fy, _ = fn(y, args)
        flat_y, _ = ravel_pytree(y)
        flat_f, _ = ravel_pytree(fy)
        empty = jnp.zeros((self.history, flat_y.size), flat_y.dtype)
        progress = self.progress(fy, y, no_progress(flat_y.dtype), 1)
        return _BroydenState(flat_f - flat_y, empty, empty, jnp.array(0), progress)

    def step(self, fn, y, args, options, state, tags):
        del options, tags
        flat_y, unravel = ravel_pytree(y)
        g = state.residual
        dz = -_apply_inverse(state.us, state.vs, g)
        new_y = unravel(flat_y + dz)
        fy, aux = fn(new_y, args)
        flat_f, _ = ravel_pytree(fy)
        new_g = flat_f - (flat_y + dz)
        dg = new_g - g
        # Good Broyden: H ← H + (dz − H dg) (dzᵀ H) / (dzᵀ H dg).
        v = _apply_inverse_transpose(state.us, state.vs, dz)
        denom = v @ dg
        ok = jnp.abs(denom) > jnp.finfo(denom.dtype).eps * jnp.linalg.norm(v) * (
            jnp.linalg.norm(dg)
        )
        u = jnp.where(ok, (dz - _apply_inverse(state.us, state.vs, dg)) / denom, 0)
        slot = state.count % self.history
        progress = self.progress(fy, new_y, state.progress, 1)
        new_state = _BroydenState(
            new_g,
            state.us.at[slot].set(u),
            state.vs.at[slot].set(jnp.where(ok, v, 0)),
            state.count + 1,
            progress,
        )
        return new_y, new_state, aux


def _apply_inverse(us, vs, x):
    return -x + us.T @ (vs @ x)


def _apply_inverse_transpose(us, vs, x):
    return -x + vs.T @ (us @ x)
