"""Writes every notebook from its source in notebooks/src/: jupytext percent-format ``.py``
files (``# %%`` code cells, ``# %% [markdown]`` cells), so ruff lints and formats them and
reviews see plain diffs. ``src/NN_name.py`` becomes ``NN_name.ipynb``, without outputs.

    python notebooks/_build.py            # write the notebooks
    python notebooks/_build.py --check    # exit 1 if a committed notebook differs from its build
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import jupytext
import nbformat as nbf

HERE = Path(__file__).parent
PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"  # ruff settings


def notebook(source: Path) -> nbf.NotebookNode:
    """The notebook of one percent-format source: its cells only, with stable ids (an
    unchanged source rebuilds to the same file) and jupytext's own metadata left out."""
    parsed = jupytext.read(source, fmt="py:percent")
    nb = nbf.v4.new_notebook()
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    for i, cell in enumerate(parsed.cells):
        make = nbf.v4.new_markdown_cell if cell.cell_type == "markdown" else nbf.v4.new_code_cell
        nb.cells.append(make(cell.source.strip(), id=f"cell-{i:02d}"))
    return nb


def build(out_dir: Path = HERE) -> list[Path]:
    """Write every notebook into ``out_dir``, formatted as CI's ``ruff format --check`` wants."""
    written = []
    for src in sorted((HERE / "src").glob("[0-9]*.py")):
        target = out_dir / f"{src.stem}.ipynb"
        nbf.write(notebook(src), target)
        # The project's settings even for a build in a temporary folder.
        ruff = [sys.executable, "-m", "ruff", "format", "-q", "--config", str(PYPROJECT)]
        subprocess.run([*ruff, str(target)], check=True)
        written.append(target)
    return written


def stale() -> list[str]:
    """The committed notebooks that differ from a fresh build of their sources."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = build(Path(tmp))
        return [p.name for p in fresh if p.read_text() != (HERE / p.name).read_text()]


if __name__ == "__main__":
    if sys.argv[1:] == ["--check"]:
        names = stale()
        print("\n".join(f"stale: {n} (run python notebooks/_build.py)" for n in names) or "ok")
        sys.exit(1 if names else 0)
    for path in build():
        print("wrote", path)
