import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, Float

from .._iterate import Iteration, iterate
from .._solver.reversible import Reversible
from .._tree import tree_rms, tree_scale, tree_sub
from .base import AbstractAdjoint, report_failure


class ReversibleAdjoint(AbstractAdjoint):
    """Exact gradients by running the reversible iteration backwards.

    The backward pass rebuilds each state `(yₙ, zₙ)` from `(yₙ₊₁, zₙ₊₁)` instead of
    storing it, so memory stays constant in the number of steps. Each reverse step
    takes two vector-Jacobian products of `f`, at `yₙ₊₁` and at the rebuilt `zₙ`, and
    their primal outputs are exactly the values the reconstruction needs: the
    backward evaluates `f` twice per step and no more. Gradients are exact with
    respect to `fn`'s parameters, `args` and `z0`. Only valid with
    [`revdeq.Reversible`][].

    **The reconstruction certificate.** The backward pass ends at a rebuilt `z₀` and
    compares it with the true one. The relative drift `rms(rebuilt − true) /
    rms(output)` above `drift_tolerance` means the gradient is not exact: it raises
    under `throw=True` and warns otherwise. With the default
    [`revdeq.ExactState`][] precision the drift is exactly zero.

    **Arguments:**

    - `drift_tolerance`: the largest tolerated relative drift; `None` means the
        square root of the machine epsilon of `z0`'s dtype.

    !!! Example

        ```python
        def loss(cell, x):
            sol = revdeq.solve(cell, jnp.zeros(8), x, solver=revdeq.Reversible(),
                               adjoint=revdeq.ReversibleAdjoint(), max_steps=16)
            return jnp.sum(sol.value ** 2)

        grads = eqx.filter_grad(loss)(cell, x)
        ```
    """

    drift_tolerance: float | None = None

    def apply(self, fn, solver, z0, args, *, max_steps, throw):
        if not isinstance(solver, Reversible):
            raise ValueError(
                "`ReversibleAdjoint` needs `solver=revdeq.Reversible(...)`, got "
                f"`{type(solver).__name__}`. For other solvers use `ImplicitAdjoint`, "
                "`PhantomAdjoint` or `UnrolledAdjoint`."
            )
        tolerance = self.drift_tolerance
        if tolerance is None:
            dtype = jnp.result_type(*jtu.tree_leaves(z0))
            tolerance = math.sqrt(float(jnp.finfo(dtype).eps))
        return _reversible_solve((fn, z0, args), solver, max_steps, tolerance, throw)


def reverse_pass(fn, args, solver: Reversible, final_state, num_steps, cotangent):
    """Walk `num_steps` reversible steps back from `final_state`, accumulating the
    cotangents of `(fn, args)` and of the state.

    Returns the rebuilt initial values `(y₀, z₀)`, the cotangent of `z₀` and that of
    `(fn, args)`.
    """
    precision = solver.precision
    beta = solver.beta
    c = 1 - beta
    fn_args = (fn, args)
    grads = jtu.tree_map(jnp.zeros_like, eqx.filter(fn_args, eqx.is_inexact_array))

    def vjp_at(point):
        return eqx.filter_vjp(lambda fa, p: fa[0](p, fa[1]), fn_args, point)

    def cond(carry):
        return carry[0] > 0

    def body(carry):
        n, ys, zs, ybar, zbar, grads = carry
        # zₙ₊₁ = c·zₙ + β·f(yₙ₊₁)
        fy, vjp_y = vjp_at(precision.decode(ys))
        zs = precision.reverse(zs, fy, beta)
        dfa, dy = vjp_y(tree_scale(beta, zbar))
        ybar = jtu.tree_map(jnp.add, ybar, dy)
        zbar = tree_scale(c, zbar)
        grads = jtu.tree_map(jnp.add, grads, dfa)
        # yₙ₊₁ = c·yₙ + β·f(zₙ)
        fz, vjp_z = vjp_at(precision.decode(zs))
        ys = precision.reverse(ys, fz, beta)
        dfa, dz = vjp_z(tree_scale(beta, ybar))
        zbar = jtu.tree_map(jnp.add, zbar, dz)
        ybar = tree_scale(c, ybar)
        grads = jtu.tree_map(jnp.add, grads, dfa)
        return n - 1, ys, zs, ybar, zbar, grads

    ybar = jtu.tree_map(jnp.zeros_like, cotangent)
    init = (num_steps, final_state.y, final_state.z, ybar, cotangent, grads)
    _, ys, zs, ybar, zbar, grads = jax.lax.while_loop(cond, body, init)
    z0_grad = jtu.tree_map(jnp.add, ybar, zbar)
    return precision.decode(ys), precision.decode(zs), z0_grad, grads


