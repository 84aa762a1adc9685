import gzip
import math
import os
import pathlib
import zlib

import numpy as np

from ._hub import load_hub_dataset


_FASHION_MNIST_ENV = "REVDEQ_FASHION_MNIST"
_FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
_FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_FASHION_MNIST_HINT = (
    "To get the data, install the Debian/Ubuntu package with `apt-get install "
    "dataset-fashion-mnist`, or download the four IDX .gz files from "
    "https://github.com/zalandoresearch/fashion-mnist and pass `root=` (or set "
    f"${_FASHION_MNIST_ENV}) to the directory holding them."
)


def _read_idx_ubyte(path: pathlib.Path, ndim: int) -> np.ndarray:
    """Parse a gzipped IDX file of unsigned bytes with `ndim` dimensions."""
    if not path.is_file():
        raise FileNotFoundError(
            f"Fashion-MNIST file {path} not found. " + _FASHION_MNIST_HINT
        )
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise ValueError(
            f"{path} is not a complete gzip file ({e}). " + _FASHION_MNIST_HINT
        ) from e
    # Header: two zero bytes, the type code 0x08 (unsigned byte), the number of
    # dimensions, then one big-endian uint32 per dimension.
    magic = 0x0800 + ndim
    header_size = 4 + 4 * ndim
    if len(data) < header_size or int.from_bytes(data[:4], "big") != magic:
        raise ValueError(
            f"{path} is not an IDX file of unsigned bytes with {ndim} dimension(s): "
            f"expected magic number {magic:#010x}, found 0x{data[:4].hex()}. "
            + _FASHION_MNIST_HINT
        )
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    expected_size = header_size + math.prod(shape)
    if len(data) != expected_size:
        raise ValueError(
            f"{path} is truncated or corrupt: its header declares shape {shape}, "
            f"i.e. {expected_size} bytes, but it holds {len(data)} bytes. "
            + _FASHION_MNIST_HINT
        )
    return np.frombuffer(data, np.uint8, offset=header_size).reshape(shape)


def load_fashion_mnist(
    root: str | os.PathLike | None = None,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Load Fashion-MNIST from its original IDX files, with no network access.

    Fashion-MNIST holds 70,000 real 28×28 greyscale images of clothing in 10
    balanced classes (60,000 train, 10,000 test). The files are parsed directly,
    and their magic numbers, dimensions and payload lengths are checked.

    **Arguments:**

    - `root`: the directory holding `train-images-idx3-ubyte.gz`,
        `train-labels-idx1-ubyte.gz`, `t10k-images-idx3-ubyte.gz` and
        `t10k-labels-idx1-ubyte.gz`. Defaults to `$REVDEQ_FASHION_MNIST` if set, else
        `/usr/share/datasets/fashion-mnist`, where the Debian package
        `dataset-fashion-mnist` installs them.

    **Returns:**

    A dict with keys `"train"` and `"test"`, each an `(images, labels)` tuple of NumPy
    arrays: `images` of dtype `uint8` and shape `(N, 28, 28)`, `labels` of dtype
    `int32` and shape `(N,)` with values in `0..9`.

    **Raises:**

    `FileNotFoundError` for a missing file, `ValueError` for a truncated or corrupt
    one; both name the file and say how to get the data.

    !!! Example

        ```python
        import revdeq


        data = revdeq.data.load_fashion_mnist()
        images, labels = data["train"]  # (60000, 28, 28) uint8, (60000,) int32
        ```
    """
    if root is None:
        root = os.environ.get(_FASHION_MNIST_ENV, _FASHION_MNIST_ROOT)
    root = pathlib.Path(root)
    data = {}
    for split, (images_file, labels_file) in _FASHION_MNIST_FILES.items():
        images = _read_idx_ubyte(root / images_file, ndim=3)
        labels = _read_idx_ubyte(root / labels_file, ndim=1).astype(np.int32)
        if len(images) != len(labels):
            raise ValueError(
                f"{root / images_file} holds {len(images)} images but "
                f"{root / labels_file} holds {len(labels)} labels. "
                + _FASHION_MNIST_HINT
            )
        data[split] = (images, labels)
    return data


def load_cifar10() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Load CIFAR-10 (`uoft-cs/cifar10`) through Hugging Face `datasets`.

    This needs access to the Hugging Face Hub, or a local cache of the dataset used
    with `HF_DATASETS_OFFLINE=1`. It never falls back to other data: for image
    classification with no network, use [`revdeq.data.load_fashion_mnist`][].

    **Returns:**

    A dict with keys `"train"` and `"test"`, each an `(images, labels)` tuple of NumPy
    arrays: `images` of dtype `uint8` and shape `(N, 32, 32, 3)`, `labels` of dtype
    `int32` and shape `(N,)` with values in `0..9`. N is 50,000 for train and 10,000
    for test.

    **Raises:**

    `RuntimeError`, chained to the underlying exception and saying how to get the
    data, when neither the hub nor a local cache can provide it.

    !!! Example

        ```py
        import revdeq


        images, labels = revdeq.data.load_cifar10()["train"]
        ```
    """
    dataset = load_hub_dataset("CIFAR-10", "uoft-cs/cifar10")
    data = {}
    for split in ("train", "test"):
        columns = dataset[split].with_format("numpy")[:]
        data[split] = (
            np.asarray(columns["img"], np.uint8),
            np.asarray(columns["label"], np.int32),
        )
    return data
