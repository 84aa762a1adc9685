from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PyTree, Scalar

from .._custom_types import Args, SolverFn, Y
from .._precision.base import AbstractPrecision, AbstractSegmentedPrecision
from .._precision.exact_state import ExactState
from .._solution import RESULTS
from .._tree import tree_dtype, tree_max_abs, tree_rms, tree_sub
from .base import AbstractSegmentedSolver, AbstractSolverState, ConvergenceState


class ReversiblePair(eqx.Module):
    """The two states `(y, z)` of the reversible iteration, in the representation
    of the solver's precision."""

    y: PyTree
    z: PyTree


class _ReversibleState(AbstractSolverState):
    progress: ConvergenceState
    pair: ReversiblePair
    fz: PyTree
    # The encoded z₀, against which the certificate checks the rebuilt one.
    start: PyTree
    num_steps: Int[Array, ""]


class Reversible(AbstractSegmentedSolver[_ReversibleState]):
    """The reversible fixed-point iteration of RevDEQs.

    With state `(y, z)`, `y₀ = z₀` and `c = 1 − β`, one step is

        y ← c·y + β·f(z)
        z ← c·z + β·f(y)

    and is exactly invertible, so [`revdeq.ReversibleAdjoint`][] can walk it backwards
    and give the exact gradient of the computed output at memory constant in the
    number of steps. Each step evaluates `f` twice; one more evaluation at `z₀` starts
    the iteration, and the last evaluation at `z` makes the reported residual that of
    the returned value.

    **Arguments:**

    - `beta`: relaxation, in (0, 2) and not 1. The paper uses 0.5 for language and
        0.8 for vision. The inverse amplifies errors by `1/|1 − β|` per step.
    - `rtol`, `atol`, `norm`: stop once
      `norm((f(z) − z) / (atol + rtol · |f(z)|)) < 1`, as optimistix does;
      `norm` defaults to the largest magnitude.
    - `precision`: how the state is stored; see [`revdeq.ExactState`][] (default,
        bit-exact reversal) and [`revdeq.FloatState`][].

    ??? cite "Reference"

        ```bibtex
        @article{mccallum2025reversible,
            title={Reversible Deep Equilibrium Models},
            author={McCallum, Sam and Arora, Kamran and Foster, James},
            journal={arXiv preprint arXiv:2509.12917},
            year={2025}
        }
        ```

    !!! Example

        ```python
        import jax.numpy as jnp
        import revdeq


        def cell(z, x):
            return jnp.tanh(0.5 * z + x)


        z0, x = jnp.zeros(4), jnp.ones(4)

        solver = revdeq.Reversible(beta=0.8, rtol=0, atol=0)  # exactly max_steps
        sol = revdeq.solve(cell, z0, x, solver=solver,
                           adjoint=revdeq.ReversibleAdjoint(), max_steps=4)
        ```
    """

    beta: float = eqx.field(converter=float, default=0.8)
    rtol: float = eqx.field(converter=float, default=1e-4)
    atol: float = eqx.field(converter=float, default=1e-6)
    norm: Callable[[PyTree], Scalar] = tree_max_abs
    precision: AbstractPrecision = ExactState()

    def __check_init__(self) -> None:
        if not 0 < self.beta < 2 or self.beta == 1:
            raise ValueError(
                f"`beta` must lie in (0, 2) and differ from 1, got {self.beta}: at 1 "
                "the step cannot be inverted, and outside (0, 2) it does not contract."
            )

    @property
    def effective_beta(self) -> float:
        """The `β` the iteration uses: `beta` itself, unless the precision can only
        reverse a nearby value exactly (see [`revdeq.ExactState`][])."""
        return self.precision.representable_beta(self.beta)

    def init(
        self,
        fn: SolverFn,
        y: Y,
        args: Args,
        options: dict[str, Any],
        f_struct: PyTree[jax.ShapeDtypeStruct],
        aux_struct: PyTree[jax.ShapeDtypeStruct],
        tags: frozenset[object],
    ) -> _ReversibleState:
        del f_struct, aux_struct, tags
        fz0, _ = fn(y, args)
        # Drivers other than revdeq's (optimistix's) do not say whether they
        # differentiate the loop: assume they do, so that no gradient is lost.
        differentiable = options.get("differentiable", True)
        state = self.precision.encode(y, fz0, self.effective_beta, differentiable)
        # The first step uses f at the true z₀; the backward pass evaluates f there
        # too. The certificate compares against the encoded z₀.
        start = self.precision.decode(state)
        progress = self.progress(fz0, y, ConvergenceState.initial(tree_dtype(y)), 1)
        pair = ReversiblePair(state, state)
        return _ReversibleState(progress, pair, fz0, start, jnp.array(0))

    def step(
        self,
        fn: SolverFn,
        y: Y,
        args: Args,
        options: dict[str, Any],
        state: _ReversibleState,
        tags: frozenset[object],
    ) -> tuple[Y, _ReversibleState, Any]:
        del y, options, tags
        beta, step = self.effective_beta, state.num_steps
        ys = self.precision.forward(state.pair.y, state.fz, beta, step)
        fy, _ = fn(self.precision.decode(ys), args)
        zs = self.precision.forward(state.pair.z, fy, beta, step)
        z = self.precision.decode(zs)
        fz, aux = fn(z, args)
        progress = self.progress(fz, z, state.progress, 2)
        pair = ReversiblePair(ys, zs)
        return z, _ReversibleState(progress, pair, fz, state.start, step + 1), aux

    # The inverse of `step`, half by half, for a backward pass that evaluates `f`
    # itself (in VJPs): first `undo_z` with `f` at `pair.y`, then `undo_y` with `f`
    # at the rebuilt `pair.z` (at the true z₀ when undoing step 0).

    def undo_z(
        self, pair: ReversiblePair, fy: PyTree, step: Int[Array, ""] | int
    ) -> ReversiblePair:
        """Undo `z ← (1 − β)·z + β·f(y)` of forward step `step`, given
        `fy = f(decode(pair.y))`."""
        z = self.precision.reverse(pair.z, fy, self.effective_beta, step)
        return ReversiblePair(pair.y, z)

    def undo_y(
        self, pair: ReversiblePair, fz: PyTree, step: Int[Array, ""] | int
    ) -> ReversiblePair:
        """Undo `y ← (1 − β)·y + β·f(z)` of forward step `step`, given
        `fz = f(decode(pair.z))` at the `z` that `undo_z` rebuilt."""
        y = self.precision.reverse(pair.y, fz, self.effective_beta, step)
        return ReversiblePair(y, pair.z)

    def decode(self, states: PyTree) -> PyTree:
        """The value `f` sees of one state of a pair, such as `pair.y`."""
        return self.precision.decode(states)

    def final_pair(self, state: _ReversibleState) -> ReversiblePair:
        """The pair a finished solve ends on, from which a backward pass starts."""
        return state.pair

    def reconstruction_drift(
        self, state: _ReversibleState, rebuilt: ReversiblePair
    ) -> Float[Array, ""]:
        """The certificate: the relative drift `rms(rebuilt − z₀) / rms(output)` of
        the pair a backward pass rebuilt, against the encoded z₀ of `state`, the
        final state of the solve."""
        output = self.decode(state.pair.z)
        err = jnp.maximum(
            tree_rms(tree_sub(self.decode(rebuilt.y), state.start)),
            tree_rms(tree_sub(self.decode(rebuilt.z), state.start)),
        )
        scale = tree_rms(output)
        return err / jnp.maximum(scale, jnp.finfo(scale.dtype).tiny)

    def representation_status(self, state: _ReversibleState) -> RESULTS:
        """Whether the precision held the states of the solve faithfully."""
        return self.precision.status((state.pair.y, state.pair.z))

    def segment_length(self, max_steps: int) -> int:
        precision = self.precision
        if isinstance(precision, AbstractSegmentedPrecision):
            return precision.segment_length(self.effective_beta, max_steps)
        return max_steps

    def archive(self, state: _ReversibleState) -> ReversiblePair | None:
        precision = self.precision
        if isinstance(precision, AbstractSegmentedPrecision):
            pair = state.pair
            return ReversiblePair(precision.archive(pair.y), precision.archive(pair.z))
        return None

    def finish(
        self,
        state: _ReversibleState,
        archived: ReversiblePair | None,
        result: RESULTS,
    ) -> tuple[_ReversibleState, RESULTS]:
        precision = self.precision
        if isinstance(precision, AbstractSegmentedPrecision) and archived is not None:
            y = precision.restore(state.pair.y, archived.y)
            z = precision.restore(state.pair.z, archived.z)
            state = eqx.tree_at(lambda s: s.pair, state, ReversiblePair(y, z))
        # Checked once: a lost state stays lost until the loop ends. A loop that
        # stopped on a non-finite residual has already named the likelier cause.
        status = self.representation_status(state)
        keep = (status == RESULTS.successful) | (result == RESULTS.nonfinite_value)
        return state, RESULTS.where(keep, result, status)
