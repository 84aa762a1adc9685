"""Public but unstable building blocks: the driver loop and the reversible backward."""

from ._adjoint.reversible import reverse_pass as reverse_pass
from ._iterate import Iteration as Iteration, iterate as iterate
