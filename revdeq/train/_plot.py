import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

from matplotlib.figure import Figure

from ._metrics import read_metrics


def plot_learning_curves(
    runs: Mapping[str, str | os.PathLike | Sequence[Mapping[str, Any]]],
    metric: str,
    out_png: str | os.PathLike,
    *,
    x: str = "step",
    log_y: bool = False,
    title: str | None = None,
) -> Figure:
    """Plot one metric against the step for several runs, and save it as a PNG.

    Records without `metric` (e.g. evaluation records in a file that mostly holds
    training ones) are skipped. The figure is drawn with Matplotlib's Agg renderer
    without touching `pyplot`, so it works headless and leaves notebooks alone.

    **Arguments:**

    - `runs`: a mapping from a label for the legend to either the path of a JSONL
        file written by [`revdeq.train.MetricsLogger`][], or its list of records.
    - `metric`: the name of the metric to plot on the y-axis.
    - `out_png`: where to save the figure; its directory is created if missing.
    - `x`: the name of the field to plot on the x-axis.
    - `log_y`: whether to use a logarithmic y-axis.
    - `title`: the figure title; defaults to `metric`.

    **Returns:**

    The Matplotlib figure.

    !!! Example

        ```python
        import revdeq


        runs = {  # records, or the paths of the files of `MetricsLogger`s
            "DEQ": [{"step": 0, "loss": 2.3}, {"step": 100, "loss": 0.9}],
            "RevDEQ": [{"step": 0, "loss": 2.3}, {"step": 100, "loss": 0.8}],
        }
        revdeq.train.plot_learning_curves(runs, metric="loss", out_png="runs/loss.png")
        ```
    """
    figure = Figure(figsize=(6, 4), layout="constrained")
    axes = figure.add_subplot()
    for label, run in runs.items():
        records = read_metrics(run) if isinstance(run, str | os.PathLike) else run
        points = [(r[x], r[metric]) for r in records if metric in r and x in r]
        if not points:
            raise ValueError(
                f"Run {label!r} has no records with both {x!r} and {metric!r}."
            )
        xs, ys = zip(*points)
        axes.plot(xs, ys, label=label)
    axes.set_xlabel(x)
    axes.set_ylabel(metric)
    axes.set_title(metric if title is None else title)
    if log_y:
        axes.set_yscale("log")
    axes.legend()
    out_png = pathlib.Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_png, dpi=120)
    return figure
