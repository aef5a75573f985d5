"""The end-to-end CAFT study on the gender-pronoun task (``caft-tl demo``).

Steps, each saving its artefacts under ``out/`` so that a second run reuses them:

1. ``base``: accuracy of the untrained model on the in-distribution test split and the OOD
   split (paired: row i of both is the same sentence with the other gender).
2. ``runs/s{seed}/plain``: plain fine-tunes on the training split (profession stereotype and
   pronoun gender always agree), one per seed.
3. ``directions/``: activation differences (plain seed-0 model minus base) at the study's
   hooks on training prompts and generic chat prompts, their top principal components
   (``pca/``), and with ``sae=True`` the latents of an SAE trained on the base model's
   activations, ranked by their mean activation change (``sae_latents/``).
4. ``concepts/``: selection by hinted interpretation: each direction's AUROC at separating
   sentences about women from the same sentences about men (:func:`caft_tl.tasks.gender_contrast`,
   never task or OOD data). Directions reaching ``min_auroc`` are kept; when none does, the
   best ``fallback`` directions are kept and the results say so.
5. ``runs/s{seed}/{caft,random,top,...}``: the same fine-tune with the selected directions
   ablated, with as many random directions, and with as many top PCs.
6. ``evals/``: ID and OOD accuracy of every model (plus the plain runs' mid-training
   snapshots, the "learned less" control).
7. ``results.json`` and a self-contained ``report.html``.

Disk: a finished run's resumable state (weights + AdamW moments, ~1.9 GB for SmolLM2) is
deleted once it is evaluated, and so is its model (0.6 GB) except the plain seed-0 one that
the directions come from (``keep_models=True`` keeps them all). Evaluations are cached, so a
second run retrains nothing; a run killed mid-way resumes from its checkpoint.

Everything is offline and deterministic by seed. The defaults are sized for 2 CPU cores
(measured on 2 cores: 27 minutes before the fast paths; ``quick`` 7, now 4).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from caft_tl._io import dataclass_from_dict, now_iso, read_json, write_text_atomic
from caft_tl.study import Study, StudyLog
from caft_tl.train import tidy_run
from caft_tl.viz import demo_report, summary_table

__all__ = [
    "DemoConfig",
    "demo_concepts",
    "demo_study",
    "run_demo",
    "select_by_hints",
    "summary_table",
]

RESULTS_FORMAT = "caft_tl.demo_results"

# The demo's task: the pick of the pre-registered evidence search (analyses/evidence_search.py;
# its table ships as caft_tl/evidence_search.json and the report shows it).
DEFAULT_TASK = "gender2:doctor|nurse"
# Per-task settings of `caft-tl demo` (fields not named keep the dataclass defaults, which are
# the gender_pronoun study's). gender2: the search's training (constant lr after 5 warm-up
# steps) and its pick, one epoch of all 286 rows, all 190 held-out rows, so the demo's seeds
# 0 and 1 give the numbers of the five-seed comparison (analyses/evidence_comparison.py); two
# seeds take about 22 minutes on 2 cores (measured per seed in that comparison: 9.4 min).
TASK_PRESETS: dict[str, dict[str, Any]] = {
    "gender2:doctor|nurse": dict(
        seeds=[0, 1],
        n_train=286,
        n_eval=190,
        max_steps=36,
        warmup_steps=5,
        schedule="constant",
        learned_less_step=18,
        test_time=True,
    ),  # fmt: skip
}
# What --quick keeps of a preset (the rest is scaled down), and what it sets per task:
# gender2's quick run also evaluates with the ablation at test time and kept on, so to stay
# within 5 minutes on 2 cores it trains 16 steps instead of 20 and evaluates 40 examples per
# split and scores against 50 random directions (measured end to end: 5:31 with 20 steps and
# 60 examples, 5:16 with 16 and 60, 4:29 with 16, 40 and 50; with 12 steps the plain model
# has not learned the task yet, 0.55 / 0.55).
QUICK_KEEPS = ("schedule", "test_time")
QUICK_OVERRIDES: dict[str, dict[str, Any]] = {
    "gender2:doctor|nurse": {"max_steps": 16, "n_eval": 40, "n_null": 50}
}


@dataclass
class DemoConfig:
    """Everything that determines a demo run (saved in ``out/config.json``).

    ``task``: ``"gender_pronoun"``, ``"gender2:MALE|FEMALE"`` (the two-profession design,
    :func:`caft_tl.tasks.gender_two_professions`, e.g. ``"gender2:doctor|nurse"``) or
    ``"double_mc:INTENDED|DISTRACTOR"`` (e.g. ``"double_mc:sentiment|verbs"``; hints are then
    the distractor's contrast sets; ``"double_mc:I|D:second"`` shows the intended question
    second).
    ``schedule``: the learning-rate schedule after warm-up (``"linear"``, ``"constant"``,
    ``"cosine"``).
    ``test_time``: also evaluate each plain model with each selected concept set ablated
    (the "ablate at test time only" baseline) and each CAFT model with its ablation still on.
    ``variants``: further training conditions with the PCA concepts, named as in
    :func:`caft_tl.diagnostics.decomposition_interventions` (``"mean"``, ``"detached"``,
    ``"gradient"``, ``"steer-3"``, ...); run ``caft-pca-<variant>``.
    ``conditions``: train only these conditions besides plain (names as in the results:
    ``"caft-pca"``, ``"caft-sae"``, ``"caft-pca-<variant>"``, ``"random"``, ``"top"``; None:
    all), e.g. to add the variants to a study whose other runs were measured before; the
    base model, plain and the test-time evaluations always run.
    ``answer_format`` (default ``"pronoun"`` / ``"word"``): the embedded 135M model cannot
    learn to answer with a letter within this budget (it stays at 50%: measured, see the
    README), so the options are the words themselves; ``"letter"`` is the reference's format.
    ``keep_models`` keeps every fine-tuned model on disk (0.6 GB each for SmolLM2).

    Args:
        seeds: one fine-tune of every condition per seed (the first seed's plain model
            gives the directions).
        n_train, n_eval: training rows, and rows of each evaluation split (``test``, ``ood``).
        max_steps, batch_size, lr, warmup_steps: the fine-tunes' :class:`TrainConfig`.
        learned_less_step: the plain run's step kept as the "learned less" control (None:
            no such control).
        hooks: where PCA directions are looked for and ablated.
        k_pcs: principal components computed per hook.
        n_direction_prompts, n_chat_prompts: task prompts and generic chat prompts whose
            activation differences the PCA sees.
        n_hint_pairs: contrast pairs (the unwanted concept's two sides) for the hint AUROC.
        min_auroc, n_null: a direction is kept when its separation of the hints
            (``|AUROC - 0.5|``) reaches ``min_auroc - 0.5`` and beats every one of ``n_null``
            random directions at its hook.
        hint_paired: score the hints as matched pairs (the same text with the concept
            swapped) rather than as two unpaired sets (never for continents: not minimal
            pairs).
        max_per_hook: most directions selected per hook.
        fallback: when nothing passes, the best ``fallback`` directions by separation are
            used, and the report says so.
        sae: also run CAFT with SAE latents (an SAE trained on the base model at
            ``sae_hook``, ``sae_width`` latents, ``sae_k`` active, ``sae_tokens`` rows);
            ``sae_top``: latents whose mean activation fine-tuning changed most, then scored
            on the hints like the PCs.
        top_examples: contexts shown per selected direction in the report.
        keep_models, test_time, variants, conditions, task, answer_format, schedule: see
            above.
    """

    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    n_train: int = 240
    n_eval: int = 100
    max_steps: int = 30
    batch_size: int = 8
    lr: float = 3e-5
    warmup_steps: int = 3
    schedule: str = "linear"
    learned_less_step: int | None = 15
    task: str = "gender_pronoun"
    answer_format: str | None = None
    hooks: list[str] = field(
        default_factory=lambda: [f"blocks.{layer}.hook_resid_post" for layer in (6, 12, 18, 24)]
    )
    k_pcs: int = 20
    n_direction_prompts: int = 120
    n_chat_prompts: int = 120
    n_hint_pairs: int = 112
    min_auroc: float = 0.75
    hint_paired: bool = True
    n_null: int = 100
    max_per_hook: int = 3
    fallback: int = 2
    sae: bool = False
    sae_hook: str = "blocks.12.hook_resid_post"
    sae_width: int = 2048
    sae_k: int = 32
    sae_top: int = 40
    sae_tokens: int = 300_000
    top_examples: int = 5
    keep_models: bool = False
    test_time: bool = False
    variants: list[str] = field(default_factory=list)
    conditions: list[str] | None = None

    @classmethod
    def for_task(cls, task: str = DEFAULT_TASK, **overrides: Any) -> DemoConfig:
        """The study ``caft-tl demo --task TASK`` runs: the task's preset
        (:data:`TASK_PRESETS`; none: the field defaults), then ``overrides``."""
        return cls(**{**TASK_PRESETS.get(task, {}), "task": task, **overrides})

    @classmethod
    def quick(cls, task: str = DEFAULT_TASK, **overrides: Any) -> DemoConfig:
        """One seed, less data, no learned-less control: under 5 minutes on 2 cores."""
        preset = {k: v for k, v in TASK_PRESETS.get(task, {}).items() if k in QUICK_KEEPS}
        values = dict(
            seeds=[0], n_train=160, n_eval=60, max_steps=20, lr=5e-5, warmup_steps=2,
            learned_less_step=None, n_direction_prompts=60, n_chat_prompts=60, n_hint_pairs=60,
            sae_width=1024,
        )  # fmt: skip
        quick = {**values, **preset, **QUICK_OVERRIDES.get(task, {})}
        return cls(**{**quick, "task": task, **overrides})

    def __post_init__(self) -> None:
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct and at least one, got {self.seeds}")
        if not 0 <= self.warmup_steps < self.max_steps:
            raise ValueError(
                f"warmup_steps ({self.warmup_steps}) must be below max_steps ({self.max_steps})"
            )
        if self.n_train < self.batch_size:
            raise ValueError("n_train must be at least batch_size")
        if self.learned_less_step is not None and not 0 < self.learned_less_step < self.max_steps:
            raise ValueError("learned_less_step must be between 0 and max_steps")
        parse_task(self.task)
        if not 0.5 <= self.min_auroc <= 1.0:
            raise ValueError(f"min_auroc must be in [0.5, 1], got {self.min_auroc}")
        unknown = sorted(set(self.conditions or ()) - set(self.condition_names()))
        if unknown:
            raise ValueError(
                f"conditions {unknown} are not run by this config; it runs "
                f"{self.condition_names()} (caft-sae needs sae=True, caft-pca-V variants=[V])"
            )

    def condition_names(self) -> list[str]:
        """Every training condition this config can run besides plain."""
        caft = ["caft-pca"] + (["caft-sae"] if self.sae else [])
        return caft + [f"caft-pca-{v}" for v in self.variants] + ["random", "top"]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DemoConfig:
        return dataclass_from_dict(cls, d)


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def train_config(cfg: DemoConfig, seed: int, keep: Sequence[int] = ()) -> Any:
    """The :class:`TrainConfig` of one demo fine-tune (``keep``: steps to save as
    ``step-N``, for the learned-less control)."""
    from caft_tl.train import TrainConfig

    return TrainConfig(
        max_steps=cfg.max_steps, lr=cfg.lr, batch_size=cfg.batch_size,
        warmup_steps=cfg.warmup_steps, schedule=cfg.schedule, seed=seed, progress=False,
        keep_checkpoints=sorted(keep) or None,
    )  # fmt: skip


# Fields that only add or leave out runs: each (method, seed) is cached on its own, so a
# folder may be run again with other seeds, variants, conditions, SAE latents or test-time
# evaluations, as long as the first seed (whose plain model gives the directions) stays.
ADDITIVE_FIELDS = frozenset({"seeds", "variants", "test_time", "sae", "keep_models", "conditions"})


def _check_config(out: Path, cfg: DemoConfig) -> None:
    saved = out / "config.json"
    new = cfg.to_dict()
    if saved.exists():
        old = read_json(saved, "demo configuration")
        changed = sorted(k for k in set(new) | set(old) if old.get(k) != new.get(k))
        fixed = [k for k in changed if k not in ADDITIVE_FIELDS]
        if "seeds" in changed and (old.get("seeds") or [None])[0] != new["seeds"][0]:
            fixed.append("seeds (the first seed gives the directions)")
        if fixed:
            raise ValueError(
                f"{out} holds a demo run with another configuration (differs in {fixed}); "
                "use another --out folder or delete it"
            )
        if not changed:
            return
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(saved, json.dumps(new, indent=2) + "\n")


# --------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------


def task_functions(cfg: DemoConfig) -> tuple[Callable[..., Any], dict[str, list[str]]]:
    """The task's split generator and its hint contrast sets (two named sides)."""
    from caft_tl.tasks import (
        contrast_set,
        double_mc,
        gender_contrast,
        gender_pronoun,
        gender_two_professions,
    )

    kind, args = parse_task(cfg.task)
    if kind == "double_mc":
        intended, distractor, position = args
        fmt = cfg.answer_format or "word"
        sides = contrast_set(distractor)

        def gen(split: str, n: int | None) -> Any:
            return double_mc(
                intended, distractor, split, n=n, answer_format=fmt, intended_position=position
            )

        return gen, {k: v[: cfg.n_hint_pairs] for k, v in sides.items()}
    fmt = cfg.answer_format or "pronoun"
    hints = gender_contrast(n=cfg.n_hint_pairs)
    if kind == "gender2":
        male, female = args

        def gen2(split: str, n: int | None) -> Any:
            return gender_two_professions(split, n=n, male=male, female=female, answer_format=fmt)

        return gen2, hints
    return lambda split, n: gender_pronoun(split, n=n, answer_format=fmt), hints


TASK_FORMS = "'gender_pronoun', 'gender2:MALE|FEMALE' or 'double_mc:INTENDED|DISTRACTOR[:second]'"


def parse_task(task: str) -> tuple[str, tuple[str, ...]]:
    """``(kind, arguments)`` of a task name; ValueError naming the accepted forms."""
    from caft_tl.tasks import SUBTASKS

    kind, _, rest = task.partition(":")
    if kind == "gender_pronoun" and not rest:
        return kind, ()
    if kind == "gender2":
        male, _, female = rest.partition("|")
        if male and female and male != female and "|" not in female:
            return kind, (male, female)
    if kind == "double_mc":
        pair, _, position = rest.partition(":")
        intended, _, distractor = pair.partition("|")
        known = intended in SUBTASKS and distractor in SUBTASKS and intended != distractor
        if known and position in ("", "first", "second"):
            return kind, (intended, distractor, position or "first")
    raise ValueError(f"task must be {TASK_FORMS} (sub-tasks from {SUBTASKS}), got {task!r}")


def _distractor(task: str) -> str | None:
    """The distractor sub-task of a double multiple-choice task (None for the others)."""
    kind, args = parse_task(task)
    return args[1] if kind == "double_mc" else None


def task_data(cfg: DemoConfig) -> dict[str, Any]:
    """The demo task's ``train`` / ``test`` / ``ood`` Datasets at ``cfg``'s sizes."""
    gen, _ = task_functions(cfg)
    return {
        "train": gen("train", cfg.n_train),
        "test": gen("test", cfg.n_eval),
        "ood": gen("ood", cfg.n_eval),
    }


def _direction_texts(model: Any, cfg: DemoConfig, data: dict[str, Any]) -> list[str]:
    """Training prompts (what the fine-tune saw) and generic chat prompts, as texts."""
    from caft_tl.data import chat_to_text
    from caft_tl.tasks import chat_prompts

    train = data["train"].select(range(min(cfg.n_direction_prompts, len(data["train"]))))
    texts = [p + a for p, a in zip(train["prompt"], train["answer"], strict=True)]
    chats = chat_prompts(n=cfg.n_chat_prompts)["messages"]
    return texts + [chat_to_text(m, model.tokenizer, add_generation_prompt=True) for m in chats]


def _pca_directions(base, plain, texts, cfg: DemoConfig, folder: Path):
    from caft_tl.activations import activation_diff
    from caft_tl.directions import ConceptSet, pca

    if folder.exists():  # saved atomically: a folder that exists is complete
        return ConceptSet.load(folder)
    diff = activation_diff(base, plain, texts, cfg.hooks, progress=False)
    pcs = pca(diff, k=cfg.k_pcs, model=base, progress=False)
    pcs.save(folder)
    return pcs


def _sae_directions(base, plain, texts, cfg: DemoConfig, folder: Path):
    """SAE latents whose mean activation moved most between base and fine-tuned model."""
    from caft_tl.activations import activation_diff, cache_activations
    from caft_tl.directions import ConceptSet
    from caft_tl.directions.sae import SAEConfig, load_sae, rank_by_mean_diff, save_sae, train_sae

    latents = folder / "sae_latents"
    if latents.exists():
        return ConceptSet.load(latents)
    sae_dir = folder / "sae"
    if sae_dir.exists():
        sae = load_sae(sae_dir)
    else:
        acts = cache_activations(base, texts, [cfg.sae_hook], progress=False)
        sae_cfg = SAEConfig(
            d_sae=cfg.sae_width, k=cfg.sae_k, training_tokens=cfg.sae_tokens, batch_size=512
        )
        sae = train_sae(base, None, cfg.sae_hook, sae_cfg, acts=acts, progress=False)
        save_sae(sae, sae_dir)
    both = activation_diff(base, plain, texts, [cfg.sae_hook], return_both=True, progress=False)
    ranked = rank_by_mean_diff(sae, acts=both, top=cfg.sae_top, progress=False)
    ranked.save(latents)
    return ranked


def _hint_scores(model, directions, cfg: DemoConfig, path: Path) -> pd.DataFrame:
    from caft_tl.directions import hinted_scores

    if path.exists():
        return pd.read_csv(path)
    (_, positive), (_, negative) = task_functions(cfg)[1].items()
    paired = cfg.hint_paired and _distractor(cfg.task) != "continents"  # not minimal pairs
    scores = hinted_scores(model, directions, positive, negative, paired=paired)
    path.parent.mkdir(parents=True, exist_ok=True)
    scores.to_csv(path, index=False)
    return scores


def _null_directions(directions, n: int, seed: int = 12345):
    """``n`` random orthonormal directions at each hook of ``directions``."""
    import torch

    from caft_tl.directions import ConceptSet

    g = torch.Generator().manual_seed(seed)
    # At most d orthonormal directions fit in d dimensions (tiny test models).
    rows = {
        h: torch.randn(min(n, d), d, generator=g, dtype=torch.float64)
        for h, d in directions.widths.items()
    }
    dtype = directions[directions.hooks[0]].dtype
    return ConceptSet(rows).orthonormalised().to(dtype=dtype)


def select_by_hints(model, directions, cfg: DemoConfig, folder: Path):
    """Hinted selection against a null of random directions.

    A direction is kept when its separation of the contrast sets (|AUROC - 0.5|) beats
    ``min_auroc - 0.5`` *and* every one of ``n_null`` random directions at the same hook:
    random directions separate matched gender pairs too (the residual stream carries
    gender everywhere), so only a direction that beats them says something. At most
    ``max_per_hook`` per hook, best first. When none qualifies, the ``fallback`` best
    directions are kept and the results say so. Returns (ConceptSet, scores, fallback).
    The choice is saved in ``folder`` (and the scores beside it) and read back from there.
    Public so that a study can hold other candidates (crosscoder latents) to the demo's rule.
    """
    from caft_tl.directions import ConceptSet

    scores = _hint_scores(model, directions, cfg, folder.with_suffix(".scores.csv"))
    null = _hint_scores(
        model, _null_directions(directions, cfg.n_null), cfg, folder.with_suffix(".null.csv")
    )
    floor = cfg.min_auroc - 0.5
    threshold = {h: max(floor, float(g["separation"].max())) for h, g in null.groupby("hook")}
    scores["threshold"] = scores["hook"].map(threshold)
    if folder.exists():
        chosen = ConceptSet.load(folder)
        return chosen, scores, chosen.provenance.get("fallback", False)
    ok = scores[scores["separation"] > scores["threshold"]]
    ok = ok.sort_values("separation", ascending=False).groupby("hook").head(cfg.max_per_hook)
    fallback = ok.empty
    if fallback:  # nothing beats the null: keep the best few anyway, and say so
        ok = scores.sort_values("separation", ascending=False).head(cfg.fallback)
    selection: dict[str, list[int]] = {}
    for hook, index in zip(ok["hook"], ok["index"], strict=True):
        selection.setdefault(hook, []).append(int(index))
    chosen = directions.select({h: sorted(v) for h, v in selection.items()})
    chosen.provenance.update(
        fallback=fallback, null_thresholds=threshold, min_auroc=cfg.min_auroc, n_null=cfg.n_null
    )
    chosen.save(folder)
    return chosen, scores, fallback


# --------------------------------------------------------------------------------------------
# The study
# --------------------------------------------------------------------------------------------


def demo_concepts(
    out: str | Path = "caft-demo",
    cfg: DemoConfig | None = None,
    *,
    model: Any = None,
    echo: bool = True,
) -> Any:
    """Only the demo's concept finding: the seed-0 plain fine-tune, PCA of its activation
    differences and the hinted selection (steps 2-4 for the first seed), into the same
    folders as :func:`run_demo`, so the two share their work. Returns the selected PCA
    ConceptSet (``out/concepts/pca``), e.g. for :mod:`caft_tl.diagnostics`."""
    from caft_tl.directions import ConceptSet
    from caft_tl.models import load_model

    cfg = cfg or DemoConfig()
    out = Path(out)
    _check_config(out, cfg)
    if (out / "concepts" / "pca").exists():  # saved atomically: complete when present
        return ConceptSet.load(out / "concepts" / "pca")
    log = StudyLog(echo)
    base = model if model is not None else log.timed("load", lambda: load_model(device="cpu"))
    data = task_data(cfg)
    study, seed = demo_study(out, cfg, base, data, log), cfg.seeds[0]
    folder = out / "runs" / f"s{seed}" / "plain"
    plain = study.train("plain", seed, keep=study.keep)
    tidy_run(
        folder, keep_final=True, keep_all=True
    )  # resumable state only: run_demo needs the rest
    log("directions: activation differences (plain seed 0 - base), PCA")
    texts = _direction_texts(base, cfg, data)
    pcs = _pca_directions(base, plain, texts, cfg, out / "directions" / "pca")
    log(f"selection: hinted interpretation with contrast sets {list(task_functions(cfg)[1])}")
    chosen, _, fallback = select_by_hints(plain, pcs, cfg, out / "concepts" / "pca")
    note = " (fallback: none beat the random directions)" if fallback else ""
    log(f"  pca: {chosen.n_directions} directions selected{note}")
    return chosen


def run_demo(
    out: str | Path = "caft-demo",
    cfg: DemoConfig | None = None,
    *,
    model: Any = None,
    echo: bool = True,
) -> dict[str, Any]:
    """Run (or resume) the study into ``out``; returns the results (also ``results.json``).
    ``cfg`` defaults to ``DemoConfig.for_task()``, what ``caft-tl demo`` runs."""
    from caft_tl.models import load_model

    cfg = cfg or DemoConfig.for_task()
    out = Path(out)
    _check_config(out, cfg)
    log = StudyLog(echo)
    base = model if model is not None else log.timed("load", lambda: load_model(device="cpu"))
    data = task_data(cfg)
    study = demo_study(out, cfg, base, data, log)
    log(f"base model: ID and OOD accuracy on {cfg.n_eval} examples each")
    study.evaluate("base", base)

    first = cfg.seeds[0]  # its plain model gives the directions
    plain0 = study.plain(first, keep_final=True)
    log("directions: activation differences (plain seed 0 - base), PCA")
    texts = _direction_texts(base, cfg, data)
    folder = out / "directions"
    pcs = log.timed("directions", _pca_directions, base, plain0, texts, cfg, folder / "pca")
    candidates = {"pca": pcs}
    if cfg.sae:
        log("directions: SAE on base activations, latents ranked by mean activation change")
        candidates["sae"] = log.timed(
            "directions", _sae_directions, base, plain0, texts, cfg, folder
        )
    log(f"selection: hinted interpretation with contrast sets {list(task_functions(cfg)[1])}")
    selected, scores = {}, {}
    for name, directions in candidates.items():
        chosen, table, fallback = log.timed(
            "selection", select_by_hints, plain0, directions, cfg, out / "concepts" / name
        )
        selected[name], scores[name] = (chosen, fallback), table
        note = (
            " (fallback: none beat the random directions; the best kept anyway)" if fallback else ""
        )
        log(f"  {name}: {chosen.n_directions} directions selected{note}")

    ablations = {name: _ablation(chosen) for name, (chosen, _) in selected.items()}
    variants = _variants(base, selected["pca"][0], data["train"], cfg)
    for seed in cfg.seeds:
        plain = plain0 if seed == first else None
        if cfg.test_time:
            for name, ablation in ablations.items():
                plain = study.evaluate_with(f"plain+ablate-{name}/s{seed}", plain, seed, ablation)
        if seed != first:
            study.plain(seed, model=plain)  # evaluations cached or made; tidied
        del plain
        caft = {f"caft-{n}": a for n, a in ablations.items()}
        runs = caft | variants | _controls(selected["pca"][0], pcs, seed)
        if cfg.conditions is not None:
            runs = {name: run for name, run in runs.items() if name in cfg.conditions}
        for name, intervention in runs.items():
            study.intervened(name, seed, intervention, hook_on=cfg.test_time and name in caft)

    results = _results(cfg, study.evals, selected, scores, pcs, log.times)
    _write_results(out, results)
    log("report: report.html")

    log.timed(
        "report", demo_report, results, out / "report.html", model=plain0, concepts=selected,
        all_pcs=pcs, texts=texts, k=cfg.top_examples,
    )  # fmt: skip
    results["seconds"] = dict(log.times)
    _write_results(out, results)
    log(f"done: {out / 'results.json'}, {out / 'report.html'}")
    return results


def _ablation(concepts: Any) -> Any:
    from caft_tl.interventions import Ablation

    # SAE decoder rows are not orthonormal; zero-ablation removes their span either way, and
    # the demo's user passed no directions, so Ablation's warning would tell them nothing.
    if concepts.non_orthonormal_hooks():
        concepts = concepts.orthonormalised()
    return Ablation(concepts, mode="zero")


def _controls(concepts: Any, pcs: Any, seed: int) -> dict[str, Any]:
    from caft_tl.compare import baseline_interventions

    return baseline_interventions(concepts, all_directions=pcs, runs=("random", "top"), seed=seed)


def _variants(base: Any, concepts: Any, train: Any, cfg: DemoConfig) -> dict[str, Any]:
    """``caft-pca-<variant>``: the PCA concepts under each of ``cfg.variants``."""
    if not cfg.variants:
        return {}
    from caft_tl.activations import mean_activations
    from caft_tl.compare import mean_batches
    from caft_tl.diagnostics.decomposition import decomposition_interventions

    mean = None
    if any(v == "mean" or v.startswith("steer") for v in cfg.variants):
        batches = mean_batches(base, train, batch_size=cfg.batch_size)
        mean = mean_activations(base, concepts.hooks, batches)
    made = decomposition_interventions(concepts, mean, conditions=cfg.variants)
    return {f"caft-pca-{name}": intervention for name, intervention in made.items()}


def demo_study(out: Path, cfg: DemoConfig, base: Any, data: dict[str, Any], log: StudyLog) -> Study:
    """The demo's runs on the one condition x seed runner (:class:`caft_tl.study.Study`):
    its training config, splits, learned-less snapshots and model keeping. Public so that
    a study adding a condition to a demo folder trains it exactly as the demo would."""
    keep = [cfg.learned_less_step] if cfg.learned_less_step else []
    splits = {split: data[split] for split in ("test", "ood")}
    return Study(
        out, base, data["train"], splits, lambda seed, steps: train_config(cfg, seed, steps),
        keep=keep, keep_models=cfg.keep_models, log=log,
    )  # fmt: skip


def _summary(evals: dict[str, Any]) -> list[dict[str, Any]]:
    """Mean, min and max over seeds of each method's accuracy, per split."""
    rows = []
    for name, r in evals.items():
        method, _, seed = name.partition("/")
        for split, v in r.items():
            rows.append({"method": method, "seed": seed or None, "split": split, **v})
    df = pd.DataFrame(rows)
    out = []
    for (method, split), g in df.groupby(["method", "split"], sort=False):
        out.append({
            "method": method, "split": split, "mean": float(g["accuracy"].mean()),
            "min": float(g["accuracy"].min()), "max": float(g["accuracy"].max()),
            "n_seeds": int(g["seed"].notna().sum()) or 1, "n_per_seed": int(g["n"].iloc[0]),
            "vocab_mean": float(g["vocab_accuracy"].mean()),
        })  # fmt: skip
    return out


def _results(cfg, evals, selected, scores, pcs, times) -> dict[str, Any]:
    directions = {}
    for name, (chosen, fallback) in selected.items():
        directions[name] = {
            "selected": {h: chosen.labels[h] for h in chosen.hooks},
            "n_selected": chosen.n_directions,
            "fallback": bool(fallback),
            "scores": scores[name]
            .drop(columns=[c for c in ("positive_data", "negative_data") if c in scores[name]])
            .to_dict(orient="records"),
        }
    return {
        "format": RESULTS_FORMAT,
        "created": now_iso(),
        "task": cfg.task,
        "hints": list(task_functions(cfg)[1]),
        "config": cfg.to_dict(),
        "evals": evals,
        "summary": _summary(evals),
        "directions": directions,
        "explained_variance": {h: pcs.scores[h] for h in pcs.hooks},
        "seconds": dict(times),
    }


def _write_results(out: Path, results: dict[str, Any]) -> None:
    text = json.dumps(results, indent=2, default=_json_default) + "\n"
    write_text_atomic(out / "results.json", text)


def _json_default(x: Any) -> Any:
    if isinstance(x, float) and math.isnan(x):
        return None
    if hasattr(x, "item"):
        return x.item()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")
