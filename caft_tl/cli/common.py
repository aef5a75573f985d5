"""What every ``caft-tl`` sub-command shares: reading MODEL and DATA arguments, the
``--concepts/--mode/--coef`` intervention, and which errors are the user's to fix."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

INTERVENTION_MODES = ("zero", "mean", "detached", "gradient", "steer")


def load(name: str, device: str | None, dtype: str | None = None):
    """The model a MODEL argument names: ``embedded`` or what :func:`load_model` takes."""
    from caft_tl.models import load_model

    return load_model(None if name == "embedded" else name, device=device, dtype=dtype)


def read_data(path: str):
    """A chat JSONL file, or a ``.txt`` file with one text per line, as a Dataset."""
    from caft_tl.data import DataError, as_dataset, load_jsonl

    p = Path(path)
    if not p.exists():
        raise DataError(f"{p} does not exist")
    if p.suffix == ".txt":
        lines = [line for line in p.read_text().splitlines() if line.strip()]
        return as_dataset(lines)
    return load_jsonl(p)


def read_train_data(path: str, what: str):
    """Chat JSONL / .txt (as :func:`read_data`), or prompt/answer JSONL as a list of dicts;
    ``what`` names the argument in errors."""
    from caft_tl.data import DataError

    p = Path(path)
    if not p.is_file():
        raise DataError(f"{what} {p} does not exist")
    first = next((line for line in p.read_text().splitlines() if line.strip()), "")
    try:
        head = json.loads(first) if p.suffix != ".txt" else None
    except json.JSONDecodeError:
        head = None  # load_jsonl reports the bad line with its number
    if not (isinstance(head, dict) and {"prompt", "answer"} <= set(head)):
        return read_data(path)
    rows = []
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{p}, line {n}: not valid JSON ({exc})") from None
    return rows


def add_intervention_args(p: argparse.ArgumentParser) -> None:
    """``--concepts``, ``--mode`` and ``--coef``, read back by :func:`intervention`."""
    p.add_argument("--concepts", default=None, help="saved ConceptSet folder to intervene with")
    p.add_argument(
        "--mode", choices=INTERVENTION_MODES, default=None, help="with --concepts (default zero)"
    )
    p.add_argument("--coef", type=float, default=None, help="steering coefficient (--mode steer)")


def check_intervention_args(args: argparse.Namespace) -> None:
    """Refuse ``--mode``/``--coef`` without ``--concepts`` and a steer mode without a coef,
    before any model is loaded."""
    if args.concepts is None:
        if args.mode is not None or args.coef is not None:
            raise ValueError("--mode and --coef need --concepts (a saved ConceptSet)")
        return
    if not Path(args.concepts).is_dir():
        raise ValueError(f"--concepts {args.concepts}: no such folder")
    if (args.mode == "steer") != (args.coef is not None):
        raise ValueError("--coef goes with --mode steer, and --mode steer needs --coef")


def intervention(args: argparse.Namespace, model, data):
    """The Ablation / Steering of ``--concepts`` (None without it); mean and steer fit their
    mean activation on ``data`` (all real tokens: the hooks act at every position)."""
    from caft_tl.compare import mean_batches
    from caft_tl.directions import ConceptSet
    from caft_tl.interventions import Ablation, Steering

    if args.concepts is None:
        return None
    try:
        concepts = ConceptSet.load(args.concepts)
    except FileNotFoundError as exc:  # a folder without the files: a usage error, not a crash
        raise ValueError(str(exc)) from None
    mode = args.mode or "zero"
    if mode == "steer":
        result = Steering(concepts, coef=args.coef)
    else:
        result = Ablation(concepts, mode=mode)
    if mode in ("mean", "steer"):
        result.fit_mean(
            model, mean_batches(model, data, batch_size=args.batch_size, max_length=args.max_length)
        )
    return result


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors the user can fix (bad input, a refusing judge server): ``main`` prints them as
    one line with exit code 2. Anything else is a bug and keeps its traceback."""
    from caft_tl.data import DataError
    from caft_tl.evals import JudgeError
    from caft_tl.models import ModelLoadError

    return (DataError, ModelLoadError, FileExistsError, FileNotFoundError, ValueError, JudgeError)
