"""Which part of CAFT does the work? The same fine-tune under each half of the ablation.

Zero-ablation ``h - QQ^T h`` changes two things at once: the forward pass (activations lose
their component in span(Q), which on average also *shifts* them by ``-QQ^T mu``) and the
backward pass (no gradient flows along span(Q) at the hook). The conditions pull these apart,
all with the same data, config and seed:

- ``plain``:      no intervention;
- ``zero``:       ``h - QQ^T h`` (CAFT as published: both effects);
- ``detached``:   ``h - stopgrad(QQ^T h)``: the activation effect only;
- ``gradient``:   ``h`` forward, ``g - QQ^T g`` backward: the gradient effect only;
- ``steer+k`` / ``steer-k``: ``h + k QQ^T mu`` with mu the *base* model's mean activation on the
  training data: a pure shift (``steer-1`` is zero-ablation's average shift; ``+k`` pushes
  along the concept, as in preventative steering).

Each run is cached (``out/evals/<condition>/s<seed>.json``), so a second call only trains
what is missing; fine-tuned weights are deleted once evaluated unless ``keep_models``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from caft_tl._io import read_json, write_text_atomic
from caft_tl.activations import mean_activations
from caft_tl.directions.concepts import ConceptSet
from caft_tl.interventions import Ablation, Intervention, Steering
from caft_tl.train import TrainConfig

__all__ = [
    "decomposition_figure",
    "decomposition_interventions",
    "decomposition_table",
    "training_decomposition",
]

ABLATION_CONDITIONS = ("plain", "zero", "detached", "gradient")
DEFAULT_KS = (3.0, 5.0)


def _steer_name(coef: float) -> str:
    return f"steer{coef:+g}"


def condition_names(ks: Sequence[float] = DEFAULT_KS) -> list[str]:
    """The default conditions in table order: ablations, then ``steer±k`` for each k."""
    return [*ABLATION_CONDITIONS, *(_steer_name(s * k) for k in ks for s in (1, -1))]


def decomposition_interventions(
    concepts: ConceptSet,
    mean: Mapping[str, Any] | None = None,
    ks: Sequence[float] = DEFAULT_KS,
    conditions: Sequence[str] | None = None,
) -> dict[str, Intervention | None]:
    """The intervention of each condition (``None`` for plain). Steering conditions need
    ``mean`` (``{hook: mu}``, the base model's mean activation); names are ``steer+3``,
    ``steer-5``, ... and any ``steer<c>`` in ``conditions`` is accepted."""
    if any(k <= 0 for k in ks):
        raise ValueError(f"ks are magnitudes and must be > 0, got {list(ks)}")
    names = list(conditions) if conditions is not None else condition_names(ks)
    if not names:
        raise ValueError("no conditions")
    out: dict[str, Intervention | None] = {}
    for name in names:
        if name == "plain":
            out[name] = None
        elif name in Ablation.MODES:
            out[name] = Ablation(concepts, mode=name, mean=mean if name == "mean" else None)
        elif name.startswith("steer"):
            try:
                coef = float(name[len("steer") :])
            except ValueError:
                raise ValueError(f"bad steering condition {name!r}; write e.g. 'steer-3'") from None
            if mean is None:
                raise ValueError(f"condition {name!r} needs mean= (the base model's mean)")
            out[name] = Steering(concepts, coef, mean=mean)
        else:
            raise ValueError(
                f"unknown condition {name!r}; choose from plain, {', '.join(Ablation.MODES)} "
                "or steer<coef>"
            )
    return out


def _check_saved_config(out: Path, config: dict[str, Any]) -> None:
    path = out / "decomposition.json"
    if path.exists():
        old = read_json(path, "decomposition configuration")
        changed = sorted(k for k in config if old.get(k) != config[k])
        if changed:
            raise ValueError(
                f"{out} holds a decomposition with another configuration (differs in {changed});"
                " use another out folder or delete it"
            )
        return
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(config, indent=2) + "\n")


def _config(cfg: TrainConfig, concepts: ConceptSet, train, splits) -> dict:
    """What every cached run of the folder must share. Conditions and seeds are not in it:
    each (condition, seed) run is cached on its own, so adding some later is fine."""
    from caft_tl.directions.concepts import data_fingerprint

    train_cfg = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("seed", "progress")}
    return json.loads(
        json.dumps(
            {
                "train": train_cfg,
                "concepts": {h: concepts.labels[h] for h in concepts.hooks},
                "concepts_fingerprint": data_fingerprint([concepts[h] for h in concepts.hooks]),
                "train_data": data_fingerprint(train),
                "eval_data": {k: data_fingerprint(v) for k, v in splits.items()},
            },
            default=str,
        )
    )


def training_decomposition(
    base: HookedTransformer,
    train: Any,
    concepts: ConceptSet,
    eval_data: Mapping[str, Any],
    cfg: TrainConfig,
    out: str | Path,
    *,
    seeds: Sequence[int] = (0,),
    ks: Sequence[float] = DEFAULT_KS,
    conditions: Sequence[str] | None = None,
    keep_models: bool = False,
    progress: bool = True,
) -> pd.DataFrame:
    """Fine-tune ``base`` on ``train`` once per condition and seed; evaluate every run with
    multiple choice on each split of ``eval_data`` (e.g. ``{"test": .., "ood": ..}``).

    Returns a tidy table: one row per condition, seed and split with ``accuracy``,
    ``vocab_accuracy``, ``mean_margin``, ``option_mass`` and ``n``. ``cfg.seed`` is replaced
    by each seed. Summarise with :func:`decomposition_table`; plot with
    :func:`decomposition_figure`.
    """
    from caft_tl.compare import mean_batches
    from caft_tl.study import Study

    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct and at least one, got {list(seeds)}")
    if not eval_data:
        raise ValueError("eval_data is empty: give e.g. {'test': test, 'ood': ood}")
    names = list(conditions) if conditions is not None else condition_names(ks)
    out = Path(out)
    _check_saved_config(out, _config(cfg, concepts, train, eval_data))
    mean = None
    if any(n.startswith("steer") or n == "mean" for n in names):
        batches = mean_batches(base, train, batch_size=cfg.batch_size, max_length=cfg.max_length)
        mean = mean_activations(base, concepts.hooks, batches)
    interventions = decomposition_interventions(concepts, mean, ks, names)

    def run_config(seed: int, keep: Sequence[int]) -> TrainConfig:
        return dataclasses.replace(cfg, seed=seed, progress=False)

    study = Study(out, base, train, eval_data, run_config, keep_models=keep_models)
    rows = []
    jobs = [(seed, name) for seed in seeds for name in names]
    for seed, name in tqdm(jobs, desc="decomposition", disable=not progress):
        study.intervened(name, seed, interventions[name])
        evals = study.evals[f"{name}/s{seed}"]
        rows += [{"condition": name, "seed": seed, "split": s, **r} for s, r in evals.items()]
    return pd.DataFrame(rows)


def decomposition_table(results: pd.DataFrame, metric: str = "accuracy") -> pd.DataFrame:
    """Mean, min and max of ``metric`` over seeds, one row per condition, one column group
    per split (conditions in the order they were run)."""
    if results.empty:
        raise ValueError("no results to tabulate")
    order = list(dict.fromkeys(results["condition"]))
    stats = results.groupby(["condition", "split"])[metric].agg(["mean", "min", "max", "count"])
    table = stats.unstack("split")
    table.columns = [f"{split}_{stat}" for stat, split in table.columns]
    splits = list(dict.fromkeys(results["split"]))
    columns = [f"{s}_{stat}" for s in splits for stat in ("mean", "min", "max")]
    table = table.loc[order, columns]
    table.insert(0, "n_seeds", stats["count"].groupby("condition").max().loc[order])
    return table


def decomposition_figure(results: pd.DataFrame, metric: str = "accuracy", title: str | None = None):
    """Grouped bars: ``metric`` per condition and split (mean over seeds, min-max range as
    error bars)."""
    import plotly.graph_objects as go

    order = list(dict.fromkeys(results["condition"]))
    fig = go.Figure()
    for split in dict.fromkeys(results["split"]):
        part = results[results["split"] == split]
        agg = part.groupby("condition")[metric].agg(["mean", "min", "max"]).loc[order]
        fig.add_bar(
            x=order,
            y=agg["mean"],
            name=split,
            error_y={
                "type": "data",
                "symmetric": False,
                "array": agg["max"] - agg["mean"],
                "arrayminus": agg["mean"] - agg["min"],
            },
        )
    fig.update_layout(
        barmode="group",
        title=title or f"Training decomposition: {metric} per condition (range over seeds)",
        xaxis_title="intervention during fine-tuning",
        yaxis_title=metric,
        yaxis_range=[0, 1.05] if "accuracy" in metric else None,
    )
    return fig
