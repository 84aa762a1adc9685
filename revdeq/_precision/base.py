"""The interface of a state representation for the reversible iteration."""

import abc

import equinox as eqx
from jaxtyping import Array, Int, PyTree

from .._custom_types import Y
from .._solution import RESULTS


class AbstractPrecision(eqx.Module):
    """A state representation for [`revdeq.Reversible`][].

    It owns both halves of the update: `forward` computes `(1 − β)·state + β·fval`,
    and `reverse`, beside it, undoes it given the same (or, within the policy's
    tolerance, nearly the same) `fval`.
    """

    # Whether the reconstruction is bit for bit.
    bit_exact: eqx.AbstractClassVar[bool]

    @abc.abstractmethod
    def representable_beta(self, beta: float) -> float:
        """The β this representation uses in place of `beta`."""

    @abc.abstractmethod
    def encode(self, z0: Y, fz0: Y, beta: float, differentiable: bool) -> PyTree:
        """The representation of `z0`, given its image `fz0 = f(z0)`.

        With `differentiable=True` the loop is differentiated by autodiff (as by
        [`revdeq.UnrolledAdjoint`][]), so the decoded values must carry the tangents
        of the float iteration; otherwise the state is only ever reversed.
        """

    @abc.abstractmethod
    def forward(
        self, state: PyTree, fval: Y, beta: float, step: Int[Array, ""] | int
    ) -> PyTree:
        """`(1 − β)·state + β·fval`, as the `step`-th update (from 0) of `state`."""

    @abc.abstractmethod
    def reverse(
        self, state: PyTree, fval: Y, beta: float, step: Int[Array, ""] | int
    ) -> PyTree:
        """The inverse of the `step`-th `forward`: `(state − β·fval) / (1 − β)`.

        The step is an argument rather than part of `state`, so that a batched
        reverse loop can share one unbatched counter across its samples.
        """

    @abc.abstractmethod
    def decode(self, state: PyTree) -> Y:
        """The value `f` sees, in the dtypes of `z0`."""

    @abc.abstractmethod
    def status(self, state: PyTree) -> RESULTS:
        """`RESULTS.successful` if the representation has held `state` (a pytree of
        states) faithfully throughout, and otherwise why not.

        Asked once, after the loop, so a state that is lost must stay lost: checking
        in every step would cost a reduction per step, and the loop's result code,
        not an early stop, is what reports the failure.
        """


class AbstractSegmentedPrecision(AbstractPrecision):
    """A representation whose state grows with the steps taken, and which sets that
    growth aside rather than carry it through the loop: [`revdeq.Reversible`][] then
    runs its loop in segments (see [`revdeq.internal.AbstractSegmentedSolver`][]).
    [`revdeq.ExactState`][] is one, for its information buffer.
    """

    @abc.abstractmethod
    def segment_length(self, beta: float, max_steps: int) -> int:
        """How many steps the driver runs between calls to `archive`."""

    @abc.abstractmethod
    def archive(self, state: PyTree) -> PyTree:
        """What to set aside at the end of a segment; the driver stacks it."""

    @abc.abstractmethod
    def restore(self, state: PyTree, archived: PyTree) -> PyTree:
        """The final state joined with its stacked archive, ready to reverse."""
