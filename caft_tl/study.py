"""The one condition x seed runner: fine-tune a base model under each condition and seed,
evaluate every run, and cache both, so a study resumes where it stopped and a rerun with
more seeds or conditions trains only what is new.

Layout under ``out``: ``runs/s{seed}/{condition}/`` (a :func:`caft_tl.finetune` folder,
resumable, tidied once evaluated) and ``evals/{condition}/s{seed}.json`` (accuracy per
evaluation split). :func:`caft_tl.demo.run_demo` and
:func:`caft_tl.diagnostics.training_decomposition` run on it, and through them the studies
in ``analyses/``; :func:`caft_tl.compare.run_condition` is its training step.
"""

from __future__ import annotations

import gc
import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from caft_tl._io import read_json, write_text_atomic
from caft_tl.models import CHECKPOINT_MARKER
from caft_tl.train import tidy_run

if TYPE_CHECKING:  # typing only: no run-time import of the directions package
    from caft_tl.interventions import InterventionLike
    from caft_tl.train import TrainConfig

__all__ = ["Study", "StudyLog", "cached_json"]


class StudyLog:
    """Prints each stage with its duration (``echo``) and adds up the time per kind of
    stage (``times``: load, finetune, evaluate, ...) for a study's results."""

    def __init__(self, echo: bool = True, prefix: str = "demo") -> None:
        self.echo, self.prefix = echo, prefix
        self.times: dict[str, float] = {}
        self.start = time.perf_counter()

    def __call__(self, message: str) -> None:
        if self.echo:
            elapsed = time.perf_counter() - self.start
            print(f"[{self.prefix} {elapsed:6.0f}s] {message}", flush=True)

    def timed(self, name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        result = fn(*args, **kwargs)
        self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - started
        return result


def cached_json(path: Path, compute: Callable[[], Any], what: str = "study artefact") -> Any:
    """``path``'s JSON if it exists, else ``compute()`` written there atomically."""
    if path.exists():
        return read_json(path, what)
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(value, indent=2) + "\n")
    return value


class Study:
    """Runs and evaluations of one study under ``out``, each cached (see the module doc).

    Args:
        out: the study's folder.
        base: the model every run starts from.
        train: what every run trains on.
        splits: ``{name: data}``: the multiple-choice splits every run is evaluated on
            (e.g. ``{"test": ..., "ood": ...}``).
        train_config: ``(seed, keep) -> TrainConfig`` of one run (``keep``: steps to save
            as ``step-N`` snapshots).
        keep: the plain runs' snapshot steps, evaluated as ``plain@stepN`` (the
            "learned less" control).
        keep_models: keep every run's final model on disk instead of tidying it away.
        log: where stages are reported and timed.
    """

    def __init__(
        self,
        out: Path,
        base: Any,
        train: Any,
        splits: Mapping[str, Any],
        train_config: Callable[[int, Sequence[int]], TrainConfig],
        *,
        keep: Sequence[int] = (),
        keep_models: bool = False,
        log: StudyLog | None = None,
    ) -> None:
        self.out, self.base, self.train_data, self.splits = Path(out), base, train, dict(splits)
        self.train_config, self.keep, self.keep_models = train_config, list(keep), keep_models
        self.log = log or StudyLog(echo=False)
        self.evals: dict[str, Any] = {}

    def evaluated(self, names: Sequence[str]) -> bool:
        """Whether every evaluation in ``names`` (``"condition/s{seed}"``) is cached."""
        return all((self.out / "evals" / f"{name}.json").exists() for name in names)

    def evaluate(
        self, name: str, model_or_path: Any, intervention: InterventionLike | None = None
    ) -> None:
        """``evals[name]``: the model (or the saved model at a path) on every evaluation
        split, with ``intervention`` on when given; cached in ``evals/{name}.json``."""
        compute = _evaluator(model_or_path, self.splits, intervention)
        path = self.out / "evals" / f"{name}.json"
        self.evals[name] = self.log.timed("evaluate", cached_json, path, compute)

    def train(
        self, name: str, seed: int, intervention: InterventionLike | None = None, keep=()
    ) -> Any:
        """The fine-tuned model of condition ``name`` and ``seed`` (trained, resumed, or
        loaded when finished)."""
        from caft_tl.compare import run_condition

        cfg = self.train_config(seed, keep)
        folder = self.out / "runs" / f"s{seed}" / name
        length = f"{cfg.max_steps} steps" if cfg.max_steps else f"{cfg.epochs} epochs"
        self.log(f"{name} fine-tune, seed {seed} ({length})")
        return self.log.timed(
            "finetune", run_condition, self.base, self.train_data, cfg, intervention, None,
            folder,
        )  # fmt: skip

    def plain(self, seed: int, *, keep_final: bool = False, model: Any = None) -> Any:
        """The plain run of ``seed`` evaluated (and its learned-less snapshots); returns
        its model when it had to be trained or loaded (always with ``keep_final``)."""
        folder = self.out / "runs" / f"s{seed}" / "plain"
        names = [f"plain/s{seed}"] + [f"plain@step{step}/s{seed}" for step in self.keep]
        if model is None and (keep_final or not self.evaluated(names)):
            model = self.train("plain", seed, keep=self.keep)
        self.evaluate(names[0], model)
        for step, name in zip(self.keep, names[1:], strict=True):
            self.evaluate(name, folder / f"step-{step}")
        self.tidy(folder, keep_final=keep_final)
        return model

    def evaluate_with(
        self, name: str, model: Any, seed: int, intervention: InterventionLike
    ) -> Any:
        """Evaluate the plain model of ``seed`` with ``intervention`` on; returns the model
        (trained again when needed and not given)."""
        if model is None and not self.evaluated([name]):
            model = self.train("plain", seed, keep=self.keep)
        self.evaluate(name, model, intervention)
        return model

    def intervened(
        self, name: str, seed: int, intervention: InterventionLike | None, hook_on: bool = False
    ) -> None:
        """A run trained with ``intervention``, evaluated without it (and, with ``hook_on``,
        with it still on as ``{name}+hook``)."""
        names = [f"{name}/s{seed}"] + ([f"{name}+hook/s{seed}"] if hook_on else [])
        folder = self.out / "runs" / f"s{seed}" / name
        # keep_models: a run evaluated earlier without it may have to be trained again, but
        # one whose model is on disk need not even be loaded.
        missing = self.keep_models and not (folder / "final" / CHECKPOINT_MARKER).exists()
        model = None
        if not self.evaluated(names) or missing:
            model = self.train(name, seed, intervention)
        self.evaluate(names[0], model)
        if hook_on:
            self.evaluate(names[1], model, intervention)
        self.tidy(folder, keep_final=False)
        del model
        gc.collect()

    def tidy(self, folder: Path, *, keep_final: bool) -> None:
        """Free an evaluated run's disk (see :func:`caft_tl.train.tidy_run`)."""
        if (folder / "run.json").exists():
            tidy_run(folder, keep_final=keep_final, keep_all=self.keep_models)


def _evaluator(
    model_or_path: Any, splits: Mapping[str, Any], intervention: InterventionLike | None
) -> Callable[[], Any]:
    def compute() -> dict[str, Any]:
        from caft_tl.evals import evaluate_splits
        from caft_tl.models import load_model

        model = load_model(model_or_path) if isinstance(model_or_path, Path) else model_or_path
        return evaluate_splits(model, splits, intervention=intervention)

    return compute
