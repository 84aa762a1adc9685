from collections.abc import Iterator

import jax
import numpy as np
from jaxtyping import Float32, Int32, Integer, PRNGKeyArray, UInt8


def _batch_indices(
    num_examples: int,
    batch_size: int,
    key: PRNGKeyArray | None,
    shuffle: bool,
    drop_last: bool,
    start: int,
    what: str,
) -> Iterator[np.ndarray]:
    """Check the batching arguments now; return the per-batch example indices."""
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be at least 1, got {batch_size}.")
    if start < 0:
        raise ValueError(f"`start` must be non-negative, got {start}.")
    if shuffle:
        if key is None:
            raise ValueError("`key` is required when `shuffle=True`.")
        order = np.asarray(jax.random.permutation(key, num_examples))
    else:
        order = np.arange(num_examples)
    stop = num_examples - num_examples % batch_size if drop_last else num_examples
    if stop == 0:
        raise ValueError(
            f"{num_examples} {what} make no batch of `batch_size`={batch_size}."
        )
    return (
        order[begin : begin + batch_size]
        for begin in range(start * batch_size, stop, batch_size)
    )


def image_batches(
    images: UInt8[np.ndarray, "num_examples height width *channels"],
    labels: Integer[np.ndarray, " num_examples"],
    batch_size: int,
    *,
    key: PRNGKeyArray | None = None,
    shuffle: bool = True,
    drop_last: bool = True,
    start: int = 0,
) -> Iterator[
    tuple[
        Float32[np.ndarray, "batch height width channels"], Int32[np.ndarray, " batch"]
    ]
]:
    """Iterate once over an image dataset in (shuffled) minibatches.

    Images are channels-last: one example has shape `(height, width, channels)`, and
    greyscale images of shape `(N, height, width)` gain a trailing channel axis of
    size 1. Pixels are scaled from `0..255` to floats in `[0, 1]`. The order of one
    pass is a function of `key` only, so a pass can be resumed exactly with `start`.

    **Arguments:**

    - `images`: `uint8` images of shape `(N, height, width)` or
        `(N, height, width, channels)`.
    - `labels`: integer labels of shape `(N,)`.
    - `batch_size`: the number of examples per batch.
    - `key`: a PRNG key that fixes the order of examples; required when `shuffle`.
    - `shuffle`: whether to permute the examples; if `False` they keep their order.
    - `drop_last`: whether to drop the final batch when it is smaller than
        `batch_size`.
    - `start`: the index of the first batch to yield, to resume a pass midway.

    **Returns:**

    An iterator over `(images, labels)` NumPy batches: `float32` images of shape
    `(batch, height, width, channels)` and `int32` labels of shape `(batch,)`.

    !!! Example

        ```python
        import jax
        import numpy as np
        import revdeq


        # Or `images, labels = revdeq.data.load_fashion_mnist()["train"]`.
        images, labels = np.zeros((1000, 28, 28), np.uint8), np.zeros(1000, np.int32)
        data_key = jax.random.key(0)
        for epoch in range(2):
            key = jax.random.fold_in(data_key, epoch)
            for x, y in revdeq.data.image_batches(images, labels, 128, key=key):
                ...  # x: (128, 28, 28, 1) float32, y: (128,) int32
        ```
    """
    if images.ndim == 3:
        images = images[..., None]
    indices = _batch_indices(
        len(images), batch_size, key, shuffle, drop_last, start, what="images"
    )
    return (
        (images[i].astype(np.float32) / 255, labels[i].astype(np.int32))
        for i in indices
    )


def sequence_batches(
    tokens: Integer[np.ndarray, " num_tokens"],
    seq_len: int,
    batch_size: int,
    *,
    key: PRNGKeyArray | None = None,
    shuffle: bool = True,
    drop_last: bool = True,
    start: int = 0,
) -> Iterator[
    tuple[Int32[np.ndarray, "batch seq_len"], Int32[np.ndarray, "batch seq_len"]]
]:
    """Iterate once over a token stream in (shuffled) next-token prediction batches.

    The stream is cut into consecutive windows of `seq_len + 1` tokens starting every
    `seq_len` tokens, so every token is an input exactly once per pass. Each window
    gives an input (its first `seq_len` tokens) and a target (its last `seq_len`
    tokens): targets are the inputs shifted left by one. The order of windows in one
    pass is a function of `key` only, so a pass can be resumed exactly with `start`.

    **Arguments:**

    - `tokens`: a one-dimensional integer array of token ids.
    - `seq_len`: the length of each input and target sequence.
    - `batch_size`: the number of sequences per batch.
    - `key`: a PRNG key that fixes the order of windows; required when `shuffle`.
    - `shuffle`: whether to permute the windows; if `False` they keep stream order.
    - `drop_last`: whether to drop the final batch when it is smaller than
        `batch_size`.
    - `start`: the index of the first batch to yield, to resume a pass midway.

    **Returns:**

    An iterator over `(inputs, targets)` NumPy batches, both `int32` of shape
    `(batch, seq_len)`, with `targets[:, t] == inputs[:, t + 1]`.

    !!! Example

        ```python
        import jax
        import revdeq


        corpus = revdeq.data.load_text_corpus(max_bytes=100_000)
        for inputs, targets in revdeq.data.sequence_batches(
            corpus["train"], seq_len=128, batch_size=16, key=jax.random.key(0)
        ):
            ...  # inputs, targets: (16, 128) int32, targets shifted by one byte
        ```
    """
    if seq_len < 1:
        raise ValueError(f"`seq_len` must be at least 1, got {seq_len}.")
    num_windows = (len(tokens) - 1) // seq_len
    indices = _batch_indices(
        num_windows,
        batch_size,
        key,
        shuffle,
        drop_last,
        start,
        what=f"windows of `seq_len + 1`={seq_len + 1} tokens",
    )
    offsets = np.arange(seq_len + 1)
    windows = (tokens[i[:, None] * seq_len + offsets].astype(np.int32) for i in indices)
    return ((window[:, :-1], window[:, 1:]) for window in windows)
