"""Ablation vs steering on a model with no training: is zero-ablation a disguised steer?

The residual stream has no preferred origin, so zero-ablation ``h - QQ^T h`` does two things:
it removes the variation along span(Q), and it moves the activations by ``-QQ^T h``, on
average ``-QQ^T mu``. Steering by ``c QQ^T mu`` (mu the model's mean activation on the data)
reproduces only the shift: ``c = -1`` is zero-ablation's average shift, and mean-ablation
``h - QQ^T (h - mu)`` removes the variation with no average shift. Measuring behaviour along
the steering curve, with the two ablations marked on it, shows which effect dominates.

:func:`steering_vs_ablation` measures, per direction (and for all directions together):

- multiple-choice data (rows with ``prompt``, ``options``, ``answer``): ``logit_diff`` (the
  correct option's logit minus the best other one's), ``accuracy``, ``option_mass`` and
  ``kl`` (KL from the unablated model's next-token distribution at the answer position);
- other data (texts or chats): ``loss`` (mean next-token loss over the real tokens) and
  ``kl`` (mean over those positions); with a ``judge``, also ``judge_score`` of greedy
  completions.

:func:`sign_report` then says whether zero-ablation acts like positive or negative steering
on a metric, and by roughly which coefficient.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from caft_tl._io import load_frames, now_iso, save_frames
from caft_tl.activations import mean_activations
from caft_tl.data.chat import DataError, collate, pad_id
from caft_tl.directions.concepts import ConceptSet, check_hook_widths
from caft_tl.errors import InputKeyError
from caft_tl.evals.judges import Judge
from caft_tl.interventions import Ablation, Intervention, Steering

__all__ = [
    "DEFAULT_COEFS",
    "Judge",
    "SteeringSweep",
    "sign_report",
    "steering_vs_ablation",
]

DEFAULT_COEFS = tuple(float(c) for c in range(-5, 6))
ALL = "all"
SWEEP_FORMAT = "caft-tl/steering-sweep"


JudgeLike = Judge | Callable[[Sequence[str], Sequence[str]], Sequence[float | None]]


# --------------------------------------------------------------------------------------------
# Data: what one forward pass needs
# --------------------------------------------------------------------------------------------


@dataclass
class PreparedInputs:
    """Tokenised data plus, per kind, what is scored."""

    kind: str  # "multiple_choice" | "text"
    input_ids: list[list[int]]
    option_ids: list[list[int]] = field(default_factory=list)
    correct: list[int] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)  # generation prompts, for a judge


def _is_multiple_choice(data: Any) -> bool:
    from datasets import Dataset

    if isinstance(data, Dataset):
        return {"prompt", "options", "answer"} <= set(data.column_names)
    if isinstance(data, Sequence) and data and isinstance(data[0], Mapping):
        return {"prompt", "options", "answer"} <= set(data[0])
    return False


def prepare_inputs(model: HookedTransformer, data: Any, max_length: int | None) -> PreparedInputs:
    """Token ids (and, for multiple-choice data, option ids and correct indices) of
    ``data`` for the diagnostics' forward passes."""
    from caft_tl.evals.multiple_choice import check_rows, encode_rows, prompt_text

    if model.tokenizer is None:
        raise ValueError("the model has no tokenizer; steering_vs_ablation needs one")
    if _is_multiple_choice(data):
        rows = check_rows(data)
        encoded = encode_rows(rows, model.tokenizer)
        return PreparedInputs(
            "multiple_choice",
            [e["input_ids"] for e in encoded],
            [e["option_ids"] for e in encoded],
            [e["correct"] for e in encoded],
            [prompt_text(r["prompt"], model.tokenizer, i) for i, r in enumerate(rows)],
        )
    from caft_tl.activations import tokenized_input
    from caft_tl.data import as_dataset, chat_to_text

    ds = as_dataset(data)
    tokens = tokenized_input(ds, model, max_length, "all")
    if "messages" in ds.column_names:
        render = lambda m: chat_to_text(m, model.tokenizer, add_generation_prompt=True)  # noqa: E731
        prompts = [render(m) for m in ds["messages"]]
    else:
        prompts = list(ds["text"])
    ids = [list(x) for x in tokens["input_ids"]]
    if any(len(x) < 2 for x in ids):
        raise DataError("every text needs at least 2 tokens to score next-token predictions")
    return PreparedInputs("text", ids, prompts=prompts)


