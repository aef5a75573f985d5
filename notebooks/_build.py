"""Writes every notebook from its cell sources in notebooks/src/ (kept as code so reviews
see plain diffs). Each ``src/NN_name.py`` defines ``CELLS``, a list of ``("md" | "code",
source)`` pairs, and becomes ``NN_name.ipynb``.

    python notebooks/_build.py
"""

import runpy
import subprocess
import sys
from pathlib import Path

import nbformat as nbf

HERE = Path(__file__).parent


def notebook(cells: list[tuple[str, str]]) -> nbf.NotebookNode:
    nb = nbf.v4.new_notebook()
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    for i, (kind, source) in enumerate(cells):
        make = nbf.v4.new_markdown_cell if kind == "md" else nbf.v4.new_code_cell
        # Stable ids: rebuilding an unchanged notebook leaves git with nothing to show.
        nb.cells.append(make(source.strip(), id=f"cell-{i:02d}"))
    return nb


if __name__ == "__main__":
    for src in sorted((HERE / "src").glob("[0-9]*.py")):
        target = HERE / f"{src.stem}.ipynb"
        nbf.write(notebook(runpy.run_path(str(src))["CELLS"]), target)
        # Same formatting as CI's `ruff format --check`, so a fresh build passes it.
        subprocess.run([sys.executable, "-m", "ruff", "format", "-q", str(target)], check=True)
        print("wrote", target)
