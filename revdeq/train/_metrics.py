import json
import os
import pathlib
from typing import Any

import numpy as np
from jaxtyping import ArrayLike


class MetricsLogger:
    """Append scalar metrics to a JSON Lines file, one record per call.

    Each record is one JSON object on its own line, e.g.
    `{"step": 100, "loss": 0.42, "accuracy": 0.9}`. The file is opened and closed on
    every call, so records are on disk as soon as `log` returns and a crashed run
    loses nothing. Read them back with [`revdeq.train.read_metrics`][].

    !!! Example

        ```python
        import revdeq


        logger = revdeq.train.MetricsLogger("runs/a/metrics.jsonl")
        for i, loss in enumerate([2.3, 1.7, 1.2]):
            logger.log(step=i, split="train", loss=loss)
        ```
    """

    path: pathlib.Path

    def __init__(self, path: str | os.PathLike) -> None:
        """**Arguments:**

        - `path`: the JSONL file to append to; it and its directory are created if
            missing.
        """
        self.path = pathlib.Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, *, step: int, **values: ArrayLike | str) -> dict[str, Any]:
        """Append one record.

        **Arguments:**

        - `step`: the training step.
        - `**values`: scalars (Python numbers, or NumPy or JAX arrays of size one,
            converted to Python floats or ints) or strings.

        **Returns:**

        The record as written.
        """
        record: dict[str, Any] = {"step": int(step)}
        for name, value in values.items():
            if isinstance(value, str | bool | int | float):
                record[name] = value
            else:
                array = np.asarray(value)
                if array.size != 1:
                    raise ValueError(
                        f"Metric `{name}` must be a scalar, got shape {array.shape}."
                    )
                record[name] = array.item()
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        return record


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read the records of a JSON Lines metrics file written by
    [`revdeq.train.MetricsLogger`][].

    **Arguments:**

    - `path`: the JSONL file.

    **Returns:**

    The records, in file order.

    !!! Example

        ```python
        import revdeq


        revdeq.train.MetricsLogger("runs/a/metrics.jsonl").log(step=0, loss=2.3)
        records = revdeq.train.read_metrics("runs/a/metrics.jsonl")
        losses = [r["loss"] for r in records if "loss" in r]
        ```
    """
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