def input_batches(
    prep: PreparedInputs, batch_size: int, pad: int, device: Any
) -> Iterator[tuple[list[int], dict]]:
    """``(row indices, padded batch on device)`` over ``prep`` in order."""
    for start in range(0, len(prep.input_ids), batch_size):
        index = list(range(start, min(start + batch_size, len(prep.input_ids))))
        batch = collate([{"input_ids": prep.input_ids[i]} for i in index], pad_token_id=pad)
        yield index, {k: v.to(device) for k, v in batch.items()}


# --------------------------------------------------------------------------------------------
# Scoring one condition
# --------------------------------------------------------------------------------------------


def _kl(
    clean_logp: Float[Tensor, "... vocab"], logp: Float[Tensor, "... vocab"]
) -> Float[Tensor, "..."]:
    """KL(clean || intervened) per position."""
    return (clean_logp.exp() * (clean_logp - logp)).sum(-1)


def _mc_scores(
    logits: Float[Tensor, "batch vocab"],
    clean_logp: Float[Tensor, "batch vocab"],
    option_ids: Tensor,
    correct: Tensor,
) -> dict[str, Tensor]:
    logp = logits.log_softmax(-1)
    option_logits = logits.gather(1, option_ids)
    right = option_logits.gather(1, correct[:, None])[:, 0]
    others = option_logits.scatter(1, correct[:, None], -math.inf)
    return {
        "logit_diff": right - others.max(-1).values,
        "accuracy": (option_logits.argmax(-1) == correct).float(),
        "option_mass": logp.exp().gather(1, option_ids).sum(-1),
        "kl": _kl(clean_logp, logp),
    }


@dataclass
class _Prefix:
    """The clean residual stream entering block ``layer`` for every batch: interventions
    that act at block ``layer`` or later need not rerun the blocks before it."""

    layer: int
    resid: dict[int, Tensor]  # first example index of a batch -> [batch, pos, d_model]

    def at(self, start: int) -> tuple[int, Tensor]:
        return self.layer, self.resid[start]


PREFIX_BUDGET = 2 * 2**30  # bytes of cached residuals; beyond this, run whole forwards


def _first_layer(hooks: Sequence[str]) -> int:
    layers = []
    for hook in hooks:
        parts = hook.split(".")
        if len(parts) < 3 or parts[0] != "blocks" or not parts[1].isdigit():
            return 0  # embedding hooks: the whole model runs
        layers.append(int(parts[1]))
    return min(layers)


@torch.no_grad()
def _prefix(
    model: HookedTransformer, prep: PreparedInputs, hooks: Sequence[str], batch_size: int
) -> _Prefix | None:
    layer = _first_layer(hooks)
    tokens = sum(len(ids) for ids in prep.input_ids)
    size = tokens * model.cfg.d_model * torch.finfo(model.cfg.dtype).bits // 8
    if layer == 0 or size > PREFIX_BUDGET:
        return None
    device = next(model.parameters()).device
    resid = {}
    for index, batch in input_batches(prep, batch_size, pad_id(model.tokenizer), device):
        ids, att = batch["input_ids"], batch["attention_mask"]
        resid[index[0]] = model(ids, attention_mask=att, stop_at_layer=layer)
    return _Prefix(layer, resid)


def _forward(
    model: HookedTransformer, batch: dict[str, Tensor], start: tuple[int, Tensor] | None
) -> Float[Tensor, "batch pos vocab"]:
    ids, att = batch["input_ids"], batch["attention_mask"]
    if start is None:
        return model(ids, attention_mask=att).float()
    layer, resid = start  # checked equal to the whole forward in the tests
    return model(resid, start_at_layer=layer, tokens=ids, attention_mask=att).float()


