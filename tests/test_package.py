"""The distribution: the wheel holds the package and its type marker, and it installs
and runs outside the checkout (`make package`)."""

import pathlib
import subprocess
import sys
import textwrap
import zipfile

import pytest

import revdeq


ROOT = pathlib.Path(__file__).parent.parent


def test_wheel_holds_the_package(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation"]
        + ["--outdir", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("*.whl")
    assert wheel.name.startswith(f"revdeq-{revdeq.__version__}-py3-none-any")
    files = zipfile.ZipFile(wheel).namelist()
    package = {name for name in files if not name.startswith("revdeq-")}
    sources = {
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / "revdeq").rglob("*")
        if path.suffix in (".py", ".typed")
    }
    assert package == sources


_SMOKE = textwrap.dedent(
    """
    import pathlib

    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import revdeq

    cell = revdeq.nn.MLPCell(dim=8, hidden=16, key=jax.random.key(0))

    def loss(cell, x):
        return jnp.sum(revdeq.solve(cell, jnp.zeros(8), x, max_steps=8).value ** 2)

    grads = eqx.filter_grad(loss)(cell, jnp.ones(8))
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
    print(pathlib.Path(revdeq.__file__).parent)
    """
)


@pytest.mark.package
def test_wheel_installs_and_runs(tmp_path):
    wheels = sorted((ROOT / "dist").glob("revdeq-*.whl"))
    assert wheels, "No wheel in dist/: build one with `python -m build`."
    subprocess.run([sys.executable, "-m", "venv", str(tmp_path / "venv")], check=True)
    python = tmp_path / "venv" / "bin" / "python"
    subprocess.run([python, "-m", "pip", "install", "--quiet", wheels[-1]], check=True)
    run = subprocess.run(
        [python, "-c", _SMOKE], cwd=tmp_path, check=True, capture_output=True, text=True
    )
    installed = pathlib.Path(run.stdout.strip())
    assert installed.is_relative_to(tmp_path / "venv"), installed
