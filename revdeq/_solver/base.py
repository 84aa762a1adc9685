import abc
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import optimistix as optx
from jaxtyping import Array, Bool, DTypeLike, Int, PyTree, Scalar

from .._custom_types import Args, SolverFn, Y
from .._solution import RESULTS
from .._tree import relative_residual, tree_sub


# An error this many times the best one seen so far means the iteration diverged.
_DIVERGENCE_FACTOR = 1e4


class ConvergenceState(eqx.Module):
    """The convergence record that every solver state carries as `progress`, and
    that the driver reads. A solver starts it with `ConvergenceState.initial` and
    updates it with [`revdeq.AbstractSolver`][]'s `progress` after each evaluation
    of `f`.

    **Attributes:**

    - `residual`: `‖f(z) − z‖ / ‖f(z)‖` at the last evaluated iterate.
    - `error`: the solver's `norm(f(z) − z)` there.
    - `best_error`: the smallest error so far, but not below the rounding of `f(z)`
        itself (noise at that level after convergence is not divergence).
    - `converged`: whether the tolerances are met.
    - `num_fn_evals`: evaluations of `f` so far.
    """

    residual: Scalar
    error: Scalar
    best_error: Scalar
    converged: Bool[Array, ""]
    num_fn_evals: Int[Array, ""]

    @classmethod
    def initial(cls, dtype: DTypeLike) -> "ConvergenceState":
        """The record before any evaluation: errors infinite, nothing counted."""
        inf = jnp.array(jnp.inf, dtype)
        return cls(inf, inf, inf, jnp.array(False), jnp.array(0))


class AbstractSolverState(eqx.Module):
    """The state of a revdeq solver: whatever it carries from step to step, with
    its convergence record as `progress`."""

    progress: eqx.AbstractVar[ConvergenceState]


_State = TypeVar("_State", bound=AbstractSolverState)