@torch.no_grad()
def _run_condition(
    model: HookedTransformer,
    prep: PreparedInputs,
    intervention: Intervention | None,
    clean: dict[int, Tensor] | None,
    batch_size: int,
    prefix: _Prefix | None = None,
) -> tuple[dict[str, np.ndarray], dict[int, Tensor]]:
    """Per-example metrics under ``intervention``. With ``clean=None`` this *is* the clean
    run, and it returns its answer-position log-probabilities for the KLs of the later
    conditions (multiple choice); for texts, whose every position counts, the clean
    forward is recomputed per batch instead of holding [pos, vocab] per text."""
    device = next(model.parameters()).device
    per_example: dict[str, list[float]] = {}
    kept: dict[int, Tensor] = {}
    pad = pad_id(model.tokenizer)
    for index, batch in input_batches(prep, batch_size, pad, device):
        real = batch["attention_mask"].bool()
        context = nullcontext() if intervention is None else intervention.applied(model)
        with context:
            logits = _forward(model, batch, None if prefix is None else prefix.at(index[0]))
        if prep.kind == "multiple_choice":
            logits = logits[torch.arange(len(index)), real.sum(-1) - 1]
            logp = logits.log_softmax(-1)
            if clean is None:
                kept.update({i: logp[j].cpu() for j, i in enumerate(index)})
            ref = logp if clean is None else torch.stack([clean[i] for i in index]).to(device)
            options = torch.tensor([prep.option_ids[i] for i in index], device=device)
            correct = torch.tensor([prep.correct[i] for i in index], device=device)
            scores = _mc_scores(logits, ref, options, correct)
        else:
            ref_logits = logits
            if intervention is not None:
                ref_logits = _forward(model, batch, None if prefix is None else prefix.at(index[0]))
            scores = _text_scores(logits, ref_logits, batch["input_ids"], real)
        for name, values in scores.items():
            per_example.setdefault(name, []).extend(values.tolist())
    return {k: np.asarray(v) for k, v in per_example.items()}, kept


def _text_scores(
    logits: Float[Tensor, "batch pos vocab"],
    clean_logits: Float[Tensor, "batch pos vocab"],
    input_ids: Tensor,
    real: Tensor,
) -> dict[str, Tensor]:
    logp = logits[:, :-1].log_softmax(-1)
    scored = (real[:, 1:] & real[:, :-1]).float()  # predict token t+1 from t, both real
    nll = -logp.gather(-1, input_ids[:, 1:, None])[..., 0]
    kl = _kl(clean_logits[:, :-1].log_softmax(-1), logp)
    n = scored.sum(-1).clamp(min=1)
    return {"loss": (nll * scored).sum(-1) / n, "kl": (kl * scored).sum(-1) / n}


def _judge_scores(
    model: HookedTransformer,
    prep: PreparedInputs,
    intervention: Intervention | None,
    judge: JudgeLike,
    max_new_tokens: int,
) -> np.ndarray:
    from caft_tl.data.chat import encode_text
    from caft_tl.evals.sampling import SamplingConfig, generate

    # Greedy, batched, with the condition's hooks on (see caft_tl.evals.sampling).
    cfg = SamplingConfig(temperature=0.0, max_new_tokens=max_new_tokens, progress=False)
    prompts = [encode_text(model.tokenizer, p) for p in prep.prompts]
    gens = generate(model, prompts, cfg, intervention=intervention)
    answers = [model.tokenizer.decode(g.tokens, skip_special_tokens=True) for g in gens]
    score = judge.score if hasattr(judge, "score") else judge
    scores = list(score(prep.prompts, answers))
    if len(scores) != len(answers):
        raise ValueError(f"the judge returned {len(scores)} scores for {len(answers)} answers")
    return np.asarray([np.nan if s is None else float(s) for s in scores])


# --------------------------------------------------------------------------------------------
# The sweep
# --------------------------------------------------------------------------------------------


