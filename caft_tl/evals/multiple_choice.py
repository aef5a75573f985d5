"""Multiple-choice accuracy: compare the answer options' logits after the prompt.

Two measures per example, as in the CAFT reference:

- ``accuracy``: the correct option's logit is the highest among the options' logits;
- ``vocab_accuracy``: the correct option's token is the argmax over the whole vocabulary
  (stricter: the model must also answer with an option letter at all).

Rows need ``prompt`` (a string, or chat messages rendered with the generation prompt),
``answer`` and ``options`` (strings appended to the prompt, e.g. ``" A"`` or ``" she"``;
an option of several tokens is scored by its first one, which must differ between
options); see :mod:`caft_tl.tasks`. Accuracy is reported overall and per group
(by default per ``split`` and ``task`` where those columns exist), with counts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch
from datasets import Dataset
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from caft_tl.data.chat import DataError, chat_to_text, collate, encode_text, pad_id

if TYPE_CHECKING:  # typing only: no run-time import of the directions package
    from caft_tl.interventions import InterventionLike

__all__ = ["evaluate_splits", "multiple_choice", "option_token_ids", "summarise"]

DEFAULT_GROUPS = ("split", "task")


def check_rows(data: Any) -> list[dict[str, Any]]:
    """``data``'s rows as dicts, each checked for ``prompt``/``answer``/``options`` and an
    answer among its options (DataError naming the example otherwise)."""
    if isinstance(data, Dataset):
        rows = data.to_list()
    elif isinstance(data, Sequence) and not isinstance(data, str):
        rows = [dict(r) for r in data]
    else:
        raise DataError(
            f"multiple-choice data must be a Dataset or a list of dicts, got {type(data).__name__}"
        )
    if not rows:
        raise DataError("no examples (empty multiple-choice data)")
    for i, row in enumerate(rows):
        missing = {"prompt", "answer", "options"} - set(row)
        if missing:
            raise DataError(f"example {i}: missing column(s) {sorted(missing)}")
        if row["answer"] not in row["options"]:
            raise DataError(f"example {i}: answer {row['answer']!r} is not among {row['options']}")
    return rows


def prompt_text(prompt: Any, tokenizer: Any, i: int) -> str:
    """Example ``i``'s prompt as text: chat messages rendered with the generation prompt."""
    if isinstance(prompt, list):
        return chat_to_text(prompt, tokenizer, add_generation_prompt=True)
    if not isinstance(prompt, str) or not prompt:
        raise DataError(f"example {i}: 'prompt' must be a non-empty string or chat messages")
    return prompt


def option_token_ids(tokenizer: Any, prompt: str, options: Sequence[str]) -> list[int]:
    """The first token each option adds after ``prompt`` (found on the joined text, as
    training tokenises prompt + answer). Multi-token options (" South America") are scored
    by their first token, so the options' first tokens must differ: a clear error if not,
    or if an option merges with the end of the prompt."""
    prompt_ids = encode_text(tokenizer, prompt)
    ids = []
    for option in options:
        joined = encode_text(tokenizer, prompt + option)
        if joined[: len(prompt_ids)] != prompt_ids or len(joined) == len(prompt_ids):
            raise DataError(
                f"option {option!r} merges with the end of the prompt into one token; "
                "start options with a space, e.g. ' A'"
            )
        ids.append(joined[len(prompt_ids)])
    if len(set(ids)) != len(ids):
        raise DataError(
            f"options {list(options)} share their first token; multiple-choice options are "
            "scored by their first token, so it must differ"
        )
    return ids


def encode_rows(rows: list[dict[str, Any]], tokenizer: Any) -> list[dict[str, Any]]:
    """Each row's prompt ids, its options' first-token ids and the correct option's index."""
    cache: dict[tuple[str, ...], list[int]] = {}
    out = []
    for i, row in enumerate(rows):
        prompt = prompt_text(row["prompt"], tokenizer, i)
        key = (prompt[-16:], *row["options"])  # options' tokens depend only on the prompt's end
        if key not in cache:
            cache[key] = option_token_ids(tokenizer, prompt, row["options"])
        out.append(
            {
                "input_ids": encode_text(tokenizer, prompt),
                "option_ids": cache[key],
                "correct": row["options"].index(row["answer"]),
            }
        )
    return out


def _last_logits(
    model: HookedTransformer, batch: Mapping[str, Tensor]
) -> Float[Tensor, "batch vocab"]:
    logits = model(batch["input_ids"], attention_mask=batch["attention_mask"])
    last = batch["attention_mask"].sum(-1) - 1  # right padding: each row's final real token
    return logits[torch.arange(len(last)), last].float()


