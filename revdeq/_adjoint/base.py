import abc
import functools
import warnings
from collections.abc import Sequence
from typing import TypeVar

import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Int

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
        unroll: bool,
        throw: bool,
    ) -> Iteration:
        """Solve, with this adjoint's rule for the gradient of `Iteration.value`.

        `unroll` is the loop form that [`revdeq.internal.iterate`][] takes.
        """


_T = TypeVar("_T")


def report_failure(value: _T, failures: Sequence[tuple[Array, str]], throw: bool) -> _T:
    """For the first `(failed, message)` of `failures` that failed, raise `message`
    under `throw`, else warn at run time.

    Gradient rules have no result code to return, so this is how a backward pass
    reports a problem: never silently. All failures share one check, and so one host
    callback, which is called only when a check failed (in any sample of a batch):
    on a small training step, a call to the host every time costs several times
    the step itself.
    """
    failed = jnp.stack([f for f, _ in failures])
    index = jnp.argmax(failed)
    messages = tuple(m for _, m in failures)
    if throw:
        return eqx.branched_error_if(value, jnp.any(failed), index, messages)
    warn = functools.partial(_warn_if, messages)
    jax.lax.cond(
        eqxi.unvmap_any(jnp.any(failed)),
        lambda: jax.debug.callback(warn, failed, index),
        lambda: None,
    )
    return value


def _warn_if(
    messages: tuple[str, ...], failed: Bool[Array, " n"], index: Int[Array, ""]
) -> None:
    if failed.any():
        warnings.warn(messages[int(index)], RuntimeWarning, stacklevel=2)