def _direction_sets(concepts: ConceptSet, per_direction: bool) -> dict[str, ConceptSet]:
    sets = {}
    if per_direction and concepts.n_directions > 1:
        for hook in concepts.hooks:
            for i, label in enumerate(concepts.labels[hook]):
                sets[f"{label} @ {hook}"] = concepts.select({hook: [i]})
    sets[ALL] = concepts
    return sets


def _conditions(
    directions: ConceptSet, mean: Mapping[str, Tensor], coefs: Sequence[float]
) -> list[tuple[str, float, Intervention | None]]:
    """(condition, coefficient, intervention): the ablations sit at the coefficient whose
    steering matches their average shift (zero: -1, mean: 0)."""
    mean = {h: mean[h] for h in directions.hooks}  # a single direction's set has fewer hooks
    out: list[tuple[str, float, Intervention | None]] = [
        ("zero", -1.0, Ablation(directions, mode="zero")),
        ("mean", 0.0, Ablation(directions, mode="mean", mean=mean)),
    ]
    for c in coefs:
        out.append(("steer", float(c), None if c == 0 else Steering(directions, c, mean=mean)))
    return out


def _check_coefs(coefs: Sequence[float]) -> list[float]:
    values = sorted({float(c) for c in coefs} | {-1.0, 0.0})  # the ablations' shift-matches
    if not all(math.isfinite(c) for c in values):
        raise ValueError(f"coefficients must be finite, got {list(coefs)}")
    if len(values) < 3:
        raise ValueError("give at least one steering coefficient besides -1 and 0")
    return values


def steering_vs_ablation(
    model: HookedTransformer,
    concepts: ConceptSet,
    data: Any,
    *,
    coefs: Sequence[float] = DEFAULT_COEFS,
    per_direction: bool = True,
    mean: Mapping[str, Tensor] | None = None,
    mean_data: Any = None,
    judge: JudgeLike | None = None,
    max_new_tokens: int = 40,
    batch_size: int = 16,
    max_length: int | None = None,
    progress: bool = True,
) -> SteeringSweep:
    """Behaviour of ``model`` (no training) under zero-ablation, mean-ablation and steering by
    ``c x QQ^T mu`` for each ``c`` in ``coefs``, for each direction alone
    (``per_direction``) and for all of ``concepts`` together.

    ``mu`` is the model's mean activation at each hook over every real token of ``data``
    (or of ``mean_data``; or ``mean={hook: mu}``): every position, as the hooks act at every
    position. Pass the base model to steer by the base model's mean projection. -1 and 0 are
    always in the sweep: they are the coefficients whose steering matches zero- and
    mean-ablation's average shift.
    See the module docstring for the metrics; ``judge`` (a :class:`Judge` or a callable
    ``(questions, answers) -> scores``) adds ``judge_score`` of greedy completions of at
    most ``max_new_tokens`` tokens.
    """
    if not isinstance(concepts, ConceptSet):
        raise TypeError(f"concepts must be a ConceptSet, got {type(concepts).__name__}")
    check_hook_widths(model, concepts.widths)
    concepts = concepts.orthonormalised() if concepts.non_orthonormal_hooks() else concepts
    values = _check_coefs(coefs)
    prep = prepare_inputs(model, data, max_length)
    if judge is not None and prep.kind == "multiple_choice":
        raise ValueError("a judge scores free-form answers; multiple-choice data has no use for it")
    if mean is None:
        source = prep if mean_data is None else mean_data
        mean = _fit_mean(model, concepts, source, batch_size, max_length)

    was_training = model.training
    model.eval()
    try:
        clean_scores, clean = _run_condition(model, prep, None, None, batch_size)
        judged_by = lambda i: _judge_scores(model, prep, i, judge, max_new_tokens)  # noqa: E731
        clean_judge = None if judge is None else judged_by(None)
        sets = _direction_sets(concepts, per_direction)
        jobs = [(name, c) for name, d in sets.items() for c in _conditions(d, mean, values)]
        prefixes: dict[int, _Prefix | None] = {}
        rows: list[dict[str, Any]] = []
        examples: list[pd.DataFrame] = []
        for name, (condition, coef, intervention) in tqdm(
            jobs, desc="steering vs ablation", disable=not progress
        ):
            if intervention is None:  # steering by 0 is the clean model
                scores, judged = clean_scores, clean_judge
            else:
                layer = _first_layer(sets[name].hooks)
                if layer not in prefixes:
                    prefixes[layer] = _prefix(model, prep, sets[name].hooks, batch_size)
                run = (model, prep, intervention, clean, batch_size, prefixes[layer])
                scores, _ = _run_condition(*run)
                judged = None if judge is None else judged_by(intervention)
            if judged is not None:
                scores = {**scores, "judge_score": judged}
            examples.append(_example_frame(scores, name, condition, coef))
            rows.append({"directions": name, "condition": condition, "coef": coef,
                         **{k: float(np.nanmean(v)) for k, v in scores.items()}})  # fmt: skip
    finally:
        model.train(was_training)
    meta = _sweep_meta(model, prep, concepts, mean, values)
    return SteeringSweep(pd.DataFrame(rows), pd.concat(examples, ignore_index=True), meta)


