import hashlib
import io
import json
import os
import pathlib
import re
import tempfile
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import PyTree


_PREFIX = "checkpoint_"
_SUFFIX = ".eqx"
_NAME = re.compile(rf"{_PREFIX}(\d+){_SUFFIX}")
# Temporary files are hidden and never match `_NAME`, so a write interrupted midway
# is never mistaken for a checkpoint.
_TMP_PREFIX = f".{_PREFIX}"
_TMP_SUFFIX = ".tmp"


def _checkpoints(directory: pathlib.Path) -> dict[int, pathlib.Path]:
    """Map step to path for every complete checkpoint in `directory`."""
    if not directory.is_dir():
        return {}
    return {
        int(match.group(1)): path
        for path in directory.iterdir()
        if (match := _NAME.fullmatch(path.name))
    }


def _to_json(value: Any) -> Any:
    """Encode arrays in `extra` (PRNG keys included) as nested lists."""
    if isinstance(value, jax.Array) and jnp.issubdtype(
        value.dtype, jax.dtypes.prng_key
    ):
        value = jax.random.key_data(value)
    if isinstance(value, jax.Array | np.ndarray | np.generic):
        return np.asarray(value).tolist()
    raise TypeError(f"`extra` holds {type(value).__name__}, which is not JSON data.")


def latest_checkpoint(directory: str | os.PathLike) -> pathlib.Path | None:
    """Find the checkpoint with the highest step in a directory.

    **Arguments:**

    - `directory`: the checkpoint directory.

    **Returns:**

    The path of the latest complete checkpoint, or `None` if there is none (or the
    directory does not exist). Partially written temporary files are ignored.

    !!! Example

        ```python
        import revdeq


        path = revdeq.train.latest_checkpoint("runs/ckpt")  # None before the first save
        ```
    """
    checkpoints = _checkpoints(pathlib.Path(directory))
    return checkpoints[max(checkpoints)] if checkpoints else None


def save_checkpoint(
    directory: str | os.PathLike,
    step: int,
    model: PyTree,
    opt_state: optax.OptState,
    extra: dict[str, Any] | None = None,
    *,
    keep: int | None = 3,
) -> pathlib.Path:
    """Save a training checkpoint atomically, keeping only the latest few.

    One checkpoint is one file, `checkpoint_<step>.eqx`: a line of JSON holding
    `step`, `extra` and the size and SHA-256 of what follows, the array leaves of
    `(model, opt_state)` written with `eqx.tree_serialise_leaves`. No pickle is
    involved. The file is written to a temporary name in the same directory, flushed
    to disk and renamed into place, so a crash, even a `SIGKILL`, never leaves a
    partial checkpoint; leftover temporary files from such a crash are deleted.

    For an exact resume, put in `extra` everything else the run depends on: the
    position in the data iterator and the PRNG key. Arrays in `extra` (PRNG keys
    included, as their key data) are stored as nested lists.

    In a multi-host run, call this from process 0 only.

    **Arguments:**

    - `directory`: the checkpoint directory; created if missing.
    - `step`: the training step, a non-negative integer.
    - `model`: the model, any PyTree.
    - `opt_state`: the optimiser state.
    - `extra`: JSON-serialisable data (plus arrays) to store alongside.
    - `keep`: how many of the latest checkpoints to keep; `None` keeps all.

    **Returns:**

    The path of the new checkpoint.

    !!! Example

        ```python
        import equinox as eqx
        import jax
        import optax
        import revdeq


        model = eqx.nn.Linear(4, 3, key=jax.random.key(0))
        opt_state = revdeq.train.init_optimiser(optax.adamw(1e-3), model)

        epoch, i, key = 0, 100, jax.random.key(1)
        extra = {"epoch": epoch, "batch": i, "key": key}
        revdeq.train.save_checkpoint("runs/ckpt", 100, model, opt_state, extra)
        ```
    """
    if step < 0:
        raise ValueError(f"`step` must be non-negative, got {step}.")
    if keep is not None and keep < 1:
        raise ValueError(f"`keep` must be at least 1 or None, got {keep}.")
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob(f"{_TMP_PREFIX}*{_TMP_SUFFIX}"):
        stale.unlink(missing_ok=True)

    arrays = io.BytesIO()
    eqx.tree_serialise_leaves(arrays, (model, opt_state))
    arrays = arrays.getvalue()
    header = {
        "step": step,
        "extra": extra or {},
        "size": len(arrays),
        "sha256": hashlib.sha256(arrays).hexdigest(),
    }
    path = directory / f"{_PREFIX}{step:09d}{_SUFFIX}"
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=_TMP_PREFIX, suffix=_TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(json.dumps(header, default=_to_json).encode() + b"\n")
            f.write(arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise
    # Make the rename itself durable.
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)

    if keep is not None:
        checkpoints = _checkpoints(directory)
        for old in sorted(checkpoints)[:-keep]:
            checkpoints[old].unlink(missing_ok=True)
    return path