def drift(rebuilt_y, rebuilt_z, start, output) -> Float[Array, ""]:
    """The relative reconstruction error `rms(rebuilt − start) / rms(output)`."""
    err = jnp.maximum(
        tree_rms(tree_sub(rebuilt_y, start)), tree_rms(tree_sub(rebuilt_z, start))
    )
    scale = tree_rms(output)
    return err / jnp.maximum(scale, jnp.finfo(scale.dtype).tiny)


_DRIFTED = (
    "ReversibleAdjoint: the backward pass rebuilt an initial state that drifted from "
    "the true one, so this gradient is not exact. Use the default "
    "`precision=ExactState()`, a float64 `FloatState`, fewer steps or a `beta` "
    "further from 1 (or raise `drift_tolerance` knowingly)."
)


@eqx.filter_custom_vjp
def _reversible_solve(fn_z0_args, solver, max_steps, tolerance, throw) -> Iteration:
    fn, z0, args = fn_z0_args
    return iterate(fn, solver, z0, args, max_steps=max_steps)


@_reversible_solve.def_fwd
def _reversible_solve_fwd(perturbed, fn_z0_args, solver, max_steps, tolerance, throw):
    del perturbed
    out = _reversible_solve.fn(fn_z0_args, solver, max_steps, tolerance, throw)
    return out, (out.state, out.num_steps)


@_reversible_solve.def_bwd
def _reversible_solve_bwd(
    residuals, grad_obj, perturbed, fn_z0_args, solver, max_steps, tolerance, throw
):
    del perturbed, max_steps
    final_state, num_steps = residuals
    fn, _, args = fn_z0_args
    output = solver.precision.decode(final_state.z)
    cotangent = jtu.tree_map(
        lambda g, x: jnp.zeros_like(x) if g is None else g,
        grad_obj.value,
        output,
        is_leaf=lambda g: g is None,
    )
    y0, z0, z0_grad, (fn_grad, args_grad) = reverse_pass(
        fn, args, solver, final_state, num_steps, cotangent
    )
    failed = drift(y0, z0, final_state.start, output) > tolerance
    grads = (fn_grad, z0_grad, args_grad)
    return report_failure(grads, failed, _DRIFTED, throw)


def reconstruction_error(fn, z0, args, *, solver: Reversible, max_steps: int):
    """Run a reversible solve forward and backward, and measure the reconstruction.

    **Returns:** the relative drift `rms(rebuilt z₀ − z₀) / rms(output)` that
    [`revdeq.ReversibleAdjoint`][] certifies: exactly 0 with
    [`revdeq.ExactState`][], and growing like `|1 − β|^(−steps)` times the state's
    rounding with [`revdeq.FloatState`][].

    !!! Example

        ```python
        err = revdeq.reconstruction_error(cell, z0, x, max_steps=64,
                                          solver=revdeq.Reversible(beta=0.9))
        ```
    """
    fn = eqx.filter_closure_convert(fn, z0, args)
    out = iterate(fn, solver, z0, args, max_steps=max_steps)
    zero = jtu.tree_map(jnp.zeros_like, out.value)
    y0, z0_rebuilt, _, _ = reverse_pass(
        fn, args, solver, out.state, out.num_steps, zero
    )
    return drift(y0, z0_rebuilt, out.state.start, out.value)
