"""Public but unstable building blocks: the driver loop and its unrolling threshold, the
reversible backward and its pair of states, and the segment protocol of a solver
that sets nothing aside."""

from ._adjoint.reversible import reverse_pass as reverse_pass
from ._iterate import (
    UNROLL_MAX_STEPS as UNROLL_MAX_STEPS,
    Iteration as Iteration,
    iterate as iterate,
)
from ._solver.base import Unsegmented as Unsegmented
from ._solver.reversible import ReversiblePair as ReversiblePair
