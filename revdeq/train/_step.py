from collections.abc import Callable

import equinox as eqx
import optax
from jaxtyping import ArrayLike, PRNGKeyArray, PyTree, Scalar


# `loss_fn(model, batch, key) -> (loss, metrics)`.
LossFn = Callable[[PyTree, PyTree, PRNGKeyArray], tuple[Scalar, dict[str, ArrayLike]]]
# `step(model, opt_state, batch, key) -> (model, opt_state, metrics)`.
StepFn = Callable[
    [PyTree, optax.OptState, PyTree, PRNGKeyArray],
    tuple[PyTree, optax.OptState, dict[str, ArrayLike]],
]


def init_optimiser(
    optimiser: optax.GradientTransformation, model: PyTree
) -> optax.OptState:
    """Initialise an optimiser's state on the trainable arrays of a model.

    The trainable arrays are the floating-point array leaves,
    `eqx.filter(model, eqx.is_inexact_array)`: the same ones that
    [`revdeq.train.make_step`][] differentiates and updates.

    **Arguments:**

    - `optimiser`: an Optax gradient transformation.
    - `model`: an Equinox model, or any PyTree with array leaves.

    **Returns:**

    The optimiser state.

    !!! Example

        ```python
        import equinox as eqx
        import jax
        import optax
        import revdeq


        model = eqx.nn.Linear(4, 3, key=jax.random.key(0))

        optimiser = optax.adamw(1e-3)
        opt_state = revdeq.train.init_optimiser(optimiser, model)
        ```
    """
    return optimiser.init(eqx.filter(model, eqx.is_inexact_array))


def make_step(loss_fn: LossFn, optimiser: optax.GradientTransformation) -> StepFn:
    """Build a jitted training step: differentiate, update, apply.

    The step differentiates `loss_fn` with respect to the floating-point arrays of
    the model, turns the gradients into updates with `optimiser`, and applies them.
    It is wrapped in `eqx.filter_jit`, so non-array parts of the model are static. It
    works unchanged on sharded inputs; see [`revdeq.train.DataParallel`][].

    **Arguments:**

    - `loss_fn`: a function `loss_fn(model, batch, key) -> (loss, metrics)` returning
        a scalar loss and a dict of scalar metrics to report, e.g. accuracy.
    - `optimiser`: an Optax gradient transformation, e.g. from
        [`revdeq.train.make_optimiser`][].

    **Returns:**

    A function `step(model, opt_state, batch, key) -> (model, opt_state, metrics)`.
    `metrics` holds `loss_fn`'s metrics plus `"loss"` and `"grad_norm"` (the global
    norm of the gradients, before any clipping).

    !!! Example

        ```python
        import equinox as eqx
        import jax
        import jax.numpy as jnp
        import optax
        import revdeq


        model = eqx.nn.Linear(4, 3, key=jax.random.key(0))

        batch = (jnp.ones((8, 4)), jnp.zeros(8, jnp.int32))
        key = jax.random.key(1)


        def loss_fn(model, batch, key):
            x, y = batch
            logits = jax.vmap(model)(x)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return loss, {"accuracy": (logits.argmax(-1) == y).mean()}


        optimiser = revdeq.train.make_optimiser(1e-3, total_steps=1000)
        opt_state = revdeq.train.init_optimiser(optimiser, model)
        step = revdeq.train.make_step(loss_fn, optimiser)
        model, opt_state, metrics = step(model, opt_state, batch, key)
        ```
    """
    value_and_grad = eqx.filter_value_and_grad(loss_fn, has_aux=True)

    @eqx.filter_jit
    def step(
        model: PyTree, opt_state: optax.OptState, batch: PyTree, key: PRNGKeyArray
    ) -> tuple[PyTree, optax.OptState, dict[str, ArrayLike]]:
        (loss, metrics), grads = value_and_grad(model, batch, key)
        updates, opt_state = optimiser.update(
            grads, opt_state, eqx.filter(model, eqx.is_inexact_array)
        )
        model = eqx.apply_updates(model, updates)
        metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads)}
        return model, opt_state, metrics

    return step


def make_eval_step(
    metric_fn: Callable[[PyTree, PyTree], dict[str, ArrayLike]],
) -> Callable[[PyTree, PyTree], dict[str, ArrayLike]]:
    """Build a jitted evaluation step.

    **Arguments:**

    - `metric_fn`: a function `metric_fn(model, batch) -> metrics` returning a dict
        of scalar metrics.

    **Returns:**

    `metric_fn` wrapped in `eqx.filter_jit`.

    !!! Example

        ```python
        import equinox as eqx
        import jax
        import jax.numpy as jnp
        import revdeq


        model = eqx.nn.Linear(4, 3, key=jax.random.key(0))

        test_batches = [(jnp.ones((8, 4)), jnp.zeros(8, jnp.int32))] * 2


        def metric_fn(model, batch):
            x, y = batch
            return {"accuracy": (jax.vmap(model)(x).argmax(-1) == y).mean()}


        eval_step = revdeq.train.make_eval_step(metric_fn)
        accuracies = [eval_step(model, batch)["accuracy"] for batch in test_batches]
        accuracy = jnp.mean(jnp.array(accuracies))
        ```
    """
    return eqx.filter_jit(metric_fn)
