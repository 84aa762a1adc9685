import abc
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax.numpy as jnp
import optimistix as optx
from jaxtyping import Array, Bool, Int, PyTree, Scalar

from .._tree import relative_residual, tree_sub


# An error this many times the best one seen so far means the iteration diverged.
_DIVERGENCE_FACTOR = 1e4


class ConvergenceState(eqx.Module):
    """The part of every solver state that the driver reads."""

    residual: Scalar  # ‖f(z) − z‖ / ‖f(z)‖ at the last evaluated iterate
    error: Scalar  # norm(f(z) − z) at the last evaluated iterate
    best_error: Scalar
    converged: Bool[Array, ""]
    num_fn_evals: Int[Array, ""]
    # False once the solver's state representation no longer holds the iterate.
    in_range: Bool[Array, ""]


def no_progress(dtype) -> ConvergenceState:
    inf = jnp.array(jnp.inf, dtype)
    return ConvergenceState(
        inf, inf, inf, jnp.array(False), jnp.array(0), jnp.array(True)
    )


def check_tolerances(solver) -> None:
    if solver.rtol < 0:
        raise ValueError(f"`rtol` must be >= 0, got {solver.rtol}.")
    if solver.atol < 0:
        raise ValueError(f"`atol` must be >= 0, got {solver.atol}.")


class AbstractSolver(optx.AbstractFixedPointSolver):
    """Base of the forward solvers: an `optimistix.AbstractFixedPointSolver` whose
    state carries a `ConvergenceState` as `.progress`.

    Convergence is `rms(f(z) − z) < atol + rtol · rms(f(z))`; the strict inequality
    means `rtol = atol = 0` runs exactly `max_steps` steps.
    """

    rtol: eqx.AbstractVar[float]
    atol: eqx.AbstractVar[float]
    norm: eqx.AbstractVar[Callable[[PyTree], Scalar]]

    def progress(
        self, fz, z, previous: ConvergenceState, new_evals, in_range=True
    ) -> ConvergenceState:
        """Convergence bookkeeping for the iterate `z` whose image `fz` is known."""
        error = self.norm(tree_sub(fz, z))
        converged = error < self.atol + self.rtol * self.norm(fz)
        return ConvergenceState(
            relative_residual(fz, z),
            error,
            jnp.minimum(previous.best_error, error),
            converged,
            previous.num_fn_evals + new_evals,
            jnp.asarray(in_range),
        )

    def terminate(self, fn, y, args, options, state, tags):
        del fn, y, args, options, tags
        p = state.progress
        finite = jnp.isfinite(p.error) | (p.num_fn_evals == 0)
        diverged = (p.error > _DIVERGENCE_FACTOR * p.best_error) | ~p.in_range
        result = optx.RESULTS.where(
            finite,
            optx.RESULTS.where(
                diverged, optx.RESULTS.nonlinear_divergence, optx.RESULTS.successful
            ),
            optx.RESULTS.nonfinite,
        )
        return p.converged | ~finite | diverged, result

    def postprocess(self, fn, y, aux, args, options, state, tags, result):
        del fn, aux, args, options, state, tags, result
        return y, None, {}

    @abc.abstractmethod
    def init(self, fn, y, args, options, f_struct, aux_struct, tags) -> Any: ...

    @abc.abstractmethod
    def step(self, fn, y, args, options, state, tags) -> tuple[Any, Any, Any]: ...
