import equinox as eqx

from .._custom_types import Args, Fn, Y
from .._iterate import Iteration, iterate
from .._solver.base import AbstractSolver
from .._tree import tree_lerp, tree_stop_gradient
from .base import AbstractAdjoint


class PhantomAdjoint(AbstractAdjoint):
    """Phantom gradients: solve without gradient, then backpropagate through `steps`
    damped iterations `z ← (1 − damping) z + damping f(z)` started at the solution.

    `steps=1, damping=1` is Jacobian-free backpropagation. As `steps` grows (with
    `damping` small enough for the iteration to contract) the gradient tends to the
    implicit one. The returned value is the result of those extra iterations, and
    their evaluations are counted in `num_fn_evals`. The gradient with respect to
    `z0` is zero.

    **Arguments:**

    - `steps`: the number of differentiated iterations, at least 1.
    - `damping`: the weight of `f(z)` in each, in (0, 1].

    ??? cite "References"

        ```bibtex
        @inproceedings{geng2021training,
            title={On Training Implicit Models},
            author={Geng, Zhengyang and Zhang, Xin-Yu and Bai, Shaojie and Wang, Yisen
                    and Lin, Zhouchen},
            booktitle={Advances in Neural Information Processing Systems},
            year={2021}
        }
        @inproceedings{fung2022jfb,
            title={JFB: Jacobian-free backpropagation for implicit networks},
            author={Fung, Samy Wu and Heaton, Howard and Li, Qiuwei and McKenzie,
                    Daniel and Osher, Stanley and Yin, Wotao},
            booktitle={AAAI Conference on Artificial Intelligence},
            year={2022}
        }
        ```

    !!! Example

        ```python
        import jax.numpy as jnp
        import revdeq


        def cell(z, x):
            return jnp.tanh(0.5 * z + x)


        z0, x = jnp.zeros(4), jnp.ones(4)

        adjoint = revdeq.PhantomAdjoint(steps=5, damping=0.5)
        sol = revdeq.solve(cell, z0, x, solver=revdeq.Anderson(), adjoint=adjoint,
                           max_steps=20)
        ```
    """

    steps: int = 1
    damping: float = eqx.field(converter=float, default=1.0)

    def __check_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"`steps` must be >= 1, got {self.steps}.")
        if not 0 < self.damping <= 1:
            raise ValueError(f"`damping` must lie in (0, 1], got {self.damping}.")

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
        del throw
        solved = iterate(
            *tree_stop_gradient((fn, solver, z0, args)),
            max_steps=max_steps,
            unroll=unroll,
        )
        z = solved.value
        for _ in range(self.steps):
            z = tree_lerp(self.damping, z, fn(z, args))
        return Iteration(
            z, solved.state, solved.num_steps, solved.result, extra_fn_evals=self.steps
        )
