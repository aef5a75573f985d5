"""Crosscoders over a base and a fine-tuned model at one hook point (model diffing).

A crosscoder is one sparse dictionary read from and written to both models' activations at
the same token: one encoder per model summed into shared latents (``f = act(sum_m x_m W_enc[m]
+ b_enc)``) and one decoder per model (``x_hat_m = f W_dec[m] + b_dec[m]``). A latent whose
base decoder vanishes is a candidate for something the fine-tune introduced; the relative
decoder norm and Latent Scaling (:mod:`caft_tl.directions.diffing`) say which candidates hold.

Two architectures:

- ``"batchtopk"``: keep the ``k x batch`` largest decoder-norm-weighted activations
  (``f_i x sum_m ||W_dec[m, i]||``) over the whole batch; an inference threshold (an EMA of the
  smallest kept weighted activation) replaces the batch top-k outside training, so a token's
  latents do not depend on its batch. Dead latents (silent for ``dead_tokens`` rows) get an
  auxiliary loss: the top ``aux_k`` of them per row must reconstruct the residual error.
- ``"l1"``: ReLU with the penalty ``lambda x sum_i f_i x sum_m ||W_dec[m, i]||``. This penalty
  pays for every model's decoder separately, so a concept present in both models but weaker in
  one is cheaper with that decoder at zero ("complete shrinkage"): the L1 crosscoder calls it
  model-specific. BatchTopK has no such incentive, and Latent Scaling detects what is left.

Each model's activations are scaled so their mean norm is ``sqrt(width)`` (the scales are
stored in the crosscoder; reconstructions come back in raw units). Training streams paired
rows from disk shards written by :func:`caft_tl.activation_diff` (``return_both=True``), shows
progress, checkpoints atomically every ``checkpoint_every`` steps and resumes bit-for-bit.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor, nn
from tqdm.auto import tqdm

from caft_tl._io import (
    atomic_folder,
    now_iso,
    read_json,
    read_tensors,
    write_tensors,
    write_text_atomic,
)
from caft_tl.activations import ActivationDiff, Activations, activation_diff, check_hooks
from caft_tl.data import DataError
from caft_tl.directions.budget import TokenBudget
from caft_tl.errors import InputKeyError

__all__ = [
    "Crosscoder",
    "CrosscoderConfig",
    "PairedActivations",
    "load_crosscoder",
    "paired_activations",
    "save_crosscoder",
    "train_crosscoder",
]

Architecture = Literal["batchtopk", "l1"]
MODELS = ("base", "finetuned")
FORMAT = "caft_tl.crosscoder"
META_FILE = "crosscoder.json"
WEIGHTS_FILE = "crosscoder.safetensors"
RUN_FILE = "run.json"
# Rows read to estimate the per-model input scale and the initial decoder bias.
_SAMPLE_ROWS = 16384


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass
class CrosscoderConfig(TokenBudget):
    """How :func:`train_crosscoder` trains.

    Args:
        architecture: ``"batchtopk"`` or ``"l1"`` (ReLU + decoder-norm-weighted L1).
        n_latents: dictionary size; default 8 x the activation width.
        k: BatchTopK's active latents per row, on average over a batch.
        l1_coefficient: the L1 penalty's lambda (in normalised units), reached linearly over
            the first ``l1_warmup_fraction`` of the steps.
        lr: Adam learning rate; linear warm-up over ``warmup_steps``, linear decay to 0 over
            the last ``lr_decay_fraction`` of the steps.
        training_tokens: rows to train on (the paired cache is cycled, reshuffled each pass).
        batch_size: rows per step.
        aux_k, aux_alpha: dead latents per row used by the auxiliary loss (default half the
            width) and its weight; ``dead_tokens``: rows without firing that make a latent dead.
        threshold_beta: EMA factor of the inference threshold, updated from
            ``threshold_start_fraction`` of the steps on.
        decoder_init_norm: initial norm of each decoder row (the encoder starts as the decoder's
            transpose).
        outlier_factor: rows whose norm exceeds this many times the median norm, in either
            model, are left out of training and analysis (None: keep all). Chat tokens such as
            SmolLM2's ``<|im_start|>`` are attention sinks with norms ~100x the rest: a few
            hundred of them hold 99% of the variance and would be all the crosscoder learns.
        shuffle_rows: rows shuffled together (a buffer of ``shuffle_rows x 2 x width`` floats:
            256 MiB for SmolLM2's residual stream); cached shards hold rows in data order.
        skip_first_token: leave each example's first token out (an attention sink with norms
            tens of times the others', it would dominate the loss).
        checkpoint_every: steps between atomic checkpoints (0: only at the end).
        log_every: steps between entries of the training log (``meta["log"]``).
        l1_warmup_fraction, warmup_steps, lr_decay_fraction: see ``l1_coefficient``, ``lr``.
        seed: weights and shuffling (the global torch RNG is not touched).
        device: where to train (default: the base model's device; CPU without one).
    """

    architecture: Architecture = "batchtopk"
    n_latents: int | None = None
    k: int = 32
    l1_coefficient: float = 1.0
    l1_warmup_fraction: float = 0.05
    lr: float = 1e-4
    warmup_steps: int = 100
    lr_decay_fraction: float = 0.2
    training_tokens: int = 2_000_000
    batch_size: int = 1024
    aux_k: int | None = None
    aux_alpha: float = 1 / 32
    dead_tokens: int = 1_000_000
    threshold_beta: float = 0.999
    threshold_start_fraction: float = 0.5
    decoder_init_norm: float = 0.1
    skip_first_token: bool = True
    shuffle_rows: int = 65_536
    outlier_factor: float | None = 10.0
    checkpoint_every: int = 500
    log_every: int = 20
    seed: int = 0
    device: str | None = None

    def __post_init__(self) -> None:
        if self.architecture not in ("batchtopk", "l1"):
            raise ValueError(f"architecture must be 'batchtopk' or 'l1', got {self.architecture!r}")
        positive = (
            "k",
            "training_tokens",
            "batch_size",
            "dead_tokens",
            "log_every",
            "shuffle_rows",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("n_latents", "aux_k"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if self.n_latents is not None and self.k > self.n_latents:
            raise ValueError(f"k={self.k} is larger than n_latents={self.n_latents}")
        for name in ("lr", "decoder_init_norm"):
            if not (getattr(self, name) > 0 and math.isfinite(getattr(self, name))):
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.l1_coefficient < 0 or self.aux_alpha < 0:
            raise ValueError("l1_coefficient and aux_alpha must be >= 0")
        for name in ("l1_warmup_fraction", "lr_decay_fraction", "threshold_start_fraction"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0 < self.threshold_beta < 1:
            raise ValueError(f"threshold_beta must be in (0, 1), got {self.threshold_beta}")
        if self.outlier_factor is not None and not self.outlier_factor > 1:
            raise ValueError(f"outlier_factor must be > 1 or None, got {self.outlier_factor}")
        if self.warmup_steps < 0 or self.checkpoint_every < 0:
            raise ValueError("warmup_steps and checkpoint_every must be >= 0")
        self._check_budget()


# --------------------------------------------------------------------------------------------
# The crosscoder
# --------------------------------------------------------------------------------------------


class Crosscoder(nn.Module):
    """Two-model crosscoder at one hook (see the module docstring).

    Weights: ``W_enc [2, d, n_latents]``, shared ``b_enc [n_latents]``, ``W_dec [2, n_latents,
    d]``, ``b_dec [2, d]``; index 0 is the base model, 1 the fine-tuned one. Buffers:
    ``scale [2]`` (raw activations times scale are the normalised inputs) and ``threshold``
    (BatchTopK's inference threshold on weighted activations; negative until learnt).
    """

    def __init__(
        self,
        d_in: int,
        n_latents: int,
        architecture: Architecture = "batchtopk",
        k: int = 32,
        hook: str | None = None,
        meta: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if architecture not in ("batchtopk", "l1"):
            raise ValueError(f"architecture must be 'batchtopk' or 'l1', got {architecture!r}")
        self.d_in, self.n_latents, self.architecture, self.k = d_in, n_latents, architecture, k
        self.hook = hook
        self.meta: dict[str, Any] = dict(meta or {})
        self.W_enc = nn.Parameter(torch.zeros(2, d_in, n_latents))
        self.b_enc = nn.Parameter(torch.zeros(n_latents))
        self.W_dec = nn.Parameter(torch.zeros(2, n_latents, d_in))
        self.b_dec = nn.Parameter(torch.zeros(2, d_in))
        self.register_buffer("scale", torch.ones(2))
        self.register_buffer("threshold", torch.tensor(-1.0))
        self.register_buffer("max_norm", torch.full((2,), math.inf))

    def __repr__(self) -> str:
        return (
            f"Crosscoder({self.architecture}, {self.n_latents} latents over 2 x {self.d_in}, "
            f"hook={self.hook!r}{f', k={self.k}' if self.architecture == 'batchtopk' else ''})"
        )

    # ---- maths -------------------------------------------------------------------------

    def normalise(self, x: Float[Tensor, "batch 2 d"]) -> Float[Tensor, "batch 2 d"]:
        return x * self.scale[None, :, None]

    def kept_rows(self, x: Float[Tensor, "batch 2 d"]) -> Tensor:
        """Rows inside the training data's norm range (see ``outlier_factor``)."""
        return (x.norm(dim=-1) <= self.max_norm.to(x.device)).all(-1)

    def decoder_norms(self) -> Float[Tensor, "2 n_latents"]:
        return self.W_dec.norm(dim=-1)

    def pre_activations(self, xn: Float[Tensor, "batch 2 d"]) -> Float[Tensor, "batch n_latents"]:
        """ReLU of the summed encoders, before any top-k (normalised inputs)."""
        return torch.relu(torch.einsum("bmd,mdl->bl", xn, self.W_enc) + self.b_enc)

    def encode(
        self,
        x: Float[Tensor, "batch 2 d"],
        *,
        normalised: bool = False,
        batch_topk: bool | None = None,
    ) -> Float[Tensor, "batch n_latents"]:
        """Latent activations. BatchTopK uses the batch top-k while training (or with
        ``batch_topk=True``, or before a threshold is learnt), else the threshold."""
        xn = x if normalised else self.normalise(x)
        pre = self.pre_activations(xn)
        if self.architecture == "l1":
            return pre
        weighted = pre * self.decoder_norms().sum(0)
        use_topk = self.training if batch_topk is None else batch_topk
        if use_topk or float(self.threshold) < 0:
            return pre * _batch_topk_mask(weighted, self.k * len(pre))
        return pre * (weighted > self.threshold)

    def decode(self, f: Float[Tensor, "batch n_latents"]) -> Float[Tensor, "batch 2 d"]:
        """Reconstruction in normalised units."""
        return torch.einsum("bl,mld->bmd", f, self.W_dec) + self.b_dec

    def forward(self, x: Float[Tensor, "batch 2 d"]) -> Float[Tensor, "batch 2 d"]:
        """Reconstruction of raw activations, in raw units."""
        return self.decode(self.encode(x)) / self.scale[None, :, None]

    # ---- views -------------------------------------------------------------------------

    def decoder_directions(self, model: str = "finetuned") -> Float[Tensor, "n_latents d"]:
        """Each latent's decoder row for ``model`` ("base" / "finetuned"); the per-model
        scale is a scalar, so these are also the directions in raw activation space."""
        return self.W_dec.detach()[model_index(model)].clone()

    def info(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "d_in": self.d_in,
            "n_latents": self.n_latents,
            "architecture": self.architecture,
            "k": self.k,
            "hook": self.hook,
            "models": list(MODELS),
            "meta": self.meta,
        }


def model_index(model: str, what: str = "model") -> int:
    """The crosscoder's index of ``model`` (``"base"`` or ``"finetuned"``); ``what``
    names the argument in the error."""
    if model not in MODELS:
        raise ValueError(f"{what} must be one of {MODELS}, got {model!r}")
    return MODELS.index(model)


def _batch_topk_mask(weighted: Tensor, budget: int) -> Tensor:
    """True at the ``budget`` largest positive entries of ``weighted`` over the whole batch."""
    flat = weighted.flatten()
    budget = min(budget, flat.numel())
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[flat.topk(budget, sorted=False).indices] = True
    return mask.view_as(weighted) & (weighted > 0)


# --------------------------------------------------------------------------------------------
# Paired activations
# --------------------------------------------------------------------------------------------


@dataclass
class PairedActivations:
    """Base and fine-tuned activations of the same tokens at one hook, row for row."""

    base: Activations
    finetuned: Activations
    hook: str

    def __len__(self) -> int:
        return len(self.base)

    @property
    def width(self) -> int:
        return int(next(self.base.iter_chunks(self.hook)).shape[-1])

    def chunks(self, skip_first: bool = True, with_rows: bool = False) -> Iterator[Any]:
        """``[n, 2, d]`` float32 pieces in row order, shard by shard (memory stays bounded);
        with ``with_rows``, ``(x, rows)`` where ``rows`` index ``base.rows`` (for contexts)."""
        start = 0
        streams = (
            self.base.iter_chunks(self.hook),
            self.finetuned.iter_chunks(self.hook),
            self.base.iter_chunks("_position"),
        )
        for a, b, position in _aligned(*streams):
            x = torch.stack([a.float(), b.float()], dim=1)
            rows = torch.arange(start, start + len(a))
            start += len(a)
            keep = position != 0 if skip_first else slice(None)
            yield (x[keep], rows[keep]) if with_rows else x[keep]


def _aligned(*streams: Iterator[Tensor]) -> Iterator[tuple[Tensor, ...]]:
    """Pieces of several row streams cut at the same rows, whatever their own chunking."""
    rest: list[Tensor | None] = [None] * len(streams)
    while True:
        for i, stream in enumerate(streams):
            if rest[i] is None or len(rest[i]) == 0:
                rest[i] = next(stream, None)
        if any(r is None for r in rest):
            if any(r is not None and len(r) for r in rest):
                raise ValueError("the base and fine-tuned activations hold different row counts")
            return
        n = min(len(r) for r in rest)
        yield tuple(r[:n] for r in rest)
        rest = [r[n:] for r in rest]


def paired_activations(
    source: Any,
    finetuned: Activations | None = None,
    *,
    hook: str | None = None,
) -> PairedActivations:
    """Check and pair base and fine-tuned activations: an :class:`ActivationDiff` (from
    ``activation_diff(..., return_both=True)``), a folder it was written to, a
    :class:`PairedActivations`, or two :class:`Activations` (``source`` base, ``finetuned``).

    The two must cover the same tokens in the same order (checked token by token)."""
    if isinstance(source, PairedActivations):
        if hook in (None, source.hook):
            return source
        source, finetuned = source.base, source.finetuned
    if isinstance(source, str | os.PathLike):
        root = Path(source)
        if not (root / "base" / "meta.json").exists():
            raise FileNotFoundError(
                f"{root} holds no paired activations (expected base/ and finetuned/ written by "
                "activation_diff(..., out=..., return_both=True))"
            )
        source = ActivationDiff(
            diff=None,  # type: ignore[arg-type]
            base=Activations.load(root / "base"),
            finetuned=Activations.load(root / "finetuned"),
        )
    if isinstance(source, ActivationDiff):
        base, finetuned = source.base, source.finetuned
    elif isinstance(source, Activations) and isinstance(finetuned, Activations):
        base = source
    else:
        raise TypeError(
            "pass activation_diff(..., return_both=True) (or its folder), or base and "
            "finetuned Activations"
        )
    hook = _pick_hook(base, hook)
    for side, acts in (("base", base), ("finetuned", finetuned)):
        if hook not in acts:
            raise InputKeyError(f"{hook!r} is not in the {side} activations (hooks: {acts.hooks})")
        if len(acts) == 0:
            raise DataError(f"the {side} activations hold no tokens")
    if len(base) != len(finetuned):
        raise ValueError(
            f"the base activations hold {len(base)} tokens, the fine-tuned ones {len(finetuned)}"
        )
    for a, b in _aligned(base.iter_chunks("_token"), finetuned.iter_chunks("_token")):
        if not torch.equal(a, b):
            raise ValueError("the base and fine-tuned activations are not of the same tokens")
    widths = {int(next(acts.iter_chunks(hook)).shape[-1]) for acts in (base, finetuned)}
    if len(widths) != 1:
        raise ValueError(f"the two models' activations at {hook!r} differ in width: {widths}")
    return PairedActivations(base, finetuned, hook)


def _pick_hook(acts: Activations, hook: str | None) -> str:
    if hook is not None:
        return hook
    if len(acts.hooks) != 1:
        raise ValueError(f"the activations hold several hooks {acts.hooks}: name one (hook=)")
    return acts.hooks[0]


def _shuffled(
    pairs: PairedActivations,
    batch_size: int,
    generator: torch.Generator,
    skip_first: bool,
    shuffle_rows: int,
    keep: Callable[[Tensor], Tensor],
) -> Iterator[Float[Tensor, "batch 2 d"]]:
    """Endless batches. Rows are read in order and shuffled in buffers of ``shuffle_rows``
    (so a batch mixes several shards, whose rows follow the data's order, while memory stays
    at one buffer); what does not fill a batch joins the next buffer, across passes too."""
    rest: Tensor | None = None
    while True:
        seen, pieces, held = 0, [] if rest is None else [rest], 0 if rest is None else len(rest)
        for chunk in pairs.chunks(skip_first):
            chunk = chunk[keep(chunk)]
            seen += len(chunk)
            pieces.append(chunk)
            held += len(chunk)
            if held >= shuffle_rows:
                rest = yield from _emit(torch.cat(pieces), batch_size, generator)
                pieces, held = [rest], len(rest)
        if seen == 0:
            raise DataError("no activation rows to train on (after leaving out first tokens)")
        rest = yield from _emit(torch.cat(pieces), batch_size, generator)


def _emit(buffer: Tensor, batch_size: int, generator: torch.Generator):
    """Yield the shuffled buffer's full batches; return the rows left over."""
    buffer = buffer[torch.randperm(len(buffer), generator=generator)]
    n_full = len(buffer) // batch_size * batch_size
    yield from buffer[:n_full].split(batch_size)
    return buffer[n_full:]


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def _sample(pairs: PairedActivations, skip_first: bool) -> Float[Tensor, "n 2 d"]:
    parts, n = [], 0
    for chunk in pairs.chunks(skip_first):
        parts.append(chunk)
        n += len(chunk)
        if n >= _SAMPLE_ROWS:
            break
    if n == 0:
        raise DataError("no activation rows to train on (after leaving out first tokens)")
    return torch.cat(parts)[:_SAMPLE_ROWS]


def _initialised(cfg: CrosscoderConfig, sample: Tensor, hook: str, meta: dict) -> Crosscoder:
    d = int(sample.shape[-1])
    n_latents = cfg.n_latents or 8 * d
    if cfg.k > n_latents:
        raise ValueError(f"k={cfg.k} is larger than n_latents={n_latents}")
    cc = Crosscoder(d, n_latents, cfg.architecture, cfg.k, hook, meta)
    generator = torch.Generator().manual_seed(cfg.seed)
    with torch.no_grad():
        if cfg.outlier_factor is not None:
            cc.max_norm.copy_(cfg.outlier_factor * sample.norm(dim=-1).median(0).values)
            sample = sample[cc.kept_rows(sample)]
        mean_norm = sample.norm(dim=-1).mean(0)  # [2]
        if not bool((mean_norm > 0).all()):
            raise DataError("one model's activations are all zero at this hook")
        cc.scale.copy_(math.sqrt(d) / mean_norm)
        w = torch.randn(2, n_latents, d, generator=generator)
        w = w / w.norm(dim=-1, keepdim=True) * cfg.decoder_init_norm
        cc.W_dec.copy_(w)
        cc.W_enc.copy_(w.transpose(1, 2))
        cc.b_dec.copy_(cc.normalise(sample).mean(0))
    return cc


@dataclass
class _State:
    """What a checkpoint must carry besides weights and optimizer moments."""

    step: int
    since_fired: Tensor  # rows since each latent last fired
    log: list[dict[str, float]]


def _lr_factor(step: int, cfg: CrosscoderConfig) -> float:
    total = cfg.steps
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    decay_start = total * (1 - cfg.lr_decay_fraction)
    if cfg.lr_decay_fraction and step >= decay_start:
        return warm * max(0.0, (total - step) / (total - decay_start))
    return warm


def _l1_lambda(step: int, cfg: CrosscoderConfig) -> float:
    ramp = cfg.l1_warmup_fraction * cfg.steps
    return cfg.l1_coefficient * (min(1.0, (step + 1) / ramp) if ramp >= 1 else 1.0)


def _aux_loss(
    cc: Crosscoder, pre: Tensor, weighted: Tensor, residual: Tensor, dead: Tensor, aux_k: int
) -> Tensor:
    """Dead latents' top ``aux_k`` (by weighted activation) reconstruct the residual error;
    the squared error is divided by the residual's variance (Gao et al.'s TopK SAE trick)."""
    k = min(aux_k, int(dead.sum()))
    masked = weighted.masked_fill(~dead, -math.inf)
    idx = masked.topk(k, dim=-1).indices
    f_aux = torch.zeros_like(pre).scatter(-1, idx, pre.gather(-1, idx))
    recon = torch.einsum("bl,mld->bmd", f_aux, cc.W_dec)
    err = (recon - residual).pow(2).sum((-2, -1)).mean()
    var = (residual - residual.mean(0)).pow(2).sum((-2, -1)).mean().clamp(min=1e-8)
    return err / var


def _step(
    cc: Crosscoder, cfg: CrosscoderConfig, xn: Tensor, state: _State
) -> tuple[Tensor, dict[str, float]]:
    pre = cc.pre_activations(xn)
    norms = cc.decoder_norms()
    weighted = pre * norms.sum(0)
    if cc.architecture == "batchtopk":
        mask = _batch_topk_mask(weighted, cfg.k * len(xn))
        f = pre * mask
    else:
        f = pre
    recon = cc.decode(f)
    sq = (recon - xn).pow(2)
    mse = sq.sum((-2, -1)).mean()
    metrics: dict[str, float] = {}
    if cc.architecture == "batchtopk":
        loss = mse
        dead = state.since_fired.to(xn.device) >= cfg.dead_tokens
        if cfg.aux_alpha > 0 and bool(dead.any()):
            aux = _aux_loss(
                cc, pre, weighted, (xn - recon).detach(), dead, cfg.aux_k or cc.d_in // 2
            )
            loss = loss + cfg.aux_alpha * aux
            metrics["aux"] = float(aux.detach())
        start = int(cfg.threshold_start_fraction * cfg.steps)
        if state.step >= start and bool(mask.any()):
            # A running mean of the batch minima until 1 / (1 - beta) updates, an EMA after:
            # a plain EMA from the first update stays near early, smaller values in short runs
            # (seen: 95 latents per row at threshold instead of k=16 after 390 steps).
            n = state.step - start + 1
            beta = min(cfg.threshold_beta, 1 - 1 / n)
            smallest = weighted.detach()[mask].min()
            cc.threshold.copy_(beta * cc.threshold.clamp(min=0) + (1 - beta) * smallest)
    else:
        sparsity = (f * norms.sum(0)).sum(-1).mean()
        loss = mse + _l1_lambda(state.step, cfg) * sparsity
        metrics["sparsity"] = float(sparsity.detach())
    fired = (f > 0).any(0).cpu()
    state.since_fired += len(xn)
    state.since_fired[fired] = 0
    var = (xn - xn.mean(0)).pow(2).sum(0)  # [2, d]
    fvu = sq.detach().sum((0, 2)) / var.sum(-1).clamp(min=1e-8)
    metrics.update(
        loss=float(loss.detach()),
        mse=float(mse.detach()),
        fvu_base=float(fvu[0]),
        fvu_finetuned=float(fvu[1]),
        l0=float((f > 0).sum(-1).float().mean()),
        dead=float((state.since_fired >= cfg.dead_tokens).float().mean()),
    )
    return loss, metrics


def train_crosscoder(
    source: Any = None,
    cfg: CrosscoderConfig | None = None,
    *,
    hook: str | None = None,
    base: Any = None,
    finetuned: Any = None,
    data: Any = None,
    out: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
) -> Crosscoder:
    """Train a crosscoder on paired base / fine-tuned activations at ``hook``.

    Args:
        source: paired activations (see :func:`paired_activations`: an ActivationDiff with
            both sides, its folder, or a PairedActivations). Or leave it out and pass
            ``base``, ``finetuned``, ``data`` and ``hook``: the pair is cached first (into
            ``out/acts`` when ``out`` is given, so it streams from disk and is kept for
            :func:`caft_tl.directions.diff_crosscoder`).
        out: a run folder: ``run.json``, ``checkpoint/`` (atomic, every
            ``cfg.checkpoint_every`` steps) and, at the end, ``crosscoder/``.
        resume: continue from ``out/checkpoint`` (same config and data); gives the same
            weights as an unbroken run.

    Returns the crosscoder in eval mode (BatchTopK then uses its learnt threshold). Its
    ``meta["log"]`` holds the training curve.
    """
    cfg = cfg or CrosscoderConfig()
    root = Path(out) if out is not None else None
    if resume and root is None:
        raise ValueError("resume=True needs out= (the run folder holding the checkpoint)")
    if root is not None:
        _check_run(root, cfg, resume)
    pairs = _pairs(source, hook, base, finetuned, data, root, progress)
    identity = _run_identity(cfg, pairs)
    if root is not None:
        _check_identity(root, identity)
    device = torch.device(cfg.device or _model_device(base))
    sample = _sample(pairs, cfg.skip_first_token)
    meta = {
        "base_model": pairs.base.meta.get("model"),
        "finetuned_model": pairs.finetuned.meta.get("model"),
        "training": cfg.to_dict(),
        "n_rows": len(pairs),
        "date": now_iso(),
    }
    cc = _initialised(cfg, sample, pairs.hook, meta).to(device)
    optimizer = torch.optim.Adam(cc.parameters(), lr=cfg.lr)
    state = _State(0, torch.zeros(cc.n_latents, dtype=torch.long), [])
    checkpoint = None if root is None else root / "checkpoint"
    if checkpoint is not None and (checkpoint / META_FILE).exists():
        state = _load_checkpoint(checkpoint, cc, optimizer)
    if state.step < cfg.steps:
        _fit(cc, cfg, pairs, optimizer, state, checkpoint, progress)
    cc.meta["log"] = state.log
    cc.eval()
    if root is not None:
        save_crosscoder(cc, root / "crosscoder", overwrite=True)
    return cc


def _model_device(model: Any) -> str:
    return str(model.cfg.device) if model is not None and hasattr(model, "cfg") else "cpu"


def _pairs(source, hook, base, finetuned, data, root, progress) -> PairedActivations:
    if source is not None:
        if data is not None:
            raise ValueError("pass paired activations or base/finetuned/data, not both")
        return paired_activations(source, hook=hook)
    if base is None or finetuned is None or data is None or hook is None:
        raise ValueError(
            "train_crosscoder needs paired activations, or base, finetuned, data and hook"
        )
    check_hooks(base, hook)
    acts_dir = None if root is None else root / "acts"
    if acts_dir is not None and (acts_dir / "base" / "meta.json").exists():
        return paired_activations(acts_dir, hook=hook)  # cached by an interrupted earlier run
    if acts_dir is not None and acts_dir.exists():
        shutil.rmtree(acts_dir)  # a half-written cache (no meta.json): start it again
    both = activation_diff(
        base, finetuned, data, hook, return_both=True, out=acts_dir, progress=progress
    )
    return paired_activations(both, hook=hook)


def _run_identity(cfg: CrosscoderConfig, pairs: PairedActivations) -> dict[str, Any]:
    digest = hashlib.sha256()
    for tokens in pairs.base.iter_chunks("_token"):
        digest.update(tokens.to(torch.long).numpy().tobytes())
    return {
        "format": FORMAT + ".run",
        "config": {k: v for k, v in cfg.to_dict().items() if k not in ("device", "log_every")},
        "hook": pairs.hook,
        "data": "sha256:" + digest.hexdigest()[:16],
        "n_rows": len(pairs),
    }


def _check_run(root: Path, cfg: CrosscoderConfig, resume: bool) -> None:
    run_file = root / RUN_FILE
    if run_file.exists():
        if not resume:
            raise FileExistsError(
                f"{root} already holds a crosscoder run; pass resume=True to continue it, or "
                "choose another folder"
            )
        return
    if root.exists() and any(p.name != "acts" for p in root.iterdir()):
        raise FileExistsError(f"{root} is not empty and holds no crosscoder run")


def _check_identity(root: Path, identity: dict[str, Any]) -> None:
    run_file = root / RUN_FILE
    if not run_file.exists():
        root.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run_file, json.dumps(identity, indent=2))
        return
    previous = read_json(run_file, f"cannot resume {root}")
    changed = sorted(
        k for k in set(previous["config"]) | set(identity["config"])
        if previous["config"].get(k) != identity["config"].get(k)
    )  # fmt: skip
    if changed:
        raise ValueError(f"cannot resume {root}: the config differs in {changed}")
    for key in ("hook", "data", "n_rows"):
        if previous.get(key) != identity[key]:
            raise ValueError(f"cannot resume {root}: the {key} differs from the saved run's")


def _fit(cc, cfg, pairs, optimizer, state: _State, checkpoint, progress) -> None:
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    shuffle_rows = max(cfg.shuffle_rows, cfg.batch_size)
    batches = _shuffled(
        pairs, cfg.batch_size, generator, cfg.skip_first_token, shuffle_rows, cc.kept_rows
    )
    for _ in range(state.step):  # the same batches as an unbroken run: skip the done ones
        next(batches)
    cc.train()
    device = next(cc.parameters()).device
    bar = tqdm(
        total=cfg.steps, initial=state.step, desc=f"crosscoder ({cfg.architecture})",
        disable=not progress,
    )  # fmt: skip
    with bar:
        while state.step < cfg.steps:
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * _lr_factor(state.step, cfg)
            xn = cc.normalise(next(batches).to(device))
            loss, metrics = _step(cc, cfg, xn, state)
            if not math.isfinite(float(loss.detach())):
                raise FloatingPointError(
                    f"crosscoder loss is {float(loss.detach())} at step {state.step}"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            state.step += 1
            if state.step % cfg.log_every == 0 or state.step == cfg.steps:
                state.log.append({"step": state.step, **metrics})
                bar.set_postfix(fvu=f"{metrics['fvu_finetuned']:.3f}", l0=f"{metrics['l0']:.1f}")
            bar.update(1)
            at_save = cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0
            if checkpoint is not None and (at_save or state.step == cfg.steps):
                _save_checkpoint(checkpoint, cc, optimizer, state)


def _save_checkpoint(folder: Path, cc: Crosscoder, optimizer, state: _State) -> None:
    with atomic_folder(folder, overwrite=True) as tmp:
        _write(cc, tmp)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        write_tensors({"since_fired": state.since_fired}, tmp / "trainer.safetensors")
        (tmp / "state.json").write_text(json.dumps({"step": state.step, "log": state.log}))


def _load_checkpoint(folder: Path, cc: Crosscoder, optimizer) -> _State:
    what = f"cannot resume from {folder}"
    saved = load_crosscoder(folder)
    if (saved.d_in, saved.n_latents) != (cc.d_in, cc.n_latents):
        raise ValueError(f"{what}: the checkpoint's shape differs from this run's")
    cc.load_state_dict(saved.state_dict())
    device = next(cc.parameters()).device
    optimizer.load_state_dict(
        torch.load(folder / "optimizer.pt", map_location=device, weights_only=True)
    )
    record = read_json(folder / "state.json", what)
    since = read_tensors(folder / "trainer.safetensors", what)["since_fired"]
    return _State(int(record["step"]), since, list(record["log"]))


# --------------------------------------------------------------------------------------------
# Saving and loading
# --------------------------------------------------------------------------------------------


def _write(cc: Crosscoder, folder: Path) -> None:
    write_tensors(cc.state_dict(), folder / WEIGHTS_FILE)
    (folder / META_FILE).write_text(json.dumps(cc.info(), indent=2))


def save_crosscoder(cc: Crosscoder, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``crosscoder.json`` + ``crosscoder.safetensors`` into a folder, atomically."""
    with atomic_folder(path, overwrite) as tmp:
        _write(cc, tmp)
    return Path(path)


def load_crosscoder(path: str | os.PathLike, device: str | torch.device = "cpu") -> Crosscoder:
    """Load what :func:`save_crosscoder` wrote; a run folder (from ``train_crosscoder(out=)``)
    loads its finished ``crosscoder/``."""
    folder = Path(path)
    if not (folder / META_FILE).exists() and (folder / "crosscoder" / META_FILE).exists():
        folder = folder / "crosscoder"
    what = f"cannot load a crosscoder from {folder}"
    info = read_json(folder / META_FILE, what)
    if info.get("format") != FORMAT:
        raise ValueError(f"{folder / META_FILE} is not a caft-tl crosscoder")
    cc = Crosscoder(
        info["d_in"], info["n_latents"], info["architecture"], info["k"], info["hook"],
        info.get("meta"),
    )  # fmt: skip
    weights = read_tensors(folder / WEIGHTS_FILE, what)
    missing = sorted(set(cc.state_dict()) - set(weights))
    if missing:
        raise ValueError(f"{what}: {WEIGHTS_FILE} lacks {missing}")
    cc.load_state_dict(weights)
    cc.eval()
    return cc.to(device)
