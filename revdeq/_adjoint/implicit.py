from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import lineax as lx
from jaxtyping import Array, PyTree

from .._custom_types import Args, Fn, Y
from .._iterate import Iteration, iterate
from .._solver.base import AbstractSolver
from .._tree import relative_residual, tree_sub, tree_zeros_for_none
from .base import AbstractAdjoint, report_failure


_NOT_CONVERGED = (
    "ImplicitAdjoint: the backward linear solve did not converge, so the gradient is "
    "inexact. Converge the forward solve further (raise `max_steps`, tighten the "
    "tolerances), or give `linear_solver` more steps."
)


class ImplicitAdjoint(AbstractAdjoint):
    """Implicit-function-theorem gradients at the fixed point.

    At `z* = f(z*, θ)`, the cotangent `g` of `z*` pulls back as `(∂f/∂θ)ᵀ w` where
    `w = g + (∂f/∂z)ᵀ w`. The linear system `(I − (∂f/∂z)ᵀ) w = g` is solved
    matrix-free with lineax, through vector-Jacobian products of `f` only, warm-started
    at `w = g`. The gradient is exact only at an exact fixed point; it is zero with
    respect to `z0`.

    A backward solve that does not converge raises under `throw=True` and is warned
    about otherwise.

    **A bounded backward solve.** Where `I − ∂f/∂z` is far from the identity (a
    residual cell `z + g(z)`, as in a Transformer), no iterative solve may converge.
    A linear solver with `rtol = atol = 0` then runs its whole budget as planned, as
    DEQ training usually does: `lx.GMRES(rtol=0, atol=0, restart=k, max_steps=2)`
    spends about `k` vector-Jacobian products, and GMRES never ends with a larger
    residual than its start. The gradient is then approximate: pass
    `on_backward_residual` to see how far.

    **Arguments:**

    - `linear_solver`: a matrix-free `lineax` solver (default GMRES). Dense solvers
        such as `lx.LU()` materialise the Jacobian: use them only for small states.
    - `on_backward_residual`: a host function called in every backward pass with
        the relative residual `‖(I − ∂f/∂z)ᵀ w − g‖ / ‖g‖` of the linear solve (once
        per sample under `vmap`), at the cost of one more vector-Jacobian product;
        e.g. `list.append`, to log it.

    ??? cite "Reference"

        ```bibtex
        @inproceedings{bai2019deep,
            title={Deep Equilibrium Models},
            author={Bai, Shaojie and Kolter, J Zico and Koltun, Vladlen},
            booktitle={Advances in Neural Information Processing Systems},
            year={2019}
        }
        ```

    !!! Example

        ```python
        import lineax as lx

        import jax.numpy as jnp
        import revdeq


        def cell(z, x):
            return jnp.tanh(0.5 * z + x)


        z0, x = jnp.zeros(4), jnp.ones(4)

        adjoint = revdeq.ImplicitAdjoint(linear_solver=lx.GMRES(rtol=1e-6, atol=1e-6))
        sol = revdeq.solve(cell, z0, x, solver=revdeq.Anderson(), adjoint=adjoint,
                           max_steps=50)

        residuals = []  # a bounded solve of about 8 VJPs, and how well it did
        bounded = lx.GMRES(rtol=0, atol=0, restart=8, max_steps=2)
        adjoint = revdeq.ImplicitAdjoint(
            bounded, on_backward_residual=residuals.append
        )
        ```
    """

    linear_solver: lx.AbstractLinearSolver = lx.GMRES(
        rtol=1e-5, atol=1e-5, restart=20, stagnation_iters=20, max_steps=200
    )
    on_backward_residual: Callable[[Array], None] | None = eqx.field(
        default=None, static=True
    )

    def apply(
        self,
        fn: Fn,
        solver: AbstractSolver,
        z0: Y,
        args: Args,
        *,
        max_steps: int,
        unroll: bool,
        throw: bool,
    ) -> Iteration:
        # The fixed point does not depend on where the solve started.
        z0 = jax.lax.stop_gradient(z0)
        steps = (max_steps, unroll)
        backward = (self.linear_solver, self.on_backward_residual)
        return _implicit_solve((fn, args), z0, solver, steps, backward, throw)


@eqx.filter_custom_vjp
def _implicit_solve(
    fn_args: tuple[Fn, Args],
    z0: Y,
    solver: AbstractSolver,
    steps: tuple[int, bool],
    backward: tuple[lx.AbstractLinearSolver, Callable[[Array], None] | None],
    throw: bool,
) -> Iteration:
    fn, args = fn_args
    max_steps, unroll = steps
    return iterate(fn, solver, z0, args, max_steps=max_steps, unroll=unroll)


@_implicit_solve.def_fwd
def _implicit_solve_fwd(
    perturbed: Any,
    fn_args: tuple[Fn, Args],
    z0: Y,
    solver: AbstractSolver,
    steps: tuple[int, bool],
    backward: tuple[lx.AbstractLinearSolver, Callable[[Array], None] | None],
    throw: bool,
) -> tuple[Iteration, Y]:
    del perturbed
    out = _implicit_solve.fn(fn_args, z0, solver, steps, backward, throw)
    return out, out.value


@_implicit_solve.def_bwd
def _implicit_solve_bwd(
    z_star: Y,
    grad_obj: Any,
    perturbed: Any,
    fn_args: tuple[Fn, Args],
    z0: Y,
    solver: AbstractSolver,
    steps: tuple[int, bool],
    backward: tuple[lx.AbstractLinearSolver, Callable[[Array], None] | None],
    throw: bool,
) -> PyTree:
    del perturbed, z0, solver, steps
    linear_solver, on_backward_residual = backward
    fn, args = fn_args
    cotangent = tree_zeros_for_none(grad_obj.value, z_star)
    _, vjp_z = jax.vjp(lambda z: fn(z, args), z_star)

    def matvec(w: Y) -> Y:
        return tree_sub(w, vjp_z(w)[0])

    operator = lx.FunctionLinearOperator(matvec, jax.eval_shape(lambda: z_star))
    sol = lx.linear_solve(
        operator, cotangent, linear_solver, options={"y0": cotangent}, throw=False
    )
    if on_backward_residual is not None:
        jax.debug.callback(
            on_backward_residual, relative_residual(cotangent, matvec(sol.value))
        )
    failed = sol.result != lx.RESULTS.successful
    w = report_failure(sol.value, [(failed, _NOT_CONVERGED)], throw)
    _, vjp_fn_args = eqx.filter_vjp(lambda fa: fa[0](z_star, fa[1]), fn_args)
    (grad,) = vjp_fn_args(w)
    return grad
