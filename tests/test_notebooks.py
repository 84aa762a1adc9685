"""Every tutorial notebook executes top to bottom in a fresh kernel without error, and
matches its source: the percent-format script beside it (see `make notebooks`)."""

import pathlib

import jupytext
import nbclient
import nbformat
import pytest


NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))
# Executing a notebook takes up to a minute of CPU, so they run on request
# (`pytest -m slow`, which CI runs after `make test`), not in the default run.
_LONG = {
    "01_quickstart",
    "02_exact_gradients",
    "03_memory_and_speed",
    "04_train_fashion_mnist",
    "05_language_model",
}


def _cells(nb):
    return [(cell.cell_type, cell.source) for cell in nb.cells]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_matches_source(path):
    source = jupytext.read(path.with_suffix(".py"))
    assert _cells(nbformat.read(path, as_version=4)) == _cells(source), (
        f"{path.name} differs from its source; run `make notebooks`."
    )


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize(
    "path",
    [
        pytest.param(path, marks=[pytest.mark.slow] if path.stem in _LONG else [])
        for path in NOTEBOOKS
    ],
    ids=lambda p: p.stem,
)
def test_notebook_executes(path):
    nb = nbformat.read(path, as_version=4)
    # Raises `CellExecutionError` on the first cell that errors.
    nbclient.NotebookClient(
        nb,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
    ).execute()