class AbstractSolver(optx.AbstractFixedPointSolver, Generic[_State]):
    """Base of the forward solvers: an `optimistix.AbstractFixedPointSolver` whose
    state carries a `ConvergenceState` as `.progress`.

    Convergence is optimistix's test, `norm((f(z) − z) / (atol + rtol · |f(z)|)) < 1`
    elementwise, so the same `rtol`, `atol` and `norm` stop a revdeq solver where
    they stop `optimistix.FixedPointIteration`. An element with `f(z) = z` exactly
    counts as converged even where its scale is zero. `rtol = atol = 0` runs exactly
    `max_steps` steps.

    Every solver runs through `optimistix.fixed_point`, whose adjoints
    differentiate the solution rather than the path. The iterates of
    [`revdeq.Anderson`][] and [`revdeq.Broyden`][] are not smooth functions of the
    input (the step at which a tolerance is met can change, and so can the
    least-squares or quasi-Newton history), so differentiate them implicitly, not
    by unrolling.

    A solver implements optimistix's `init` and `step`, with a state that
    subclasses [`revdeq.AbstractSolverState`][] (see "Writing a solver" in the
    solvers guide). One that sets data aside as its loop runs is an
    [`revdeq.internal.AbstractSegmentedSolver`][].
    """

    rtol: eqx.AbstractVar[float]
    atol: eqx.AbstractVar[float]
    norm: eqx.AbstractVar[Callable[[PyTree], Scalar]]

    def __check_init__(self) -> None:
        # Equinox calls it for every solver, beside each subclass's own check.
        if self.rtol < 0:
            raise ValueError(f"`rtol` must be >= 0, got {self.rtol}.")
        if self.atol < 0:
            raise ValueError(f"`atol` must be >= 0, got {self.atol}.")

    @property
    def fixed_steps(self) -> bool:
        """Whether every solve runs exactly `max_steps` steps (`rtol = atol = 0`),
        barring failure: the step budget is then the whole plan."""
        return self.rtol == 0 and self.atol == 0

    def progress(
        self, fz: Y, z: Y, previous: ConvergenceState, new_evals: int
    ) -> ConvergenceState:
        """The convergence record `previous`, updated for the iterate `z` whose
        image `fz` was just computed with `new_evals` evaluations of `f`."""
        difference = tree_sub(fz, z)
        error = self.norm(difference)
        rounding = jnp.finfo(error.dtype).eps * self.norm(fz)
        return ConvergenceState(
            relative_residual(fz, z),
            error,
            jnp.minimum(previous.best_error, jnp.maximum(error, rounding)),
            self._converged(difference, fz),
            previous.num_fn_evals + new_evals,
        )

    def _converged(self, difference: Y, fz: Y) -> Bool[Array, ""]:
        if self.fixed_steps:
            return jnp.array(False)

        def scaled(d, f):
            scale = self.atol + self.rtol * jnp.abs(f)
            positive = scale > 0
            # No 0/0 is ever formed, so `jax_debug_nans` stays quiet.
            ratio = jnp.abs(d) / jnp.where(positive, scale, 1)
            return jnp.where(positive, ratio, jnp.where(d == 0, 0, jnp.inf))

        return self.norm(jtu.tree_map(scaled, difference, fz)) < 1

    def terminate(
        self,
        fn: SolverFn,
        y: Y,
        args: Args,
        options: dict[str, Any],
        state: AbstractSolverState,
        tags: frozenset[object],
    ) -> tuple[Bool[Array, ""], optx.RESULTS]:
        del fn, y, args, options, tags
        p = state.progress
        finite = jnp.isfinite(p.error) | (p.num_fn_evals == 0)
        diverged = p.error > _DIVERGENCE_FACTOR * p.best_error
        result = optx.RESULTS.where(
            finite,
            optx.RESULTS.where(
                diverged, optx.RESULTS.nonlinear_divergence, optx.RESULTS.successful
            ),
            optx.RESULTS.nonfinite,
        )
        return p.converged | ~finite | diverged, result

    def postprocess(
        self,
        fn: SolverFn,
        y: Y,
        aux: Any,
        args: Args,
        options: dict[str, Any],
        state: AbstractSolverState,
        tags: frozenset[object],
        result: optx.RESULTS,
    ) -> tuple[Y, Any, dict[str, Any]]:
        del fn, args, options, state, tags, result
        return y, aux, {}

    @abc.abstractmethod
    def init(
        self,
        fn: SolverFn,
        y: Y,
        args: Args,
        options: dict[str, Any],
        f_struct: PyTree[jax.ShapeDtypeStruct],
        aux_struct: PyTree[jax.ShapeDtypeStruct],
        tags: frozenset[object],
    ) -> _State: ...

    @abc.abstractmethod
    def step(
        self,
        fn: SolverFn,
        y: Y,
        args: Args,
        options: dict[str, Any],
        state: _State,
        tags: frozenset[object],
    ) -> tuple[Y, _State, Any]: ...


class AbstractSegmentedSolver(AbstractSolver[_State]):
    """A solver whose state grows as its loop runs, and which sets that data aside
    rather than carry it: the driver runs its loop in segments, stacks what
    `archive` returns at the end of each outside the loop's carry, and hands the
    stack back to `finish`. [`revdeq.Reversible`][] is one, for the information
    buffer of [`revdeq.ExactState`][].
    """

    @abc.abstractmethod
    def segment_length(self, max_steps: int) -> int:
        """The driver runs the loop in segments of this many steps, and after each
        one stacks what `archive` sets aside from the state."""

    @abc.abstractmethod
    def archive(self, state: _State) -> PyTree:
        """What to set aside from `state` at the end of a segment.

        Data that only grows, kept outside the loop's carry: under `vmap` a batched
        loop selects between old and new carries in every step, at a cost that
        would grow with the data.
        """

    @abc.abstractmethod
    def finish(
        self, state: _State, archived: PyTree, result: RESULTS
    ) -> tuple[_State, RESULTS]:
        """The final state, given the stacked archive (`None` when the loop was not
        segmented, as when it is differentiated through), and the result to report
        for a loop that ended with `result`."""
