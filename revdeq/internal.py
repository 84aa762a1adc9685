"""Public but unstable building blocks: the driver loop and its unrolling threshold, the
reversible backward and its pair of states, and the base of a solver whose loop
runs in segments."""

from ._adjoint.reversible import reverse_pass as reverse_pass
from ._iterate import (
    UNROLL_MAX_STEPS as UNROLL_MAX_STEPS,
    Iteration as Iteration,
    iterate as iterate,
)
from ._solver.base import AbstractSegmentedSolver as AbstractSegmentedSolver
from ._solver.reversible import ReversiblePair as ReversiblePair
