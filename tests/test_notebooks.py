"""Notebooks execute top to bottom (they are documentation that must not rot)."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_executes(path, tmp_path):
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    errors = [
        o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"
    ]
    assert not errors


def _build_module():
    import importlib.util

    path = Path(__file__).parents[1] / "notebooks" / "_build.py"
    spec = importlib.util.spec_from_file_location("notebooks_build", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_notebooks_are_built_from_their_sources():
    # The .py sources are what reviews and ruff see; the .ipynb must be their build.
    build = _build_module()
    sources = sorted(p.stem for p in (build.HERE / "src").glob("[0-9]*.py"))
    assert sources == [p.stem for p in NOTEBOOKS]
    assert build.stale() == []


def test_stale_notebook_is_found(tmp_path, monkeypatch):
    build = _build_module()
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "01_x.py").write_text("# %% [markdown]\n# Title\n\n# %%\nx = 1\n")
    (tmp_path / "01_x.ipynb").write_text("{}")
    monkeypatch.setattr(build, "HERE", tmp_path)
    assert build.stale() == ["01_x.ipynb"]
    build.build(tmp_path)
    assert build.stale() == []
