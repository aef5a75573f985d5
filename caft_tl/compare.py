"""CAFT and its controls as one call: the same fine-tune with different interventions.

The controls the method is judged against (same data, config and seed):

- ``plain``: no intervention;
- ``caft``: the selected concept directions ablated;
- ``random``: as many random orthonormal directions at the same hooks ("any ablation of
  that size");
- ``top``: the top-scoring directions of the full set (e.g. the first PCs), as many as the
  selection holds per hook ("ablating whatever varies most");
- ``plain@stepN``: the plain run's earlier snapshots ("the model just learned less").

Each run lives in ``out/<name>/`` (see :func:`caft_tl.train.finetune`); a finished run is
loaded instead of trained again, so re-running a comparison only trains what is missing.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformer_lens import HookedTransformer

from caft_tl.data import mask_batches
from caft_tl.directions.baselines import random_directions, top_k
from caft_tl.directions.concepts import ConceptSet
from caft_tl.interventions import Ablation
from caft_tl.models import CHECKPOINT_MARKER, load_model
from caft_tl.train import TrainConfig, finetune

RUNS = ("plain", "caft", "random", "top")


def baseline_interventions(
    concepts: ConceptSet,
    *,
    mode: str = "zero",
    all_directions: ConceptSet | None = None,
    runs: Sequence[str] = RUNS,
    seed: int = 0,
) -> dict[str, Ablation | None]:
    """The intervention of each run (``None`` for plain), before any mean is fitted."""
    unknown = sorted(set(runs) - set(RUNS))
    if unknown:
        raise ValueError(f"unknown runs {unknown}; choose from {list(RUNS)}")
    sets: dict[str, ConceptSet | None] = {"plain": None, "caft": concepts}
    if "random" in runs:
        sets["random"] = random_directions(concepts, seed=seed)
    if "top" in runs:
        if all_directions is None:
            raise ValueError("the 'top' control needs all_directions (e.g. the full PCA set)")
        sets["top"] = _top_like(all_directions, concepts)
    return {name: None if sets[name] is None else Ablation(sets[name], mode=mode) for name in runs}


def _top_like(all_directions: ConceptSet, concepts: ConceptSet) -> ConceptSet:
    # As many top directions per hook as the selection holds there, at the same hooks.
    parts = []
    for hook, chosen in concepts.directions.items():
        only_hook = all_directions.select({hook: list(range(len(all_directions[hook])))})
        parts.append(top_k(only_hook, len(chosen)))
    return functools.reduce(operator.or_, parts)


def finetune_with_baselines(
    model: HookedTransformer,
    data: Any,
    cfg: TrainConfig,
    concepts: ConceptSet,
    out: str | Path,
    *,
    mode: str = "zero",
    all_directions: ConceptSet | None = None,
    runs: Sequence[str] = RUNS,
    learned_less_steps: Sequence[int] = (),
    eval_data: Any = None,
) -> dict[str, HookedTransformer]:
    """Fine-tune ``model`` once per run (plain, CAFT and controls) with identical settings.

    Returns ``{run name: fine-tuned model}``, including ``plain@stepN`` for every step in
    ``learned_less_steps`` (snapshots of the plain run, which must then be in ``runs``).
    """
    if learned_less_steps and "plain" not in runs:
        raise ValueError("learned_less_steps needs the 'plain' run")
    out = Path(out)
    interventions = baseline_interventions(
        concepts, mode=mode, all_directions=all_directions, runs=runs, seed=cfg.seed
    )
    results: dict[str, HookedTransformer] = {}
    for name, intervention in interventions.items():
        run_cfg = cfg
        if name == "plain" and learned_less_steps:
            run_cfg = dataclasses.replace(cfg, keep_checkpoints=sorted(learned_less_steps))
        if intervention is not None and mode == "mean":
            batches_ = mean_batches(
                model, data, batch_size=cfg.batch_size, max_length=cfg.max_length
            )
            intervention.fit_mean(model, batches_)
        results[name] = run_condition(model, data, run_cfg, intervention, eval_data, out / name)
    for step in learned_less_steps:
        results[f"plain@step{step}"] = load_model(out / "plain" / f"step-{step}")
    return results


def run_condition(model, data, cfg, intervention, eval_data, folder: Path) -> HookedTransformer:
    """Fine-tune one condition into ``folder``, or load its final model if a finished run is
    already there (so a study resumes condition by condition)."""
    final = folder / "final"
    if (final / CHECKPOINT_MARKER).exists():
        return load_model(final, device=str(model.cfg.device))
    return finetune(
        model,
        data,
        cfg,
        intervention=intervention,
        eval_data=eval_data,
        out=folder,
        resume=(folder / "run.json").exists(),
    )


def mean_batches(
    model: HookedTransformer, data: Any, *, batch_size: int = 8, max_length: int | None = None
):
    """Batches of ``data`` as ``Intervention.fit_mean`` takes them, over all real tokens
    (the hooks act at every position, so the mean they remove is over every position)."""
    return mask_batches(data, model.tokenizer, batch_size, max_length=max_length)