def _score(
    logits: Float[Tensor, "batch vocab"], option_ids: Int[Tensor, "batch n_options"]
) -> dict[str, Tensor]:
    option_logits = logits.gather(1, option_ids)
    probs = logits.softmax(-1).gather(1, option_ids)
    return {
        "option_logits": option_logits,
        "predicted": option_logits.argmax(-1),
        "top_token": logits.argmax(-1),
        "option_mass": probs.sum(-1),
    }


@torch.no_grad()
def _predict(
    model: HookedTransformer, encoded: list[dict[str, Any]], batch_size: int, progress: bool
) -> list[dict[str, Any]]:
    device = next(model.parameters()).device
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]["input_ids"]))
    results: list[dict[str, Any]] = [{} for _ in encoded]
    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc="multiple choice", disable=not progress, leave=False):
        index = order[start : start + batch_size]
        batch = collate(
            [{"input_ids": encoded[i]["input_ids"]} for i in index],
            pad_token_id=pad_id(model.tokenizer),
        )
        batch = {k: v.to(device) for k, v in batch.items()}
        option_ids = torch.tensor([encoded[i]["option_ids"] for i in index], device=device)
        scored = _score(_last_logits(model, batch), option_ids)
        for j, i in enumerate(index):
            correct = encoded[i]["correct"]
            logits = scored["option_logits"][j].tolist()
            others = [v for k, v in enumerate(logits) if k != correct]
            results[i] = {
                "predicted": int(scored["predicted"][j]),
                "correct": int(scored["predicted"][j]) == correct,
                "vocab_correct": int(scored["top_token"][j]) == encoded[i]["option_ids"][correct],
                "margin": logits[correct] - max(others) if others else math.inf,
                "option_mass": float(scored["option_mass"][j]),
            }
    return results


def summarise(examples: pd.DataFrame, group_by: Sequence[str] = DEFAULT_GROUPS) -> dict[str, Any]:
    """Overall and per-group accuracy of a per-example table (``multiple_choice``'s
    ``examples``): the same numbers, recomputed, e.g. for a subset of rows."""

    def stats(df: pd.DataFrame) -> dict[str, Any]:
        return {
            "accuracy": float(df["correct"].mean()),
            "vocab_accuracy": float(df["vocab_correct"].mean()),
            "n": len(df),
            "n_correct": int(df["correct"].sum()),
            "mean_margin": float(df["margin"].mean()),
            "option_mass": float(df["option_mass"].mean()),
        }

    keys = [c for c in group_by if c in examples.columns]
    groups = []
    if keys:
        for values, df in examples.groupby(keys, sort=True):
            values = values if isinstance(values, tuple) else (values,)
            groups.append({**dict(zip(keys, values, strict=True)), **stats(df)})
    return {**stats(examples), "groups": groups}


def multiple_choice(
    model: HookedTransformer,
    data: Any,
    *,
    intervention: InterventionLike | None = None,
    batch_size: int = 32,
    group_by: Sequence[str] = DEFAULT_GROUPS,
    return_examples: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Accuracy of ``model`` on multiple-choice ``data`` (see the module docstring).

    ``intervention`` (an Ablation or Steering) is applied during the forward passes and
    removed afterwards. Returns ``{"accuracy", "vocab_accuracy", "n", "n_correct",
    "mean_margin" (correct option's logit minus the best other), "option_mass" (probability
    on the options), "groups": [one dict per group with the same keys]}``, plus
    ``"examples"`` (a DataFrame, one row per example) with ``return_examples=True``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rows = check_rows(data)
    encoded = encode_rows(rows, model.tokenizer)
    was_training = model.training
    model.eval()
    applied = nullcontext() if intervention is None else intervention.applied(model)
    try:
        with applied:
            predictions = _predict(model, encoded, batch_size, progress)
    finally:
        model.train(was_training)
    meta = [{k: v for k, v in r.items() if isinstance(v, str | int | float | bool)} for r in rows]
    examples = pd.DataFrame([{**m, **p} for m, p in zip(meta, predictions, strict=True)])
    result = summarise(examples, group_by)
    if return_examples:
        result["examples"] = examples
    return result


SPLIT_KEYS = ("accuracy", "vocab_accuracy", "n", "n_correct", "mean_margin", "option_mass")


def evaluate_splits(
    model: HookedTransformer,
    splits: Mapping[str, Any],
    *,
    intervention: InterventionLike | None = None,
    batch_size: int = 32,
) -> dict[str, dict[str, Any]]:
    """The overall numbers of :func:`multiple_choice` for each named split, e.g.
    ``{"test": test, "ood": ood}`` -> ``{"test": {"accuracy": .., "n": .., ...}, ...}``
    (JSON-ready: what studies cache per run)."""
    if not splits:
        raise ValueError("no splits to evaluate")
    out = {}
    for name, data in splits.items():
        r = multiple_choice(model, data, intervention=intervention, batch_size=batch_size)
        out[name] = {k: r[k] for k in SPLIT_KEYS}
    return out
