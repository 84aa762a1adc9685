"""Public but unstable building blocks: the driver loop, the reversible backward, and
the segment protocol of a solver that sets nothing aside."""

from ._adjoint.reversible import reverse_pass as reverse_pass
from ._iterate import Iteration as Iteration, iterate as iterate
from ._solver.base import Unsegmented as Unsegmented