def _example_frame(
    scores: dict[str, Any], name: str, condition: str, coef: float | None
) -> pd.DataFrame:
    """One condition's per-example scores, keyed by directions, condition, coef, example."""
    frame = pd.DataFrame(scores)
    frame.insert(0, "example", range(len(frame)))
    frame.insert(0, "coef", coef)
    frame.insert(0, "condition", condition)
    frame.insert(0, "directions", name)
    return frame


def _sweep_meta(model, prep: PreparedInputs, concepts: ConceptSet, mean, values) -> dict:
    """What a :class:`SteeringSweep` records besides its tables (the mean projections
    ``Q mu`` included, so a reader can see the size of the steering vector)."""
    return {
        "kind": prep.kind,
        "n_examples": len(prep.input_ids),
        "coefs": values,
        "concepts": {h: concepts.labels[h] for h in concepts.hooks},
        "mean_projection": {
            h: (concepts[h].to(torch.float64) @ mean[h].to(torch.float64)).tolist()
            for h in concepts.hooks
        },
        "model": model.cfg.model_name,
        "date": now_iso(),
    }


def _fit_mean(model, concepts: ConceptSet, data: Any, batch_size: int, max_length) -> dict:
    prep = data if isinstance(data, PreparedInputs) else prepare_inputs(model, data, max_length)
    device = next(model.parameters()).device

    def batches():
        for _, batch in input_batches(prep, batch_size, pad_id(model.tokenizer), device):
            yield {"input_ids": batch["input_ids"], "mask": batch["attention_mask"]}

    return mean_activations(model, concepts.hooks, batches(), batch_size=batch_size)


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


@dataclass
class SteeringSweep:
    """The result of :func:`steering_vs_ablation`.

    ``table``: one row per direction set (``directions``: a direction's label and hook, or
    ``"all"``), ``condition`` ("zero", "mean", "steer") and ``coef`` with each metric's mean;
    ``examples``: the same per example (for paired uncertainties); ``meta``: data kind,
    coefficients, concepts and each direction's mean projection.
    """

    table: pd.DataFrame
    examples: pd.DataFrame
    meta: dict[str, Any]

    @property
    def metrics(self) -> list[str]:
        fixed = {"directions", "condition", "coef"}
        return [c for c in self.table.columns if c not in fixed]

    @property
    def default_metric(self) -> str:
        if "judge_score" in self.metrics:
            return "judge_score"
        return "logit_diff" if self.meta["kind"] == "multiple_choice" else "loss"

    def curve(self, directions: str = ALL, metric: str | None = None) -> pd.Series:
        """The steering curve: ``metric`` by coefficient for one direction set."""
        metric = self._metric(metric)
        t = self.table
        part = t[(t["directions"] == directions) & (t["condition"] == "steer")]
        if part.empty:
            raise InputKeyError(f"no direction set {directions!r}; have {self.direction_sets}")
        return part.set_index("coef")[metric].sort_index()

    @property
    def direction_sets(self) -> list[str]:
        return list(dict.fromkeys(self.table["directions"]))

    def _metric(self, metric: str | None) -> str:
        metric = metric or self.default_metric
        if metric not in self.metrics:
            raise ValueError(f"unknown metric {metric!r}; have {self.metrics}")
        return metric

    def sign_report(self, metric: str | None = None) -> pd.DataFrame:
        """See :func:`sign_report`."""
        return sign_report(self, metric)

    def figure(self, metrics: Sequence[str] | None = None, title: str | None = None):
        """The steering curves (one line per direction set, one panel per metric) with
        zero-ablation (at c = -1, the steering that matches its average shift) and
        mean-ablation (at c = 0) marked: a marker on its curve means the ablation does what
        its shift does; off the curve, removing the variation matters."""
        return _figure(self, metrics, title)

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """A folder with ``table.csv``, ``examples.csv`` and ``sweep.json``, atomically."""
        frames = {"table": self.table, "examples": self.examples}
        meta = {"format": SWEEP_FORMAT, "version": 1, **self.meta}
        return save_frames(path, frames, "sweep.json", meta, overwrite)

    @classmethod
    def load(cls, path: str | os.PathLike) -> SteeringSweep:
        names = ["table", "examples"]
        frames, meta = load_frames(path, names, "sweep.json", SWEEP_FORMAT, "steering sweep")
        return cls(frames["table"], frames["examples"], meta)


