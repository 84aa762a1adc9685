import equinox as eqx
import jax.tree_util as jtu
from jaxtyping import PyTree


def count_parameters(model: PyTree) -> int:
    """The number of trainable scalars in `model`.

    **Arguments:**

    - `model`: any pytree, typically an `eqx.Module`.

    **Returns:**

    The total size of its floating-point array leaves (`eqx.is_inexact_array`).

    !!! Example

        ```python
        import equinox as eqx
        import jax
        import revdeq


        linear = eqx.nn.Linear(3, 4, key=jax.random.key(0))
        revdeq.nn.count_parameters(linear)  # 3 * 4 weights + 4 biases = 16
        ```
    """
    params = eqx.filter(model, eqx.is_inexact_array)
    return sum(leaf.size for leaf in jtu.tree_leaves(params))