def restore_checkpoint(
    directory: str | os.PathLike,
    like_model: PyTree,
    like_opt_state: optax.OptState,
    *,
    step: int | None = None,
) -> tuple[int, PyTree, optax.OptState, dict[str, Any]]:
    """Restore a checkpoint written by [`revdeq.train.save_checkpoint`][].

    **Arguments:**

    - `directory`: the checkpoint directory.
    - `like_model`: a model with the same structure, shapes and dtypes as the saved
        one, e.g. a freshly initialised one; its arrays are replaced.
    - `like_opt_state`: likewise for the optimiser state.
    - `step`: the step to restore; `None` restores the latest.

    **Returns:**

    A tuple `(step, model, opt_state, extra)`. Arrays saved in `extra` come back as
    nested lists; rebuild a PRNG key with `jnp.asarray(extra["key"], jnp.uint32)`
    (or `jax.random.wrap_key_data` for a typed key).

    **Raises:**

    `FileNotFoundError` if there is no such checkpoint, and `ValueError`, naming the
    file, if it is truncated or corrupted: its size and checksum are verified
    before any array is read.

    !!! Example

        ```python
        import equinox as eqx
        import jax
        import jax.numpy as jnp
        import optax
        import revdeq


        model = eqx.nn.Linear(4, 3, key=jax.random.key(0))
        opt_state = revdeq.train.init_optimiser(optax.adamw(1e-3), model)

        revdeq.train.save_checkpoint("runs/ckpt", 100, model, opt_state,
                                     {"key": jax.random.key(1)})

        if revdeq.train.latest_checkpoint("runs/ckpt") is not None:
            step, model, opt_state, extra = revdeq.train.restore_checkpoint(
                "runs/ckpt", model, opt_state
            )
            key = jax.random.wrap_key_data(jnp.asarray(extra["key"], jnp.uint32))
        ```
    """
    checkpoints = _checkpoints(pathlib.Path(directory))
    if step is None and checkpoints:
        step = max(checkpoints)
    if step not in checkpoints:
        which = "any checkpoint" if step is None else f"a checkpoint for step {step}"
        raise FileNotFoundError(
            f"`directory` {directory} does not hold {which}; it holds steps "
            f"{sorted(checkpoints)}."
        )
    path = checkpoints[step]
    with open(path, "rb") as f:
        header, arrays = f.readline(), f.read()
    try:
        header = json.loads(header)
        size, digest = header["size"], header["sha256"]
    except (ValueError, KeyError, TypeError):
        raise _damaged(
            path, "its first line is not a revdeq checkpoint header"
        ) from None
    if len(arrays) != size:
        raise _damaged(path, f"it holds {len(arrays)} bytes of arrays, not {size}")
    if hashlib.sha256(arrays).hexdigest() != digest:
        raise _damaged(path, "its arrays do not match their SHA-256 checksum")
    like = (like_model, like_opt_state)
    model, opt_state = eqx.tree_deserialise_leaves(io.BytesIO(arrays), like)
    return header["step"], model, opt_state, header["extra"]


def _damaged(path: pathlib.Path, why: str) -> ValueError:
    return ValueError(
        f"The checkpoint {path} is damaged: {why}. Delete it to resume from the "
        "checkpoint before it."
    )