# A grid point counts as a crossing when it is this close to the target, relative to the
# curve's scale: float sums over examples are not bit-identical between two routes to the
# same activations (zero-ablation and steering by -1 on planted data agree to ~1e-7).
CROSSING_RTOL = 1e-5


def _crossings(curve: pd.Series, target: float) -> list[float]:
    """Coefficients where the piecewise-linear curve takes the value ``target``: grid points
    within :data:`CROSSING_RTOL` of it, and interpolated sign changes between the others."""
    c, y = curve.index.to_numpy(float), curve.to_numpy(float) - target
    scale = max(float(np.abs(curve.to_numpy(float)).max()), abs(target), 1e-12)
    on = np.abs(y) <= CROSSING_RTOL * scale
    out = [float(c[i]) for i in range(len(c)) if on[i]]
    for i in range(len(c) - 1):
        if not (on[i] or on[i + 1]) and y[i] * y[i + 1] < 0:
            out.append(float(c[i] - y[i] * (c[i + 1] - c[i]) / (y[i + 1] - y[i])))
    return sorted(set(out))


def _monotone(curve: pd.Series) -> bool:
    steps = np.diff(curve.to_numpy(float))
    return bool((steps >= 0).all() or (steps <= 0).all())


def _paired(sweep: SteeringSweep, name: str, condition: str, coef: float, metric: str):
    """Mean change from the clean model and its standard error, paired by example."""
    ex = sweep.examples
    part = ex[ex["directions"] == name]
    clean = part[(part["condition"] == "steer") & (part["coef"] == 0.0)].set_index("example")
    this = part[(part["condition"] == condition) & (part["coef"] == coef)].set_index("example")
    diff = (this[metric] - clean[metric]).dropna()
    n = len(diff)
    se = float(diff.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    return float(diff.mean()), se


def sign_report(sweep: SteeringSweep, metric: str | None = None, z: float = 2.0) -> pd.DataFrame:
    """Per direction set: does zero-ablation act like positive or negative steering on
    ``metric``, and by roughly which coefficient?

    Columns: ``clean`` (the metric without intervention); ``zero_change`` ± ``zero_se``
    (zero-ablation's change, standard error paired by example); ``mean_change`` (mean-
    ablation's: removing the variation without the shift); ``shift_change`` (steering by
    -1: the shift without the removal); ``crossings`` (every coefficient where the steering
    curve, read piecewise linearly, takes zero-ablation's value); ``equivalent_coef`` (the
    crossing nearest c = -1, NaN when there is none); ``monotone`` (whether the curve is
    monotone over the sweep; when it is not, several crossings may exist and the others
    are listed); ``shift_explains`` (``shift_change / zero_change``); ``acts_like``:
    "negative steering" / "positive steering" (sign of ``equivalent_coef``), "no measurable
    effect" (``|zero_change| < z x zero_se``) or "not reproduced by steering". KL has no
    sign, so the default metric is logit_diff (multiple choice), judge_score or loss.

    Why the crossing nearest -1: zero-ablation's average effect on the activations *is*
    steering by -1 (``-QQ^T mu``), so a crossing there is the one its measured mean shift
    explains. Taking the crossing nearest 0 instead can name the wrong side: on a
    non-monotone curve with crossings at -1 and +0.4 it would read "positive steering" for
    what is exactly negative steering.
    """
    metric = sweep._metric(metric)
    rows = []
    for name in sweep.direction_sets:
        curve = sweep.curve(name, metric)
        clean = float(curve.loc[0.0])
        zero, zero_se = _paired(sweep, name, "zero", -1.0, metric)
        mean, _ = _paired(sweep, name, "mean", 0.0, metric)
        shift, _ = _paired(sweep, name, "steer", -1.0, metric)
        crossings = _crossings(curve, clean + zero)
        crossings = [c for c in crossings if c != 0.0] or crossings
        coef = min(crossings, key=lambda c: (abs(c + 1.0), c)) if crossings else math.nan
        if not abs(zero) >= z * zero_se:  # NaN-safe: a single example gives no SE
            acts = "no measurable effect"
        elif math.isnan(coef):
            acts = "not reproduced by steering"
        else:
            acts = "negative steering" if coef < 0 else "positive steering"
        rows.append({
            "directions": name, "metric": metric, "clean": clean, "zero_change": zero,
            "zero_se": zero_se, "mean_change": mean, "shift_change": shift,
            "crossings": crossings, "equivalent_coef": coef, "monotone": _monotone(curve),
            "shift_explains": shift / zero if zero else math.nan, "acts_like": acts,
        })  # fmt: skip
    return pd.DataFrame(rows)


def _figure(sweep: SteeringSweep, metrics: Sequence[str] | None, title: str | None):
    import plotly.colors
    from plotly.subplots import make_subplots

    metrics = list(metrics) if metrics else _default_panels(sweep)
    for m in metrics:
        sweep._metric(m)
    fig = make_subplots(rows=1, cols=len(metrics), subplot_titles=metrics)
    palette = plotly.colors.qualitative.Plotly
    t = sweep.table
    for s, name in enumerate(sweep.direction_sets):
        color = palette[s % len(palette)]
        part = t[t["directions"] == name]
        steer = part[part["condition"] == "steer"].sort_values("coef")
        for col, metric in enumerate(metrics, start=1):
            first = col == 1
            fig.add_scatter(
                x=steer["coef"], y=steer[metric], mode="lines+markers", name=name,
                legendgroup=name, showlegend=first, line={"color": color}, row=1, col=col,
            )  # fmt: skip
            for condition, symbol in (("zero", "x"), ("mean", "diamond")):
                point = part[part["condition"] == condition]
                fig.add_scatter(
                    x=point["coef"], y=point[metric], mode="markers",
                    name=f"{condition}-ablation", legendgroup=condition,
                    showlegend=first and s == 0,
                    marker={"symbol": symbol, "size": 13, "color": color,
                            "line": {"width": 1, "color": "black"}},
                    hovertext=f"{condition}-ablation of {name}", row=1, col=col,
                )  # fmt: skip
            fig.update_xaxes(
                title_text="steering coefficient c (x mean projection)", row=1, col=col
            )
    fig.update_layout(
        title=title
        or f"Steering vs ablation ({sweep.meta['n_examples']} examples; "
        "zero-ablation drawn at c = -1, mean-ablation at c = 0)",
        height=420,
        width=max(520, 430 * len(metrics)),
    )
    return fig


def _default_panels(sweep: SteeringSweep) -> list[str]:
    if sweep.meta["kind"] == "multiple_choice":
        return ["logit_diff", "accuracy", "kl"]
    return [m for m in ("loss", "kl", "judge_score") if m in sweep.metrics]
