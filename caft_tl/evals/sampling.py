"""Batched sampling from a HookedTransformer, optionally under an intervention.

Prompts are left-padded into batches and decoded with TransformerLens's key-value cache;
rows that finish (end-of-turn or EOS) leave the batch, so a long answer does not keep short
ones computing. Every sample draws from its own random stream, seeded from the run's seed
and the sample's identity, so an answer does not depend on the batch size or on which other
prompts were asked with it.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

from caft_tl.data.chat import chat_to_text, collate, encode_text, pad_id
from caft_tl.evals.questions import Question, expand, questions
from caft_tl.models import logits_from_residual

if TYPE_CHECKING:  # typing only: no run-time import of the directions package
    from caft_tl.interventions import InterventionLike

__all__ = ["Generation", "SamplingConfig", "generate", "sample", "stop_token_ids"]


@dataclass
class SamplingConfig:
    """How to sample answers.

    Args:
        n_samples: answers per (question, paraphrase, system prompt).
        temperature: softmax temperature; 0 decodes greedily.
        top_p: nucleus sampling threshold (1: the whole distribution).
        max_new_tokens: the longest answer, in tokens.
        batch_size: prompts decoded together.
        seed: the sampling RNG (answers repeat for the same seed and batch layout).
        progress: show a tqdm bar.
    """

    n_samples: int = 10
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    batch_size: int = 16
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.n_samples < 1 or self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError("n_samples, batch_size and max_new_tokens must be >= 1")
        if self.temperature < 0 or not math.isfinite(self.temperature):
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Generation:
    """New tokens of one sample (the stop token excluded) and whether it stopped by itself
    (``False``: cut at ``max_new_tokens``)."""

    tokens: list[int]
    finished: bool


def stop_token_ids(tokenizer: Any) -> set[int]:
    """EOS plus the chat template's end-of-turn token (``<|im_end|>``, ``<end_of_turn>``...)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for name in ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>"):
        tid = tokenizer.convert_tokens_to_ids(name)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid >= 0:
            ids.add(tid)
    return ids


