"""Activation caching at TransformerLens hook points, in memory or streamed to disk.

Every cached row is one token: ``acts[hook]`` is ``[n_tokens, width]`` and ``rows`` maps
each row back to ``(example, position, token)`` so interpretation can show context.
Padding never reaches the result (rows are picked with the attention mask, never by
comparing ids with the pad id, which for SmolLM2 is the real ``<|im_end|>`` token).
"""

from __future__ import annotations

import difflib
import json
import re
import shutil
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from datasets import Dataset
from jaxtyping import Float, Int
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from caft_tl import distributed as dist
from caft_tl.data import DataError, as_dataset, batches, pad_id, tokenize
from caft_tl.errors import InputKeyError

Positions = Literal["all", "assistant", "last"]
FORMAT = "caft_tl.activations"
ROW_KEYS = ("example", "position", "token", "target")
# Hooks whose tensors are not [batch, pos, ...] (attention patterns are [batch, head, q, k]).
_NOT_PER_TOKEN = ("hook_pattern", "hook_attn_scores")
_LAYER = re.compile(r"^blocks\.(\d+)\.")


@dataclass
class Rows:
    """Where each cached row came from (all ``[n_tokens]`` long tensors). ``target`` is the
    loss mask at the row (1 for assistant tokens of chat data, for every token of texts),
    so an ``"all"``-positions cache can still be restricted to assistant tokens."""

    example: Int[Tensor, " n"]
    position: Int[Tensor, " n"]
    token: Int[Tensor, " n"]
    target: Int[Tensor, " n"]

    def __len__(self) -> int:
        return len(self.example)


