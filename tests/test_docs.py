"""The documentation: every public name has an API entry, and every example in a
public docstring or on a page of the site runs."""

import inspect
import pathlib
import re
import textwrap
import types

import jax
import pytest

import revdeq


# Examples run as users run them, under JAX's default (standard) dtype promotion;
# some use optax's Adam, which strict promotion refuses.
pytestmark = pytest.mark.standard_promotion

DOCS = pathlib.Path(__file__).parent.parent / "docs"
MODULES = (
    revdeq,
    revdeq.nn,
    revdeq.train,
    revdeq.data,
    revdeq.internal,
    revdeq.testing,
)


def _public_names():
    for module in MODULES:
        for name in sorted(vars(module)):
            obj = getattr(module, name)
            if not name.startswith("_") and not isinstance(obj, types.ModuleType):
                yield f"{module.__name__}.{name}", obj


def _docstrings(path, obj):
    """The docstring of `obj` and of the methods and properties its class defines."""
    if not isinstance(obj, type | types.FunctionType):
        return
    yield path, inspect.getdoc(obj)
    if isinstance(obj, type):
        for name, member in vars(obj).items():
            if isinstance(member, types.FunctionType | property):
                yield f"{path}.{name}", inspect.getdoc(member)


# An `!!! Example` admonition: its indented body, up to the next unindented line.
_EXAMPLE = re.compile(r"^!!! Example\n((?:[ \t]*\n|    .*\n?)*)", re.MULTILINE)
# Blocks fenced as ```python run; other fences (```py, ```bash) are shown only.
_PYTHON = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


# Examples that compile whole models (10 s or more each) run in the slow set.
_MODELS = {
    f"revdeq.nn.{name}"
    for name in (
        "DEQLanguageModel",
        "ExplicitLanguageModel",
        "ExplicitResNet",
        "ExplicitStack",
        "ImplicitResNet",
        "TransformerCell",
    )
}


def _examples():
    for path, obj in _public_names():
        for where, doc in _docstrings(path, obj):
            for body in _EXAMPLE.findall(doc or ""):
                for code in _PYTHON.findall(textwrap.dedent(body)):
                    marks = [pytest.mark.slow] if where in _MODELS else []
                    yield pytest.param(code, id=where, marks=marks)


def test_every_public_name_is_documented():
    entries = {
        line.removeprefix(":::").split()[0]
        for page in DOCS.glob("api/*.md")
        for line in page.read_text().splitlines()
        if line.startswith(":::")
    }
    names = {path for path, _ in _public_names()}
    assert names - entries == set(), "public names without an entry in docs/api/"
    assert entries - names == set(), "docs/api/ entries that are not public names"


@pytest.mark.parametrize("code", list(_examples()))
def test_docstring_example_runs(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples may write files
    x64 = jax.config.jax_enable_x64
    try:
        exec(compile(code, "<example>", "exec"), {})
    finally:
        jax.config.update("jax_enable_x64", x64)


@pytest.mark.parametrize(
    "page",
    [page for page in sorted(DOCS.rglob("*.md")) if _PYTHON.search(page.read_text())],
    ids=lambda page: page.relative_to(DOCS).as_posix(),
)
def test_page_examples_run(page, tmp_path, monkeypatch):
    """The blocks of a page run in turn, in one namespace: a page builds on itself."""
    monkeypatch.chdir(tmp_path)
    namespace = {}
    for code in _PYTHON.findall(page.read_text()):
        exec(compile(code, str(page), "exec"), namespace)