def sample_seed(seed: int, *key: Any) -> int:
    """A stable 63-bit seed for one sample, from the run seed and the sample's identity."""
    digest = hashlib.sha256(repr((seed, *key)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# --------------------------------------------------------------------------- decoding


def _next_tokens(
    logits: Float[Tensor, "batch vocab"], cfg: SamplingConfig, uniforms: Float[Tensor, " batch"]
) -> Int[Tensor, " batch"]:
    if cfg.temperature == 0:
        return logits.argmax(-1)
    probs = (logits.float() / cfg.temperature).softmax(-1)
    if cfg.top_p < 1:
        sorted_p, order = probs.sort(-1, descending=True)
        # Drop a token when the tokens ranked above it already hold top_p (keeps the first).
        sorted_p[(sorted_p.cumsum(-1) - sorted_p) >= cfg.top_p] = 0
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    # Inverse-CDF draw with per-row uniforms: one batched op, and each row's randomness is
    # its own generator's, whatever else is in the batch.
    cdf = probs.cumsum(-1)
    u = uniforms.to(cdf.device)[:, None] * cdf[:, -1:]
    return torch.searchsorted(cdf, u).clamp(max=probs.shape[-1] - 1)[:, 0]


def last_logits(
    model: HookedTransformer,
    tokens: Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"],
    cache: TransformerLensKeyValueCache,
) -> Float[Tensor, "batch vocab"]:
    """The model's forward through ``cache``, unembedding the last position only: a prompt's
    ``[batch, pos, vocab]`` logits cost about a fifth of SmolLM2's prefill and are thrown
    away. ``ln_final`` and ``unembed`` (and hooks on them) see that position only."""
    device = model.cfg.device
    resid = model(tokens.to(device), attention_mask=attention_mask.to(device),
                  past_kv_cache=cache, stop_at_layer=model.cfg.n_layers)  # fmt: skip
    return logits_from_residual(model, resid[:, -1:])[:, -1]


def prefill(
    model: HookedTransformer, prompts: Sequence[Sequence[int]]
) -> tuple[Float[Tensor, "batch vocab"], TransformerLensKeyValueCache]:
    """Run left-padded ``prompts`` once: next-token logits after each, and the key-value
    cache to continue them from (padding is masked through the cache's attention mask)."""
    batch = collate([{"input_ids": list(p)} for p in prompts],
                    pad_token_id=pad_id(model.tokenizer), padding_side="left")  # fmt: skip
    cache = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, len(prompts))
    return last_logits(model, batch["input_ids"], batch["attention_mask"], cache), cache


def _keep_rows(cache: TransformerLensKeyValueCache, keep: Tensor) -> None:
    for entry in cache.entries:
        entry.past_keys = entry.past_keys[keep.to(entry.past_keys.device)]
        entry.past_values = entry.past_values[keep.to(entry.past_values.device)]
    cache.previous_attention_mask = cache.previous_attention_mask[
        keep.to(cache.previous_attention_mask.device)
    ]


@torch.no_grad()
def _generate_batch(
    model: HookedTransformer,
    prompts: Sequence[Sequence[int]],
    generators: Sequence[torch.Generator],
    cfg: SamplingConfig,
    stop: set[int],
    max_new: int,
) -> list[Generation]:
    device = model.cfg.device
    logits, cache = prefill(model, prompts)
    out = [Generation([], False) for _ in prompts]
    active = list(range(len(prompts)))
    for step in range(max_new):
        u = torch.stack([torch.rand((), generator=generators[i]) for i in active])
        chosen = _next_tokens(logits, cfg, u)
        for j, tid in enumerate(chosen.tolist()):
            if tid in stop:
                out[active[j]].finished = True
            else:
                out[active[j]].tokens.append(tid)
        keep = [j for j, i in enumerate(active) if not out[i].finished]
        if not keep or step == max_new - 1:
            break
        if len(keep) < len(active):
            index = torch.tensor(keep, dtype=torch.long)
            _keep_rows(cache, index)
            chosen = chosen[index.to(chosen.device)]
            active = [active[j] for j in keep]
        new_mask = torch.ones((len(active), 1), dtype=torch.long, device=device)
        logits = last_logits(model, chosen[:, None], new_mask, cache)
    return out


def generate(
    model: HookedTransformer,
    prompts: Sequence[Sequence[int]],
    cfg: SamplingConfig | None = None,
    *,
    seeds: Sequence[int] | None = None,
    intervention: InterventionLike | None = None,
    stop: set[int] | None = None,
    desc: str = "sampling",
) -> list[Generation]:
    """Continue each token list in ``prompts`` once (``seeds[i]`` seeds row ``i``; default
    ``cfg.seed + i``), in batches of ``cfg.batch_size`` sorted by length, with
    ``intervention`` (an Ablation / Steering) applied throughout."""
    cfg = cfg or SamplingConfig()
    if not prompts:
        raise ValueError("nothing to generate from: no prompts")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    seeds = [cfg.seed + i for i in range(len(prompts))] if seeds is None else list(seeds)
    if len(seeds) != len(prompts):
        raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
    stop = stop_token_ids(model.tokenizer) if stop is None else stop
    max_new = _room(model, prompts, cfg.max_new_tokens)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[Generation | None] = [None] * len(prompts)
    context = nullcontext() if intervention is None else intervention.applied(model)
    bar = tqdm(total=len(prompts), desc=desc, disable=not cfg.progress, leave=False)
    with context, bar:
        for start in range(0, len(order), cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            gens = [torch.Generator().manual_seed(seeds[i]) for i in idx]
            for i, g in zip(idx, _generate_batch(
                model, [prompts[i] for i in idx], gens, cfg, stop, max_new
            ), strict=True):  # fmt: skip
                out[i] = g
            bar.update(len(idx))
    return out  # type: ignore[return-value]


def _room(model: HookedTransformer, prompts: Sequence[Sequence[int]], wanted: int) -> int:
    longest = max(len(p) for p in prompts)
    room = model.cfg.n_ctx - longest
    if room < 1:
        raise ValueError(f"a prompt of {longest} tokens leaves no room in n_ctx {model.cfg.n_ctx}")
    if room < wanted:
        warnings.warn(
            f"max_new_tokens {wanted} cut to {room}: the longest prompt has {longest} tokens "
            f"and the context holds {model.cfg.n_ctx}",
            stacklevel=3,
        )
    return min(room, wanted)


# --------------------------------------------------------------------------- questions


def prompt_tokens(model: HookedTransformer, messages: Sequence[Mapping[str, str]]) -> list[int]:
    """A chat rendered with the template's generation prompt, as token ids."""
    if model.tokenizer is None:
        raise ValueError("sampling from questions needs a model with a tokenizer")
    return encode_text(model.tokenizer, chat_to_text(messages, model.tokenizer))


def sample(
    model: HookedTransformer,
    qs: str | Sequence[Question] | Any = "em",
    cfg: SamplingConfig | None = None,
    *,
    intervention: InterventionLike | None = None,
    system_prompts: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Sample ``cfg.n_samples`` answers to every (question, paraphrase, system prompt).

    ``qs``: a built-in set's name, a YAML/JSONL path, or Questions. One row per answer:
    ``question_id, category, paraphrase, system, sample, question, system_prompt, answer,
    n_tokens, finished, sample_seed``.
    """
    cfg = cfg or SamplingConfig()
    rows = expand(questions(qs), system_prompts)
    prompts, seeds, records = [], [], []
    for row in rows:
        ids = prompt_tokens(model, row["messages"])
        for s in range(cfg.n_samples):
            key = (row["question_id"], row["paraphrase"], row["system"], s)
            prompts.append(ids)
            seeds.append(sample_seed(cfg.seed, *key))
            records.append({k: v for k, v in row.items() if k != "messages"} | {"sample": s})
    gens = generate(model, prompts, cfg, seeds=seeds, intervention=intervention)
    for rec, gen, seed in zip(records, gens, seeds, strict=True):
        rec["answer"] = model.tokenizer.decode(gen.tokens, skip_special_tokens=True).strip()
        rec["n_tokens"] = len(gen.tokens)
        rec["finished"] = gen.finished
        rec["sample_seed"] = seed
    cols = ["question_id", "category", "paraphrase", "system", "sample", "question",
            "system_prompt", "answer", "n_tokens", "finished", "sample_seed"]  # fmt: skip
    return pd.DataFrame(records, columns=cols)
