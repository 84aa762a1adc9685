import abc
import warnings

import equinox as eqx
import jax

from .._custom_types import Args, Fn, Y
from .._iterate import Iteration
from .._solver.base import AbstractSolver


class AbstractAdjoint(eqx.Module):
    """How gradients flow back through a fixed-point solve.

    An adjoint runs the driver loop ([`revdeq.internal.iterate`][]) and wraps it in
    its gradient rule.
    """

    @abc.abstractmethod
    def apply(
        self,
        fn: Fn,
        solver: AbstractSolver,
        z0: Y,
        args: Args,
        *,
        max_steps: int,
        throw: bool,
    ) -> Iteration:
        """Solve, with this adjoint's rule for the gradient of `Iteration.value`."""


def report_failure(value, failed, message: str, throw: bool):
    """Raise `message` when `failed` under `throw`, else warn at run time.

    Gradient rules have no result code to return, so this is how a backward pass
    reports a problem: never silently.
    """
    if throw:
        return eqx.error_if(value, failed, message)
    jax.debug.callback(_warn_if, failed, message)
    return value


def _warn_if(failed, message):
    if failed:
        warnings.warn(message, RuntimeWarning, stacklevel=2)
