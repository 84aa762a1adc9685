# %% [markdown]
# # 04 · Training a RevDEQ on Fashion-MNIST
#
# This notebook shows that a reversible DEQ trains like any other layer. It runs the
# repository's demo script `experiments/demo.py` (a small convolutional stem, an
# equilibrium layer over a feature vector, a linear head) on a
# small slice of Fashion-MNIST for two epochs, for two variants at an **equal budget of
# forward evaluations**:
#
# - `revdeq`: `Reversible` solver + `ReversibleAdjoint` (exact gradient, constant
#   memory in steps);
# - `deq`: `Anderson` solver + `ImplicitAdjoint` (implicit-function-theorem gradient).
#
# The data are read offline from Debian's `dataset-fashion-mnist` package. Everything
# is kept tiny so that it runs in about a minute on a CPU; the full comparison is
# `python experiments/demo.py --model all`.

# %%
import pathlib
import sys
import tempfile

from IPython.display import Image, Markdown, display


experiments = pathlib.Path.cwd().parent / "experiments"
sys.path.insert(0, str(experiments))
import _common  # noqa: E402
import demo  # noqa: E402


# %% [markdown]
# ## Train both variants
#
# `main(argv)` takes the script's command-line arguments and returns its results. Each
# variant writes its metrics under `out/<variant>/`.

# %%
out = pathlib.Path(tempfile.mkdtemp()) / "fashion"
common = [
    "--epochs", "2", "--steps", "4", "--batch-size", "32",
    "--limit-train", "2048", "--limit-test", "1000",
    "--out", str(out),
]  # fmt: skip
results = {}
for variant in ["revdeq", "deq"]:
    results |= demo.main(["--model", variant, *common])

# %% [markdown]
# ## Results
#
# Per model: test accuracy, wall time, forward and backward evaluations of the cell
# per example and solve, the compiled memory of a training step and the parameter
# count. Both see the same `2·steps + 1 = 9` forward evaluations; the backward
# evaluations differ (RevDEQ: exactly two per reversible step).

# %%
table = _common.write_reports(out, results)
display(Markdown(table))

# %%
display(Image(filename=str(out / "learning_curves.png")))

# %% [markdown]
# Both models start from the same initialisation and see the same batches, so their
# curves nearly coincide: at this size the two gradients drive training alike. The
# difference is the backward cost (RevDEQ's exact gradient takes 8 evaluations of the
# cell, the implicit one's GMRES solve three times as many). After two epochs on 2,048
# images both are far from their final accuracy (about 91% after 8 epochs on the full
# set, see the README).
