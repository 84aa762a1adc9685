import os
import pathlib
import sysconfig
from collections.abc import Sequence

import numpy as np

from ._hub import load_hub_dataset


BYTE_VOCAB_SIZE = 256
"""The vocabulary size of byte-level tokens: every `uint8` value is a token."""

# Third-party packages can live inside the stdlib directory; they differ between
# installs, so they are left out to keep the default corpus reproducible.
_NOT_STDLIB = frozenset({"site-packages", "dist-packages"})


def _stdlib_sources() -> list[pathlib.Path]:
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    relative = [
        path.relative_to(root)
        for path in root.rglob("*.py")
        if not _NOT_STDLIB.intersection(path.relative_to(root).parts)
    ]
    return [root / path for path in sorted(relative, key=pathlib.PurePath.as_posix)]


def _split(
    tokens: np.ndarray, validation_fraction: float, test_fraction: float
) -> dict[str, np.ndarray]:
    for name, fraction in (
        ("validation_fraction", validation_fraction),
        ("test_fraction", test_fraction),
    ):
        if not 0 < fraction < 1:
            raise ValueError(f"`{name}` must lie in (0, 1), got {fraction}.")
    if validation_fraction + test_fraction >= 1:
        raise ValueError(
            "`validation_fraction + test_fraction` must be below 1, got "
            f"{validation_fraction} + {test_fraction}."
        )
    num_validation = int(len(tokens) * validation_fraction)
    num_test = int(len(tokens) * test_fraction)
    if num_validation == 0 or num_test == 0:
        raise ValueError(
            f"A corpus of {len(tokens)} bytes is too small to split into "
            "non-empty train, validation and test parts; pass more text or a larger "
            "`max_bytes`."
        )
    num_train = len(tokens) - num_validation - num_test
    return {
        "train": tokens[:num_train],
        "validation": tokens[num_train : num_train + num_validation],
        "test": tokens[num_train + num_validation :],
    }


def load_text_corpus(
    text_files: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    *,
    max_bytes: int | None = None,
    validation_fraction: float = 0.05,
    test_fraction: float = 0.05,
) -> dict[str, np.ndarray]:
    """Load a local text corpus as byte-level tokens, split into train/validation/test.

    This is the offline default for language modelling. By default the corpus is the
    Python standard library's own `.py` sources, present wherever Python is: every
    file under `sysconfig.get_paths()["stdlib"]` (third-party `site-packages` left
    out), in sorted order of relative path. The corpus is therefore identical for a
    given Python version. The files are concatenated as raw bytes, and the split is
    into contiguous ranges: train first, then validation, then test.

    **Arguments:**

    - `text_files`: a file, or files to concatenate in the given order. Defaults to
        the standard library sources.
    - `max_bytes`: keep only the first `max_bytes` bytes of the corpus. `None`
        keeps everything.
    - `validation_fraction`: the fraction of bytes in the validation split.
    - `test_fraction`: the fraction of bytes in the test split.

    **Returns:**

    A dict with keys `"train"`, `"validation"` and `"test"`, each a one-dimensional
    NumPy array of dtype `uint8`: tokens from a vocabulary of
    [`revdeq.data.BYTE_VOCAB_SIZE`][] = 256.

    !!! Example

        ```python
        import jax
        import revdeq


        corpus = revdeq.data.load_text_corpus(max_bytes=1_000_000)
        batches = revdeq.data.sequence_batches(
            corpus["train"], seq_len=256, batch_size=32, key=jax.random.key(0)
        )
        ```
    """
    if max_bytes is not None and max_bytes < 1:
        raise ValueError(f"`max_bytes` must be positive or None, got {max_bytes}.")
    if text_files is None:
        paths = _stdlib_sources()
    else:
        if isinstance(text_files, str | os.PathLike):
            text_files = [text_files]
        paths = [pathlib.Path(file) for file in text_files]
        if not paths:
            raise ValueError("`text_files` is empty; pass at least one file or None.")
        for path in paths:
            if not path.is_file():
                raise FileNotFoundError(f"`text_files` entry {path} is not a file.")
    chunks = []
    size = 0
    for path in paths:
        if max_bytes is not None and size >= max_bytes:
            break
        chunks.append(path.read_bytes())
        size += len(chunks[-1])
    tokens = np.frombuffer(b"".join(chunks)[:max_bytes], np.uint8)
    return _split(tokens, validation_fraction, test_fraction)


def load_wikitext103() -> dict[str, np.ndarray]:
    """Load Wikitext-103 (`Salesforce/wikitext`, `wikitext-103-raw-v1`) as bytes.

    This needs access to the Hugging Face Hub, or a local cache of the dataset used
    with `HF_DATASETS_OFFLINE=1`. It never falls back to other data: for language
    modelling with no network, use [`revdeq.data.load_text_corpus`][].

    **Returns:**

    A dict with keys `"train"`, `"validation"` and `"test"`, each the split's raw text
    encoded as UTF-8: a one-dimensional NumPy array of dtype `uint8`, in the same
    format as [`revdeq.data.load_text_corpus`][].

    **Raises:**

    `RuntimeError`, chained to the underlying exception and saying how to get the
    data, when neither the hub nor a local cache can provide it.

    !!! Example

        ```py
        import revdeq


        corpus = revdeq.data.load_wikitext103()
        text = corpus["validation"].tobytes().decode()
        ```
    """
    dataset = load_hub_dataset(
        "Wikitext-103", "Salesforce/wikitext", "wikitext-103-raw-v1"
    )
    return {
        split: np.frombuffer("".join(dataset[split]["text"]).encode(), np.uint8)
        for split in ("train", "validation", "test")
    }
