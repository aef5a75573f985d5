"""File helpers shared by everything that saves: atomic folder writes and named errors.

Every artefact (checkpoints, ConceptSets, interventions) is written into a temporary folder
beside its destination and renamed into place, so a crash leaves either the old complete
artefact or the new complete one, never half of one.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import Tensor


def dataclass_from_dict(cls: type, d: Mapping[str, Any]) -> Any:
    """Build a config dataclass from a dict (e.g. JSON), naming unknown fields."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; known: {sorted(known)}")
    return cls(**d)


# Files that mark a folder as one of ours, so overwrite=True never deletes a user's folder.
OWN_MARKERS = (
    "freeform.json",
    "concepts.json",
    "intervention.json",
    "caft_tl.json",
    "meta.json",
    "sweep.json",
    "shift.json",
    "crosscoder.json",
    "diff.json",
)


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _fsync_tree(folder: Path) -> None:
    for file in folder.rglob("*"):
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())


def _replace_folder(new: Path, target: Path) -> None:
    if not target.exists():
        os.rename(new, target)
        return
    # Directories cannot be renamed over non-empty ones, so move the old one aside first;
    # at every moment `target` is either the complete old set or the complete new one.
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.rmdir(old)
    os.rename(target, old)
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def exclusive_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock named after ``path`` (a hidden ``.NAME.lock`` file beside it).

    For build-once caches that several processes may fill at the same moment (torchrun
    ranks, parallel test workers, two notebooks): the first process builds, the others wait
    and then find the finished artefact. Without ``fcntl`` (Windows) it does not lock.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(target.parent / f".{target.name}.lock", "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


@contextmanager
def atomic_folder(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; when the block succeeds, it becomes ``path``.

    A crash or exception inside the block leaves ``path`` untouched (no half-written set).
    """
    target = Path(path)
    if target.exists():
        if not target.is_dir():
            raise FileExistsError(f"{target} exists and is not a folder")
        if not overwrite:
            raise FileExistsError(f"{target} exists; pass overwrite=True to replace it")
        if any(target.iterdir()) and not any((target / m).exists() for m in OWN_MARKERS):
            raise FileExistsError(
                f"refusing to overwrite {target}: it is not empty and holds no caft-tl save"
            )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; saved artefacts should stay readable
    try:
        yield tmp
        _fsync_tree(tmp)
        _replace_folder(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_json(path: Path, what: str) -> dict[str, Any]:
    """Read a JSON file, turning a missing / corrupt file into an error that names it."""
    if not path.is_file():
        raise FileNotFoundError(f"{what}: {path.name} is missing from {path.parent}")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{what}: {path} is corrupt (not valid JSON: {err})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{what}: {path} is corrupt (expected a JSON object)")
    return meta


def read_tensors(path: Path, what: str) -> dict[str, Tensor]:
    """Load a safetensors file to CPU, turning a missing / corrupt file into a named error."""
    if not path.is_file():
        raise FileNotFoundError(f"{what}: {path.name} is missing from {path.parent}")
    try:
        return load_file(str(path), device="cpu")
    except Exception as err:  # safetensors raises its own error types for bad headers
        raise ValueError(f"{what}: {path} is corrupt ({err})") from None


def write_tensors(tensors: Mapping[str, Tensor], path: Path) -> None:
    # Clone: safetensors refuses tensors that share storage (e.g. one tensor under two hooks).
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, str(path))


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename, so a killed process
    leaves either the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def save_frames(
    path: str | os.PathLike,
    frames: Mapping[str, Any],
    meta_file: str,
    meta: Mapping[str, Any],
    overwrite: bool = False,
) -> Path:
    """A folder of ``<name>.csv`` tables plus a JSON record ``meta_file``, written atomically
    (``meta_file`` must be one of OWN_MARKERS so the folder can later be overwritten)."""
    with atomic_folder(path, overwrite) as tmp:
        for name, frame in frames.items():
            frame.to_csv(tmp / f"{name}.csv", index=False)
        (tmp / meta_file).write_text(json.dumps(dict(meta), indent=2))
    return Path(path)


def load_frames(
    path: str | os.PathLike, names: Sequence[str], meta_file: str, fmt: str, what: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read back what :func:`save_frames` wrote; checks the record's ``format`` is ``fmt``
    and drops ``format`` / ``version`` from the returned record."""
    import pandas as pd

    folder = Path(path)
    meta = read_json(folder / meta_file, f"cannot load {what} from {folder}")
    if meta.pop("format", None) != fmt:
        raise ValueError(f"{folder / meta_file} is not a caft-tl {what}")
    meta.pop("version", None)
    frames = {n: pd.read_csv(folder / f"{n}.csv", dtype={"label": str}) for n in names}
    return frames, meta
