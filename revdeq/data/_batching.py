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


def _grid_windows(
    tokens: Integer[np.ndarray, " num_tokens"], seq_len: int
) -> Integer[np.ndarray, "num_windows window"]:
    """A read-only view of the windows of `seq_len + 1` tokens every `seq_len`."""
    if seq_len < 1:
        raise ValueError(f"`seq_len` must be at least 1, got {seq_len}.")
    if tokens.ndim != 1:
        raise ValueError(
            f"`tokens` must be one-dimensional, a token stream; got shape "
            f"{tokens.shape}."
        )
    if len(tokens) < seq_len + 1:
        raise ValueError(
            f"`tokens` holds {len(tokens)} tokens, fewer than one window of "
            f"`seq_len + 1`={seq_len + 1}."
        )
    windows = np.lib.stride_tricks.sliding_window_view(tokens, seq_len + 1)
    return windows[::seq_len]


def sequence_windows(
    tokens: Integer[np.ndarray, " num_tokens"],
    seq_len: int,
    num_windows: int | None = None,
    *,
    key: PRNGKeyArray | None = None,
) -> Integer[np.ndarray, "num_windows window"]:
    """Cut a token stream into windows for next-token prediction, and optionally keep
    some of them, spread over the whole stream.

    The windows are those of [`revdeq.data.sequence_batches`][]: `seq_len + 1`
    tokens starting every `seq_len` tokens, so that every token is an input exactly
    once. With `num_windows`, a subset of them is kept, in stream order and without
    overlap beyond the shared token at each boundary:

    - without `key`, evenly strided: the `i`-th of `n` is the window at the middle
        of the `i`-th of `n` equal parts of the stream, so the first and the last
        lie within half a stride of the stream's two ends. The choice is the same
        every time: use it for evaluation.
    - with `key`, drawn uniformly at random without replacement: use it to train on
        a sample of the whole stream.

    **Arguments:**

    - `tokens`: a one-dimensional integer array of token ids.
    - `seq_len`: the length of each input and target sequence.
    - `num_windows`: how many windows to keep, at most all of them; `None` keeps all.
    - `key`: a PRNG key that draws the windows kept at random; `None` strides.

    **Returns:**

    The windows, an array of the dtype of `tokens` and shape
    `(num_windows, seq_len + 1)`.

    !!! Example

        ```python
        import jax
        import revdeq


        corpus = revdeq.data.load_text_corpus(max_bytes=300_000)
        train = revdeq.data.sequence_windows(
            corpus["train"], 64, 1000, key=jax.random.key(0)
        )
        test = revdeq.data.sequence_windows(corpus["test"], 64, 100)  # strided
        for inputs, targets in revdeq.data.sequence_batches(
            train, 64, 16, key=jax.random.key(1)
        ):
            ...  # inputs, targets: (16, 64) int32
        ```
    """
    windows = _grid_windows(tokens, seq_len)
    total = len(windows)
    if num_windows is None or num_windows >= total:
        return windows.copy()
    if num_windows < 1:
        raise ValueError(f"`num_windows` must be at least 1, got {num_windows}.")
    if key is None:
        # Each part is at least one window long, so the middles are distinct.
        chosen = (2 * np.arange(num_windows) + 1) * total // (2 * num_windows)
    else:
        draw = jax.random.choice(key, total, (num_windows,), replace=False)
        chosen = np.sort(np.asarray(draw))
    return windows[chosen]


def sequence_batches(
    tokens: Integer[np.ndarray, " num_tokens"]
    | Integer[np.ndarray, "num_windows window"],
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
    `seq_len` tokens, so every token is an input exactly once per pass; or the
    windows are given, for example a sample from [`revdeq.data.sequence_windows`][].
    Each window gives an input (its first `seq_len` tokens) and a target (its last
    `seq_len` tokens): targets are the inputs shifted left by one. The order of
    windows in one pass is a function of `key` only, so a pass can be resumed
    exactly with `start`.

    **Arguments:**

    - `tokens`: a one-dimensional integer array of token ids, or a two-dimensional
        one of windows of `seq_len + 1` tokens each.
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
    if tokens.ndim != 2:
        windows = _grid_windows(tokens, seq_len)
    elif seq_len >= 1 and tokens.shape[1] == seq_len + 1:
        windows = tokens
    else:
        raise ValueError(
            f"`tokens` holds windows of {tokens.shape[1]} tokens, so `seq_len` must "
            f"be {tokens.shape[1] - 1} and at least 1, got {seq_len}."
        )
    indices = _batch_indices(
        len(windows),
        batch_size,
        key,
        shuffle,
        drop_last,
        start,
        what=f"windows of `seq_len + 1`={seq_len + 1} tokens",
    )
    return (
        (window[:, :-1], window[:, 1:])
        for window in (windows[i].astype(np.int32) for i in indices)
    )