class Activations:
    """Per-hook ``[n_tokens, width]`` activations with row metadata.

    Backed either by tensors in memory or by safetensors shards on disk (``load`` opens a
    folder lazily: ``iter_chunks`` reads one shard of one hook at a time, so consumers such
    as streaming PCA never hold all tokens at once; ``acts[hook]`` loads everything).
    """

    def __init__(
        self,
        chunks: list[dict[str, Tensor]] | list[Path],
        hooks: Sequence[str],
        token_ids: list[list[int]],
        meta: dict[str, Any],
    ):
        self._chunks = chunks
        self.hooks = list(hooks)
        self.token_ids = token_ids
        self.meta = meta
        self._rows: Rows | None = None

    # -- access -----------------------------------------------------------------
    def __getitem__(self, hook: str) -> Float[Tensor, "n width"]:
        self._check_hook(hook)
        return torch.cat(list(self.iter_chunks(hook)))

    def __contains__(self, hook: str) -> bool:
        return hook in self.hooks

    def __len__(self) -> int:
        return int(self.meta["n_tokens"])

    def __repr__(self) -> str:
        where = f", on disk at {self.meta['path']}" if self.on_disk else ""
        return (
            f"Activations({len(self)} tokens from {self.meta['n_examples']} examples, "
            f"hooks={self.hooks}, positions={self.meta['positions']!r}{where})"
        )

    @property
    def on_disk(self) -> bool:
        return bool(self._chunks) and isinstance(self._chunks[0], Path)

    @property
    def n_chunks(self) -> int:
        """How many chunks (shards on disk, batches in memory) the activations are held in."""
        return len(self._chunks)

    @property
    def rows(self) -> Rows:
        if self._rows is None:  # small (3 longs per token) and asked for repeatedly
            parts = {k: list(self.iter_chunks(f"_{k}")) for k in ROW_KEYS}
            self._rows = Rows(*(torch.cat(parts[k]) for k in ROW_KEYS))
        return self._rows

    def iter_chunks(self, hook: str) -> Iterator[Tensor]:
        """Yield the rows of one hook (or a ``_example``/``_position``/``_token`` column)
        shard by shard."""
        if not hook.startswith("_"):
            self._check_hook(hook)
        for chunk in self._chunks:
            if isinstance(chunk, Path):
                with safe_open(str(chunk), framework="pt") as f:
                    yield f.get_tensor(hook)
            else:
                yield chunk[hook]

    def context(self, row: int, before: int = 8, after: int = 2) -> tuple[list[int], int]:
        """Token ids around a cached row and the index of the row's token within them."""
        rows = self.rows
        example, position = int(rows.example[row]), int(rows.position[row])
        ids = self.token_ids[example]
        start = max(0, position - before)
        return ids[start : position + after + 1], position - start

    def _check_hook(self, hook: str) -> None:
        if hook not in self.hooks:
            raise InputKeyError(f"{hook!r} was not cached; cached hooks: {self.hooks}")

    # -- persistence ----------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write to a folder (shards + metadata); in-memory activations become one shard."""
        sink = ShardSink(Path(path), self.hooks, shard_tokens=None)
        for chunk in self._chunks:
            if isinstance(chunk, Path):
                with safe_open(str(chunk), framework="pt") as f:
                    chunk = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
            sink.add(chunk)
        return Path(sink.close(self.token_ids, self.meta).meta["path"])

    @classmethod
    def load(cls, path: str | Path) -> Activations:
        """Open a folder written by ``save`` or by ``cache_activations(out=...)``, lazily."""
        path = Path(path)
        meta_file = path / "meta.json"
        if not meta_file.exists():
            raise FileNotFoundError(f"{path} holds no cached activations (no meta.json)")
        meta = json.loads(meta_file.read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"{meta_file} is not a caft-tl activations file")
        shards = [path / name for name in meta["shards"]]
        missing = [s.name for s in shards if not s.exists()]
        if missing:
            raise FileNotFoundError(f"{path}: missing shards {missing[:5]}")
        with safe_open(str(path / "tokens.safetensors"), framework="pt") as f:
            flat, offsets = f.get_tensor("flat").tolist(), f.get_tensor("offsets").tolist()
        token_ids = [flat[a:b] for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
        meta["path"] = str(path)
        return cls(shards, meta["hooks"], token_ids, meta)


class ShardSink:
    """Collects batches of rows; in memory (``path=None``) or as shards of bounded size."""

    def __init__(
        self,
        path: Path | None,
        hooks: Sequence[str],
        shard_tokens: int | None,
        shard_bytes: int | None = None,
    ):
        self.path, self.hooks, self.shard_tokens = path, list(hooks), shard_tokens
        # Rows alone do not bound memory: 30 residual hooks make a row 30x wider.
        self.shard_bytes = shard_bytes
        self.buffer: list[dict[str, Tensor]] = []
        self.buffered = 0
        self.buffered_bytes = 0
        self.chunks: list[Any] = []
        self.n_tokens = 0
        if path is not None:
            _check_new_folder(path)
            path.mkdir(parents=True, exist_ok=True)

    def add(self, chunk: dict[str, Tensor]) -> None:
        n = len(chunk["_example"])
        if n == 0:
            return
        self.buffer.append(chunk)
        self.buffered += n
        self.buffered_bytes += sum(t.numel() * t.element_size() for t in chunk.values())
        self.n_tokens += n
        full_rows = self.shard_tokens is not None and self.buffered >= self.shard_tokens
        full_bytes = self.shard_bytes is not None and self.buffered_bytes >= self.shard_bytes
        if full_rows or full_bytes:
            self._flush()

    def _flush(self) -> None:
        if not self.buffer:
            return
        merged = {k: torch.cat([c[k] for c in self.buffer]) for k in self.buffer[0]}
        self.buffer, self.buffered, self.buffered_bytes = [], 0, 0
        if self.path is None:
            self.chunks.append(merged)
            return
        name = f"shard_{len(self.chunks):05d}.safetensors"
        save_file({k: v.contiguous() for k, v in merged.items()}, str(self.path / name))
        self.chunks.append(self.path / name)

    def close(self, token_ids: list[list[int]], meta: dict[str, Any]) -> Activations:
        self._flush()
        return _finish(self.path, self.hooks, self.chunks, self.n_tokens, token_ids, meta)


def _finish(
    path: Path | None,
    hooks: list[str],
    chunks: list[Any],
    n_tokens: int,
    token_ids: list[list[int]],
    meta: dict[str, Any],
) -> Activations:
    """The result of a cache: with ``path``, its token ids and ``meta.json`` are written
    (the shards, ``chunks``, already are)."""
    meta = {**meta, "format": FORMAT, "hooks": hooks, "n_tokens": n_tokens}
    if path is not None:
        lengths = torch.tensor([0] + [len(t) for t in token_ids])
        save_file(
            {
                "flat": torch.tensor([i for ids in token_ids for i in ids], dtype=torch.long),
                "offsets": lengths.cumsum(0),
            },
            str(path / "tokens.safetensors"),
        )
        meta["shards"] = [p.name for p in chunks]
        meta["path"] = str(path)
        # meta.json last: a folder without it is an interrupted write, never a result.
        tmp = path / "meta.json.tmp"
        tmp.write_text(json.dumps({k: v for k, v in meta.items() if k != "path"}, indent=2))
        tmp.replace(path / "meta.json")
    return Activations(chunks, hooks, token_ids, meta)


# ------------------------------------------------------------------------- several ranks
#
# Under torchrun each rank caches a contiguous share of the batches (the very batches one
# process makes, so the same padding and numbers) into ``<out>/.parts/rank-R/``; closing
# moves every rank's shards, in rank order, into ``<out>`` and rank 0 writes the token ids
# and meta.json: the folder one process writes, rows in the same order (only where shards
# split may differ). Without ``out`` the rows are gathered to every rank in memory.

_PARTS = ".parts"


def _check_new_folder(path: Path) -> None:
    if path.exists() and any(path.iterdir()):
        raise FileExistsError(f"{path} exists and is not empty; choose a new folder")


def _open_sink(
    path: Path | None, hooks: Sequence[str], shard_tokens: int | None, shard_bytes: int | None
) -> ShardSink:
    if path is None or not dist.is_distributed():
        return ShardSink(path, hooks, shard_tokens, shard_bytes)
    dist.check_on_main(lambda: _check_new_folder(path))
    return ShardSink(path / _PARTS / f"rank-{dist.rank():05d}", hooks, shard_tokens, shard_bytes)


def _close_sink(
    sink: ShardSink, path: Path | None, token_ids: list[list[int]], meta: dict[str, Any]
) -> Activations:
    if not dist.is_distributed():
        return sink.close(token_ids, meta)
    sink._flush()
    n_tokens = sum(dist.gather_objects(sink.n_tokens))
    if path is None:  # in memory: every rank gets every rank's rows
        chunks = [c for part in dist.gather_objects(sink.chunks) for c in part]
        return _finish(None, sink.hooks, chunks, n_tokens, token_ids, meta)
    parts = dist.gather_objects([p.name for p in sink.chunks])  # also: every rank is done
    if dist.is_main():
        shards = []
        for r, names in enumerate(parts):
            for name in names:
                shard = path / f"shard_{len(shards):05d}.safetensors"
                (path / _PARTS / f"rank-{r:05d}" / name).replace(shard)
                shards.append(shard)
        shutil.rmtree(path / _PARTS)
        _finish(path, sink.hooks, shards, n_tokens, token_ids, meta)
    dist.barrier()  # meta.json is on disk before any rank reads it
    return Activations.load(path)


def _my_batches(ds: Dataset, batch_size: int, pad: int) -> tuple[Iterator[dict], int]:
    """This rank's batches (all of them outside torchrun) and how many there are. Each
    batch's ``example_index`` indexes the whole dataset."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(ds) == 0:
        raise DataError("no examples (empty dataset)")
    mine = dist.my_range(-(-len(ds) // batch_size))
    start, stop = mine.start * batch_size, min(mine.stop * batch_size, len(ds))
    if start >= stop:
        return iter(()), 0
    part = ds if (start, stop) == (0, len(ds)) else ds.select(range(start, stop))

    def shifted() -> Iterator[dict]:
        for batch in batches(part, batch_size, pad_token_id=pad, padding_side="right"):
            batch["example_index"] = batch["example_index"] + start
            yield batch

    return shifted(), len(mine)


# ------------------------------------------------------------------------- checks


def check_hooks(model: HookedTransformer, hooks: Sequence[str] | str) -> list[str]:
    """Validate hook names against the model; unknown names get close-match suggestions."""
    hooks = [hooks] if isinstance(hooks, str) else list(hooks)
    if not hooks:
        raise ValueError("no hook names given (e.g. 'blocks.10.hook_resid_post')")
    for hook in hooks:
        if hook not in model.hook_dict:
            close = difflib.get_close_matches(hook, list(model.hook_dict), n=3)
            hint = f"; did you mean {close}?" if close else ""
            raise ValueError(
                f"unknown hook {hook!r} for {model.cfg.model_name} "
                f"({model.cfg.n_layers} layers, blocks.0 .. blocks.{model.cfg.n_layers - 1})"
                f"{hint}"
            )
        if hook.endswith(_NOT_PER_TOKEN):
            raise ValueError(f"{hook!r} is not a per-token activation ([batch, head, q, k])")
    if len(set(hooks)) != len(hooks):
        raise ValueError(f"hook names repeat: {hooks}")
    return hooks


def stop_layer(hooks: Sequence[str]) -> int | None:
    """The ``stop_at_layer`` that still computes every hook (None: run the whole model)."""
    layers = []
    for hook in hooks:
        match = _LAYER.match(hook)
        if match:
            layers.append(int(match.group(1)))
        elif hook.startswith(("hook_embed", "hook_pos_embed")):
            layers.append(-1)
        else:  # ln_final, unembed: the whole model runs
            return None
    return max(layers) + 1


def tokenized_input(data: Any, model: HookedTransformer, max_length: int | None, positions: str):
    """``data`` tokenised for a forward pass: a pre-tokenised Dataset is checked and
    returned as is, anything else goes through :func:`caft_tl.data.tokenize`."""
    if isinstance(data, Dataset) and "input_ids" in data.column_names:
        if len(data) == 0:
            raise DataError("no examples (empty dataset)")
        if positions == "assistant" and "loss_mask" not in data.column_names:
            raise DataError("positions='assistant' needs a loss_mask column")
        return data
    if model.tokenizer is None:
        raise ValueError("the model has no tokenizer: pass data tokenised with caft_tl.data")
    ds = as_dataset(data)
    if positions == "assistant" and "messages" not in ds.column_names:
        raise DataError("positions='assistant' needs chat data with assistant turns")
    return tokenize(ds, model.tokenizer, max_length=max_length or model.cfg.n_ctx)


def _check_vocab(model: HookedTransformer, ds: Dataset) -> None:
    top = max(max(ids) for ids in ds["input_ids"] if ids)
    if top >= model.cfg.d_vocab:
        raise ValueError(
            f"token id {top} is outside {model.cfg.model_name}'s vocabulary "
            f"(d_vocab={model.cfg.d_vocab}): the data was tokenised for another model"
        )
    longest = max(len(ids) for ids in ds["input_ids"])
    if longest > model.cfg.n_ctx:
        raise ValueError(
            f"an example has {longest} tokens, more than n_ctx={model.cfg.n_ctx}: "
            "tokenise with max_length"
        )


def _same_tokenizer(a: HookedTransformer, b: HookedTransformer) -> None:
    if a.cfg.d_vocab != b.cfg.d_vocab:
        raise ValueError(
            f"vocabularies differ ({a.cfg.d_vocab} vs {b.cfg.d_vocab}): activation "
            "differences need two versions of the same model"
        )
    if a.tokenizer is not None and b.tokenizer is not None:
        probe = "<|im_start|>user\nThe doctor said she would call.<|im_end|>"
        if a.tokenizer.encode(probe) != b.tokenizer.encode(probe):
            raise ValueError("the two models' tokenizers disagree; diff versions of one model")


# ------------------------------------------------------------------------- caching


def _position_mask(batch: dict[str, Tensor], positions: Positions) -> Tensor:
    real = batch["attention_mask"].bool()
    if positions == "all":
        return real
    if positions == "assistant":
        return batch["loss_mask"].bool() & real
    last = real.long().cumsum(-1).argmax(-1)  # right padding: last real column per row
    mask = torch.zeros_like(real)
    mask[torch.arange(len(real)), last] = True
    return mask


def _per_token(act: Tensor, hook: str) -> Tensor:
    # [batch, pos, heads, d_head] hooks (attn.hook_z, ...) are flattened per token.
    return act.flatten(2) if act.ndim > 3 else act


def _batch_rows(
    model: HookedTransformer,
    hooks: list[str],
    batch: dict[str, Tensor],
    positions: Positions,
    dtype: torch.dtype | None,
) -> dict[str, Tensor]:
    device = model.cfg.device
    _, cache = model.run_with_cache(
        batch["input_ids"].to(device),
        attention_mask=batch["attention_mask"].to(device),
        names_filter=hooks,
        stop_at_layer=stop_layer(hooks),
        return_cache_object=False,
    )
    mask = _position_mask(batch, positions)
    out = {h: _per_token(cache[h], h)[mask.to(device)].to("cpu", dtype) for h in hooks}
    b, p = mask.nonzero(as_tuple=True)
    out["_example"] = batch["example_index"][b]
    out["_position"] = p
    out["_token"] = batch["input_ids"][b, p]
    out["_target"] = batch["loss_mask"][b, p]
    return out


def _prepare(model, data, hooks, positions, max_length):
    hooks = check_hooks(model, hooks)
    if positions not in ("all", "assistant", "last"):
        raise ValueError(f"positions must be 'all', 'assistant' or 'last', got {positions!r}")
    ds = tokenized_input(data, model, max_length, positions)
    _check_vocab(model, ds)
    return hooks, ds


def cache_activations(
    model: HookedTransformer,
    data: Any,
    hooks: Sequence[str] | str,
    *,
    positions: Positions = "all",
    batch_size: int = 8,
    out: str | Path | None = None,
    max_length: int | None = None,
    dtype: torch.dtype | None = torch.float32,
    shard_tokens: int = 16384,
    shard_mb: float = 256.0,
    progress: bool = True,
) -> Activations:
    """Run ``model`` over ``data`` and keep the activations at ``hooks``.

    Args:
        data: chat JSONL path, list of conversations/texts, a Dataset, or a Dataset already
            tokenised by :func:`caft_tl.data.tokenize`.
        positions: ``"all"`` real tokens, ``"assistant"`` tokens (the assistant loss mask),
            or the ``"last"`` token of each example.
        out: a new folder to stream safetensors shards into, each of at most ``shard_tokens``
            rows and about ``shard_mb`` MiB (memory stays bounded by one shard plus one
            batch); ``None`` keeps everything in memory.
        dtype: storage dtype (``None``: the model's).
    """
    hooks, ds = _prepare(model, data, hooks, positions, max_length)
    path = Path(out) if out is not None else None
    sink = _open_sink(path, hooks, shard_tokens, int(shard_mb * 2**20))
    it, n_batches = _my_batches(ds, batch_size, pad_id(model.tokenizer))
    show = progress and dist.is_main()
    with torch.inference_mode():
        for batch in tqdm(it, total=n_batches, desc="caching activations", disable=not show):
            sink.add(_batch_rows(model, hooks, batch, positions, dtype))
    meta = _meta(model, ds, positions)
    return _close_sink(sink, path, [list(ids) for ids in ds["input_ids"]], meta)


def _meta(model: HookedTransformer, ds: Dataset, positions: str, **extra: Any) -> dict:
    return {
        "model": model.cfg.model_name,
        "positions": positions,
        "n_examples": len(ds),
        **extra,
    }


@dataclass
class ActivationDiff:
    """``finetuned - base`` plus, when asked for, both sides (same rows in the same order)."""

    diff: Activations
    base: Activations
    finetuned: Activations


def activation_diff(
    base: HookedTransformer,
    finetuned: HookedTransformer,
    data: Any,
    hooks: Sequence[str] | str,
    *,
    positions: Positions = "all",
    batch_size: int = 8,
    out: str | Path | None = None,
    return_both: bool = False,
    max_length: int | None = None,
    shard_tokens: int = 16384,
    shard_mb: float = 256.0,
    progress: bool = True,
) -> Activations | ActivationDiff:
    """Activations of ``finetuned`` minus ``base`` on the same tokens.

    Both models see identical batches; with ``out`` the diff (and with ``return_both`` the
    base and fine-tuned activations, in ``out/base`` and ``out/finetuned``) stream to disk.
    """
    _same_tokenizer(base, finetuned)
    hooks, ds = _prepare(base, data, hooks, positions, max_length)
    check_hooks(finetuned, hooks)
    root = Path(out) if out is not None else None
    kinds = ("diff", "base", "finetuned") if return_both else ("diff",)
    budget = int(shard_mb * 2**20)
    paths = {k: None if root is None else root / k for k in kinds}
    sinks = {k: _open_sink(paths[k], hooks, shard_tokens, budget) for k in kinds}
    it, n_batches = _my_batches(ds, batch_size, pad_id(base.tokenizer))
    show = progress and dist.is_main()
    with torch.inference_mode():
        for batch in tqdm(it, total=n_batches, desc="activation diff", disable=not show):
            a = _batch_rows(base, hooks, batch, positions, torch.float32)
            b = _batch_rows(finetuned, hooks, batch, positions, torch.float32)
            diff = {k: (b[k] - a[k]) if k in hooks else a[k] for k in a}
            for kind, chunk in zip(kinds, (diff, a, b), strict=False):
                sinks[kind].add(chunk)
    token_ids = [list(ids) for ids in ds["input_ids"]]
    meta = _meta(base, ds, positions, finetuned=finetuned.cfg.model_name)
    results = {k: _close_sink(sinks[k], paths[k], token_ids, {**meta, "kind": k}) for k in kinds}
    if root is not None and dist.is_main():
        (root / "README.txt").write_text("caft-tl activation diff: diff = finetuned - base\n")
    if return_both:
        return ActivationDiff(**results)
    return results["diff"]


def remove(path: str | Path) -> None:
    """Delete a cached-activations folder (refuses folders that are not one)."""
    path = Path(path)
    if not (path / "meta.json").exists() and not (path / "diff" / "meta.json").exists():
        raise ValueError(f"{path} is not a caft-tl activations folder")
    shutil.rmtree(path)


# What a mean pass takes per batch: tokens, (tokens, mask), or {"tokens"/"input_ids", "mask"}.
MeanBatch = Tensor | tuple[Tensor, Tensor] | Mapping[str, Tensor]


# --------------------------------------------------------------------------------------------
# Mean activations on reference data
# --------------------------------------------------------------------------------------------


def _mean_batches(
    data: Tensor | Iterable[MeanBatch], mask: Tensor | None, batch_size: int
) -> Iterator[tuple[Tensor, Tensor | None]]:
    if isinstance(data, Tensor):
        tokens = data[None] if data.ndim == 1 else data
        if mask is not None and mask.shape != tokens.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} != tokens {tuple(tokens.shape)}")
        for start in range(0, tokens.shape[0], batch_size):
            part = slice(start, start + batch_size)
            yield tokens[part], None if mask is None else mask[part]
        return
    if mask is not None:
        raise ValueError("mask= goes with a token tensor; for batches, yield (tokens, mask)")
    for item in data:
        if isinstance(item, Tensor):
            yield item, None
        elif isinstance(item, Mapping):
            tokens = item.get("tokens", item.get("input_ids"))
            if tokens is None:
                raise ValueError("a batch dict needs 'tokens' or 'input_ids'")
            yield tokens, item.get("mask")
        else:
            tokens, batch_mask = item
            yield tokens, batch_mask


def mean_activations(
    model: Any,
    hooks: Iterable[str],
    data: Tensor | Iterable[MeanBatch],
    *,
    mask: Tensor | None = None,
    batch_size: int = 8,
) -> dict[str, Float[Tensor, " d"]]:
    """Mean activation per hook over the (masked) token positions of ``data``.

    ``data`` is a ``[n, pos]`` token tensor (with an optional ``[n, pos]`` ``mask``, e.g.
    assistant tokens only) or an iterable of batches. Accumulates in float64.
    """
    hooks = list(hooks)
    sums: dict[str, Tensor] = {}
    state: dict[str, Any] = {}

    def accumulate(act: Tensor, hook: Any) -> None:
        if act.ndim != 3:
            raise ValueError(
                f"mean of hook {hook.name!r} needs [batch, pos, d] activations, got "
                f"{tuple(act.shape)} (per-head hooks have no single mean vector)"
            )
        weighted = act.detach().to(torch.float64) * state["weights"][..., None]
        sums[hook.name] = sums.get(hook.name, 0) + weighted.sum(dim=(0, 1))
        state["dtype"] = act.dtype

    device = next(model.parameters()).device
    stop = stop_layer(hooks)
    kwargs = {} if stop is None else {"stop_at_layer": stop}
    count = 0.0
    with torch.no_grad(), model.hooks(fwd_hooks=[(h, accumulate) for h in hooks]):
        for tokens, batch_mask in _mean_batches(data, mask, batch_size):
            tokens = tokens.to(device)
            if batch_mask is None:
                weights = torch.ones(tokens.shape, dtype=torch.float64, device=device)
            else:
                weights = batch_mask.to(device=device, dtype=torch.float64)
            state["weights"] = weights
            count += weights.sum().item()
            model(tokens, return_type=None, **kwargs)
    if count == 0:
        raise ValueError("no token positions to average over (empty data or all-zero mask)")
    # float32 at least: a bf16 mean would lose the precision the float64 sum bought.
    dtype = torch.promote_types(state["dtype"], torch.float32)
    return {h: (sums[h] / count).to(dtype) for h in hooks}
