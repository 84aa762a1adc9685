from typing import Any


def load_hub_dataset(label: str, path: str, name: str | None = None) -> Any:
    """Load a dataset through Hugging Face `datasets`, failing loudly when offline.

    **Arguments:**

    - `label`: human-readable dataset name used in the error message.
    - `path`: the dataset's repository on the hub, e.g. `"uoft-cs/cifar10"`.
    - `name`: the dataset configuration, if any.

    **Returns:**

    The `datasets.DatasetDict` returned by `datasets.load_dataset(path, name)`.

    **Raises:**

    `RuntimeError`, chained to the underlying exception, when neither the hub nor a
    local cache can provide the data.
    """
    import datasets  # Lazy: importing `datasets` is slow and most users never need it.

    try:
        return datasets.load_dataset(path, name)
    except Exception as e:
        call = f"datasets.load_dataset({path!r}" + (f", {name!r})" if name else ")")
        raise RuntimeError(
            f"Could not load {label} ({path!r}) through Hugging Face `datasets`: "
            f"{type(e).__name__}: {e}\n"
            "To get the data, either give this machine access to the Hugging Face "
            f"Hub (huggingface.co), or run `{call}` on a machine that has access, "
            "copy its cache (`~/.cache/huggingface`, or `$HF_HOME`) here and set "
            "`HF_DATASETS_OFFLINE=1`."
        ) from e
