import optax


def make_optimiser(
    learning_rate: float,
    *,
    total_steps: int,
    warmup_steps: int = 0,
    weight_decay: float = 0.0,
    clip_norm: float | None = 1.0,
    final_learning_rate: float = 0.0,
) -> optax.GradientTransformation:
    """Build AdamW with linear warmup, cosine decay and global-norm clipping.

    The learning rate rises linearly from 0 to `learning_rate` over `warmup_steps`,
    then follows a cosine down to `final_learning_rate` at `total_steps`, and stays
    there. Gradients are clipped to a global norm of `clip_norm` before AdamW.

    **Arguments:**

    - `learning_rate`: the peak learning rate, reached at the end of warmup.
    - `total_steps`: the length of the schedule in steps, warmup included.
    - `warmup_steps`: the number of linear warmup steps.
    - `weight_decay`: AdamW's decoupled weight decay.
    - `clip_norm`: the maximum global norm of the gradients; `None` for no clipping.
    - `final_learning_rate`: the learning rate at the end of the cosine.

    **Returns:**

    An Optax gradient transformation.

    !!! Example

        ```python
        import revdeq


        optimiser = revdeq.train.make_optimiser(
            3e-4, total_steps=10_000, warmup_steps=500, weight_decay=0.01
        )
        ```
    """
    if learning_rate <= 0:
        raise ValueError(f"`learning_rate` must be positive, got {learning_rate}.")
    if total_steps < 1:
        raise ValueError(f"`total_steps` must be at least 1, got {total_steps}.")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(
            f"`warmup_steps` must lie in [0, total_steps={total_steps}], got "
            f"{warmup_steps}."
        )
    if weight_decay < 0:
        raise ValueError(f"`weight_decay` must be non-negative, got {weight_decay}.")
    if clip_norm is not None and clip_norm <= 0:
        raise ValueError(f"`clip_norm` must be positive or None, got {clip_norm}.")
    if not 0 <= final_learning_rate <= learning_rate:
        raise ValueError(
            "`final_learning_rate` must lie in [0, learning_rate="
            f"{learning_rate}], got {final_learning_rate}."
        )
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=learning_rate,
        warmup_steps=warmup_steps,
        decay_steps=total_steps,
        end_value=final_learning_rate,
    )
    adamw = optax.adamw(schedule, weight_decay=weight_decay)
    if clip_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(clip_norm), adamw)
