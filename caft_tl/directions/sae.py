"""SAE latents as concept directions: train and load SAE-Lens SAEs, rank their latents.

Training uses SAE-Lens's own ``SAETrainer`` on activations cached by
:func:`caft_tl.cache_activations` (so chat formatting and masks match the rest of the
package; SAE-Lens's ``LanguageModelSAETrainingRunner`` would re-tokenise and pack text
itself, ignoring assistant masks). wandb logging is always off; saving is SAE-Lens's
``save_model`` and loading ``SAE.load_from_disk``, so a saved SAE works with plain SAE-Lens.

What :func:`train_sae` returns is SAE-Lens's *inference* SAE, as ``save_inference_model``
writes it:

- ``"standard"`` (ReLU + L1 penalty) -> ``StandardSAE``;
- ``"topk"`` -> ``TopKSAE`` (exactly k latents per token; decoder norms folded into the
  encoder so ``W_dec`` rows have unit norm);
- ``"batchtopk"`` -> ``JumpReLUSAE``. SAE-Lens trains BatchTopK with a top-k over the whole
  batch (k per token on average) and keeps an EMA of the smallest kept activation
  (``topk_threshold``). There is no inference BatchTopK class: the saved SAE is a JumpReLU
  whose per-latent thresholds all equal that EMA, so at inference a latent fires when its
  pre-activation exceeds the threshold, token by token, and the number of active latents
  per token varies around k instead of averaging exactly k over a batch.

Latent ranking follows the CAFT reference (cadentj/caft): mean SAE activation difference,
SAE encoding of the activation difference, and attribution (activation x gradient of the
fine-tuning loss). Each returns a :class:`ConceptSet` whose rows are ``W_dec[latent]`` at
the SAE's hook, labelled ``"latent <id>"``; :func:`union_top` merges rankings.

``sae_lens`` is imported lazily: importing it takes about 10 s, which ``import caft_tl``
should not pay.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import re
import tempfile
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from datasets import Dataset
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from caft_tl.activations import (
    ActivationDiff,
    Activations,
    activation_diff,
    cache_activations,
    check_hooks,
)
from caft_tl.data import DataError, batches, pad_id, tokenize
from caft_tl.directions.budget import TokenBudget
from caft_tl.directions.concepts import ConceptSet, data_fingerprint, make_provenance
from caft_tl.errors import InputKeyError
from caft_tl.models import HubUnavailableError, ModelLoadError, looks_like_no_hub

if TYPE_CHECKING:
    from sae_lens import SAE
    from transformer_lens import HookedTransformer

__all__ = [
    "SAEConfig",
    "load_sae",
    "rank_by_attribution",
    "rank_by_diff_encoding",
    "rank_by_mean_diff",
    "save_sae",
    "train_sae",
    "union_top",
]

Architecture = Literal["batchtopk", "topk", "standard"]
Sign = Literal["abs", "positive", "negative"]
_ARCHITECTURES = ("batchtopk", "topk", "standard")
_LABEL = re.compile(r"^latent (\d+)$")
# Rows encoded at once: [rows, d_sae] float32 stays near 64 MB for d_sae = 4096.
_ENCODE_ROWS = 4096
# Rows drawn to estimate the input scale and the initial decoder bias.
_SAMPLE_ROWS = 32768
# Where each SAE came from (a folder or release/id), for provenance; weak so SAEs can die.
_SOURCES: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass
class SAEConfig(TokenBudget):
    """How :func:`train_sae` trains an SAE.

    Args:
        architecture: ``"batchtopk"`` (saved as JumpReLU), ``"topk"`` or ``"standard"`` (L1).
        d_sae: number of latents; default 8 x the activation width at ``hook``.
        k: active latents per token (top-k kinds; for BatchTopK an average over the batch).
        l1_coefficient: sparsity penalty of ``"standard"`` SAEs (on activations x decoder
            norms, in normalised units: see ``normalize_activations``).
        lr: Adam learning rate; the last ``lr_decay_fraction`` of steps decay it linearly to 0.
        training_tokens: activation rows to train on (the cached data is cycled, reshuffled
            every pass, when it holds fewer).
        batch_size: rows per step.
        seed: initial weights and shuffling (the global torch RNG is left untouched).
        device: where to train; default the model's device (CPU without a model).
        hook: the hook point; may also be passed to :func:`train_sae`.
        normalize_activations: ``"expected_average_only_in"`` scales inputs so their mean norm
            is sqrt(width) while training, then folds the scale into the weights (SAE-Lens),
            which keeps ``lr`` and ``l1_coefficient`` meaningful across models;
            ``"none"`` trains on raw activations.
        positions: which tokens are cached for training (``"assistant"`` for chat data only).
        skip_first_token: leave out each example's first token when training from cached
            activations: its residual stream is an attention sink with norms far above
            every other token's (SmolLM2: tens of times), which would dominate the MSE
            (SAE-Lens's runner likewise can exclude special tokens).
    """

    architecture: Architecture = "batchtopk"
    d_sae: int | None = None
    k: int = 32
    l1_coefficient: float = 5.0
    lr: float = 3e-4
    training_tokens: int = 2_000_000
    batch_size: int = 1024
    seed: int = 0
    device: str | None = None
    hook: str | None = None
    normalize_activations: Literal["expected_average_only_in", "none"] = "expected_average_only_in"
    positions: Literal["all", "assistant"] = "all"
    lr_decay_fraction: float = 0.2
    skip_first_token: bool = True

    def __post_init__(self) -> None:
        if self.architecture not in _ARCHITECTURES:
            raise ValueError(
                f"architecture must be one of {_ARCHITECTURES}, got {self.architecture!r}"
            )
        for name in ("k", "training_tokens", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.d_sae is not None and (not isinstance(self.d_sae, int) or self.d_sae < 1):
            raise ValueError(f"d_sae must be a positive integer or None, got {self.d_sae}")
        if self.architecture != "standard" and self.d_sae is not None and self.k > self.d_sae:
            raise ValueError(f"k={self.k} is larger than d_sae={self.d_sae}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.l1_coefficient < 0:
            raise ValueError(f"l1_coefficient must be >= 0, got {self.l1_coefficient}")
        if not 0 <= self.lr_decay_fraction < 1:
            raise ValueError(f"lr_decay_fraction must be in [0, 1), got {self.lr_decay_fraction}")
        if self.normalize_activations not in ("expected_average_only_in", "none"):
            raise ValueError(
                "normalize_activations must be 'expected_average_only_in' or 'none', "
                f"got {self.normalize_activations!r}"
            )
        if self.positions not in ("all", "assistant"):
            raise ValueError(f"positions must be 'all' or 'assistant', got {self.positions!r}")
        self._check_budget()


# --------------------------------------------------------------------------------------------
# Activation batches for training
# --------------------------------------------------------------------------------------------

ActsSource = Activations | Tensor | Iterable[Tensor]


def _cut(buffer: Tensor, batch_size: int) -> tuple[list[Tensor], Tensor]:
    """Full batches from the front of ``buffer`` and the rows left over."""
    n_full = len(buffer) // batch_size * batch_size
    return list(buffer[:n_full].split(batch_size)), buffer[n_full:]


def _shuffled_batches(
    chunks: Callable[[], Iterable[Tensor]], batch_size: int, generator: torch.Generator
) -> Iterator[Float[Tensor, "batch d"]]:
    """Endless batches; each pass over the chunks shuffles rows within every chunk (shards of
    on-disk activations stay in order, so memory stays at one shard). A batch may span two
    chunks or two passes."""
    rest: Tensor | None = None
    while True:
        rows_this_pass = 0
        for chunk in chunks():
            rows_this_pass += len(chunk)
            chunk = chunk[torch.randperm(len(chunk), generator=generator)]
            full, rest = _cut(chunk if rest is None else torch.cat([rest, chunk]), batch_size)
            yield from full
        if rows_this_pass == 0:
            raise DataError("no activation rows to train on")


def _rebatched(source: Iterable[Tensor], batch_size: int) -> Iterator[Float[Tensor, "batch d"]]:
    """One pass over a user's iterator of ``[n, d]`` tensors, cut into equal batches."""
    rest: Tensor | None = None
    seen = 0
    for chunk in source:
        chunk = chunk.detach().reshape(-1, chunk.shape[-1])
        seen += len(chunk)
        full, rest = _cut(chunk if rest is None else torch.cat([rest, chunk]), batch_size)
        yield from full
    raise DataError(
        f"the activation iterator ran out after {seen} rows; training_tokens asks for more "
        "(pass fewer training_tokens, or an Activations / tensor, which are cycled)"
    )


def _activation_rows(acts: Activations, hook: str, skip_first: bool) -> Iterator[Tensor]:
    if not skip_first:
        yield from acts.iter_chunks(hook)
        return
    for rows, position in zip(acts.iter_chunks(hook), acts.iter_chunks("_position"), strict=True):
        yield rows[position != 0]


def _provider(
    source: ActsSource, hook: str, cfg: SAEConfig, generator: torch.Generator
) -> Iterator[Tensor]:
    batch_size = cfg.batch_size
    if isinstance(source, Activations):
        if hook not in source:
            raise InputKeyError(f"{hook!r} is not in the given activations (hooks: {source.hooks})")
        chunks = functools.partial(_activation_rows, source, hook, cfg.skip_first_token)
        return _shuffled_batches(chunks, batch_size, generator)
    if isinstance(source, Tensor):
        if source.ndim != 2 or len(source) == 0:
            raise ValueError(f"activations must be a non-empty [n, d] tensor, got {source.shape}")
        rows = source.detach().cpu()
        return _shuffled_batches(lambda: [rows], batch_size, generator)
    return _rebatched(source, batch_size)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def _resolve_hook(hook: str | None, cfg: SAEConfig) -> str:
    if hook is not None and cfg.hook is not None and hook != cfg.hook:
        raise ValueError(f"hook {hook!r} disagrees with cfg.hook {cfg.hook!r}")
    hook = hook or cfg.hook
    if hook is None:
        raise ValueError("name the hook point to train on (hook= or SAEConfig.hook)")
    return hook


def _training_sae(cfg: SAEConfig, d_in: int, device: str, meta: dict[str, Any]):
    from sae_lens.registry import get_sae_training_class
    from sae_lens.saes.sae import SAEMetadata

    sae_cls, cfg_cls = get_sae_training_class(cfg.architecture)
    kwargs: dict[str, Any] = {
        "d_in": d_in,
        "d_sae": cfg.d_sae or 8 * d_in,
        "device": device,
        "normalize_activations": cfg.normalize_activations,
        "metadata": SAEMetadata(**meta),
    }
    if cfg.architecture == "standard":
        # SAE-Lens's advice: warm the L1 penalty up so latents are not killed at the start.
        kwargs |= {"l1_coefficient": cfg.l1_coefficient, "l1_warm_up_steps": cfg.steps // 20}
    else:
        kwargs["k"] = cfg.k
    return sae_cls(cfg_cls(**kwargs))


def _trainer_config(cfg: SAEConfig, device: str):
    from sae_lens.config import LoggingConfig, SAETrainerConfig

    steps = cfg.steps
    return SAETrainerConfig(
        total_training_samples=steps * cfg.batch_size,
        train_batch_size_samples=cfg.batch_size,
        lr=cfg.lr,
        lr_end=cfg.lr / 10,  # unused by the constant schedule, but SAETrainer asserts it is set
        lr_scheduler_name="constant",
        lr_decay_steps=int(steps * cfg.lr_decay_fraction),
        device=device,
        # SAE-Lens's defaults (1000 / 2000 steps) assume long runs; in a short run the TopK
        # auxiliary loss would never see a dead latent. Scale the windows with the run.
        dead_feature_window=max(1, min(1000, steps // 5)),
        feature_sampling_window=max(1, min(2000, steps // 2)),
        logger=LoggingConfig(log_to_wandb=False),
        checkpoint_path=None,
        n_checkpoints=0,
        save_final_checkpoint=False,
    )


@torch.no_grad()
def _init_from_sample(trainer: Any, sample: list[Tensor]) -> None:
    """Estimate SAE-Lens's input scaling from ``sample`` (``fit`` then sees it set and does
    not draw its own 1000 batches), and start the decoder bias at the scaled mean activation
    rather than zero, as dictionary_learning and Anthropic do: residual streams have large
    mean offsets that an lr of 3e-4 would take thousands of steps to learn."""
    sae = trainer.sae
    if sae.cfg.normalize_activations == "expected_average_only_in":
        trainer.activation_scaler.estimate_scaling_factor(
            d_in=sae.cfg.d_in, data_provider=iter(sample), n_batches_for_norm_estimate=len(sample)
        )
    rows = torch.cat(sample).to(sae.device, sae.dtype)
    sae.b_dec.data.copy_(trainer.activation_scaler(rows).mean(0))


@contextmanager
def _sae_lens_bars(show: bool) -> Iterator[None]:
    """SAETrainer.fit and ActivationScaler make tqdm bars with no switch, and tqdm reads
    TQDM_DISABLE only when it is imported; so ``progress=False`` swaps those modules' tqdm
    for a disabled one while training, and puts it back after."""
    if show:
        yield
        return
    import sae_lens.training.activation_scaler as scaler_module
    import sae_lens.training.sae_trainer as trainer_module

    modules = [m for m in (scaler_module, trainer_module) if hasattr(m, "tqdm")]
    saved = [m.tqdm for m in modules]
    for module, bar in zip(modules, saved, strict=True):
        module.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        for module, bar in zip(modules, saved, strict=True):
            module.tqdm = bar


def _record_losses(trainer: Any, every: int) -> list[float]:
    """Wrap ``trainer.step`` (SAE-Lens's public per-step seam) to keep the MSE every
    ``every`` steps, without re-implementing ``fit``."""
    history: list[float] = []
    step = trainer.step

    def recording_step(batch: Tensor):
        out = step(batch)
        if trainer.n_training_steps % every == 0:
            history.append(float(out.losses["mse_loss"].detach()))
        return out

    trainer.step = recording_step
    return history


def _to_inference(training_sae: Any, device: str) -> SAE:
    """The inference SAE exactly as SAE-Lens saves it (BatchTopK -> JumpReLU, decoder norms
    folded), by its own save_inference_model / load_from_disk round trip."""
    from sae_lens import SAE

    with tempfile.TemporaryDirectory(prefix="caft_tl_sae_") as tmp:
        training_sae.save_inference_model(tmp)
        return SAE.load_from_disk(tmp, device=device)


def train_sae(
    model: HookedTransformer | None,
    data: Any,
    hook: str | None = None,
    cfg: SAEConfig | None = None,
    *,
    acts: ActsSource | None = None,
    out: str | os.PathLike | None = None,
    progress: bool = True,
) -> SAE:
    """Train an SAE-Lens SAE on activations of ``model`` at ``hook``; offline, no wandb.

    Args:
        model: any HookedTransformer (may be None when ``acts`` is given).
        data: texts / chats / JSONL path / Dataset, cached with
            :func:`caft_tl.cache_activations` at ``cfg.positions``.
        acts: instead of ``data``: cached :class:`Activations` (cycled, rows reshuffled each
            pass, first tokens left out per ``cfg.skip_first_token``), an ``[n, d]`` tensor
            (cycled; used as given), or any iterator of ``[n, d]`` tensors (one pass; it must
            hold ``cfg.training_tokens`` rows).
        out: a new folder to save the SAE into (SAE-Lens format; :func:`load_sae` reads it).

    Returns the inference SAE (see the module docstring: BatchTopK comes back as JumpReLU).
    Its ``cfg.metadata`` records the hook, the model, the training settings and
    ``mse_history`` (the training MSE, in normalised units, every ``mse_every`` steps).
    """
    cfg = cfg or SAEConfig()
    hook = _resolve_hook(hook, cfg)
    source = _activation_source(model, data, hook, cfg, acts, progress)
    device = cfg.device or (str(model.cfg.device) if model is not None else "cpu")
    provider = _provider(source, hook, cfg, torch.Generator().manual_seed(cfg.seed))
    # A sample for the input scale and the initial decoder bias (and the width). A one-pass
    # iterator gets its sample back in front, so no training row is lost.
    sample = [next(provider) for _ in range(min(cfg.steps, max(1, _SAMPLE_ROWS // cfg.batch_size)))]
    if not isinstance(source, Activations | Tensor):
        provider = itertools.chain(sample, provider)
    meta = _training_metadata(model, hook, cfg)
    sae = _fit(cfg, sample, device, meta, provider, progress)
    if out is not None:
        save_sae(sae, out)
    return sae


def _activation_source(model, data, hook, cfg, acts, progress) -> ActsSource:
    if acts is not None:
        if data is not None:
            raise ValueError("pass data or acts, not both")
        return acts
    if model is None or data is None:
        raise ValueError("train_sae needs a model and data, or precomputed acts=")
    check_hooks(model, hook)
    return cache_activations(model, data, hook, positions=cfg.positions, progress=progress)


def _training_metadata(model, hook: str, cfg: SAEConfig) -> dict[str, Any]:
    return {
        "hook_name": hook,
        "model_name": None if model is None else model.cfg.model_name,
        "caft_tl_training": cfg.to_dict(),
    }


def _fit(cfg: SAEConfig, sample: list[Tensor], device: str, meta, provider, progress) -> SAE:
    from sae_lens import SAETrainer

    every = max(1, cfg.steps // 200)
    where = torch.device(device)
    # Fork the RNG of the device the weights are made on, so the caller's RNG is untouched.
    forked = [where.index or 0] if where.type == "cuda" else []
    with torch.random.fork_rng(devices=forked), _sae_lens_bars(progress):
        torch.manual_seed(cfg.seed)  # SAE-Lens initialises weights from the global RNG
        training_sae = _training_sae(cfg, int(sample[0].shape[-1]), device, meta)
        trainer = SAETrainer(
            cfg=_trainer_config(cfg, device), sae=training_sae, data_provider=provider
        )
        _init_from_sample(trainer, sample)
        history = _record_losses(trainer, every)
        trainer.fit()
    sae = _to_inference(training_sae, device)
    sae.cfg.metadata.mse_history = history
    sae.cfg.metadata.mse_every = every
    return sae


# --------------------------------------------------------------------------------------------
# Saving and loading
# --------------------------------------------------------------------------------------------


def save_sae(sae: SAE, path: str | os.PathLike) -> Path:
    """Save with SAE-Lens's ``save_model`` (``cfg.json`` + ``sae_weights.safetensors``) into a
    new folder, atomically (a crash leaves no half-written SAE)."""
    from caft_tl._io import atomic_folder

    path = Path(path)
    if path.exists():
        if not path.is_dir() or any(path.iterdir()):
            raise FileExistsError(f"{path} exists and is not empty; choose a new folder")
        path.rmdir()
    with atomic_folder(path) as tmp:
        sae.save_model(tmp)
    _SOURCES[sae] = str(path)
    return path


def _dtype_name(dtype: torch.dtype | str | None) -> str | None:
    if dtype is None or isinstance(dtype, str):
        return dtype
    return str(dtype).removeprefix("torch.")


def load_sae(
    name_or_path: str | os.PathLike,
    sae_id: str | None = None,
    *,
    device: str = "cpu",
    dtype: torch.dtype | str | None = None,
) -> SAE:
    """Load an SAE: a folder written by :func:`train_sae` / :func:`save_sae` / SAE-Lens's
    ``save_model`` (``SAE.load_from_disk``), or an SAE-Lens release (or Hugging Face repo of
    SAE-Lens SAEs) with its ``sae_id`` (``SAE.from_pretrained``, which needs the hub).

    Raises :class:`caft_tl.models.HubUnavailableError` when the hub cannot be reached.
    """
    from sae_lens import SAE
    from sae_lens.constants import SAE_CFG_FILENAME

    path = Path(name_or_path)
    if path.exists():
        if sae_id is not None:
            raise ValueError(f"{path} is a local folder; sae_id is only for hub releases")
        if not (path / SAE_CFG_FILENAME).is_file():
            raise FileNotFoundError(
                f"{path} holds no saved SAE (no {SAE_CFG_FILENAME}); expected a folder written "
                "by train_sae(out=...), save_sae or SAE.save_model"
            )
        sae = SAE.load_from_disk(path, device=device, dtype=_dtype_name(dtype))
        _SOURCES[sae] = str(path)
        return sae
    return _load_pretrained(str(name_or_path), sae_id, device, _dtype_name(dtype) or "float32")


def _load_pretrained(release: str, sae_id: str | None, device: str, dtype: str) -> SAE:
    from sae_lens import SAE
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    directory = get_pretrained_saes_directory()  # ships with SAE-Lens: no hub needed
    if sae_id is None:
        if release in directory:
            ids = list(directory[release].saes_map)
            raise ValueError(f"name the SAE of release {release!r}: sae_id, e.g. {ids[:5]}")
        raise ModelLoadError(
            f"{release!r} is no folder here and no SAE-Lens release. To load an SAE-Lens "
            "release or a Hugging Face repo of SAEs, pass its sae_id "
            "(load_sae(release, sae_id)); that needs the Hugging Face hub. Offline, train one "
            "with train_sae(..., out=folder) and load_sae(folder)."
        )
    try:
        sae = SAE.from_pretrained(release, sae_id, device=device, dtype=dtype)
    except Exception as exc:  # hub failures come as OSError / HTTP / connection errors
        if looks_like_no_hub(exc):
            raise HubUnavailableError(
                f"loading SAE {release!r} / {sae_id!r} needs the Hugging Face hub, which is "
                f"unreachable here ({type(exc).__name__}: {str(exc)[:200]}). Offline, train an "
                "SAE with train_sae(..., out=folder) and load_sae(folder)."
            ) from exc
        raise
    _SOURCES[sae] = f"{release}/{sae_id}"
    return sae


# --------------------------------------------------------------------------------------------
# SAE helpers for ranking
# --------------------------------------------------------------------------------------------


def sae_hook_name(sae: SAE, hook: str | None) -> str:
    """``hook``, or the hook the SAE was trained on (ValueError if it records none)."""
    hook = hook or sae.cfg.metadata.hook_name
    if not hook:
        raise ValueError("the SAE records no hook_name: pass hook=")
    return hook


def _sae_info(sae: SAE) -> dict[str, Any]:
    return {
        "architecture": sae.cfg.architecture(),
        "d_in": int(sae.cfg.d_in),
        "d_sae": int(sae.cfg.d_sae),
        "source": _SOURCES.get(sae),
        "fingerprint": data_fingerprint(sae.W_dec),  # identifies the SAE in union_top
    }


@contextmanager
def _flat_inputs(sae: SAE) -> Iterator[None]:
    """Our activations are per token and flattened ([n, heads * d_head] for hook_z); an SAE
    set to reshape hook_z inputs would mistake rows for heads, so switch that off for a while."""
    reshaping = getattr(sae, "hook_z_reshaping_mode", False)
    if reshaping:
        sae.turn_off_forward_pass_hook_z_reshaping()
    try:
        yield
    finally:
        if reshaping:
            sae.turn_on_forward_pass_hook_z_reshaping()


def _at_least_fp32(x: Tensor) -> Tensor:
    # bf16 / fp16 SAEs are summed and stored in fp32; fp64 ones (tests) keep their precision.
    return x.to(torch.promote_types(x.dtype, torch.float32))


@torch.no_grad()
def _encode(sae: SAE, x: Float[Tensor, "n d"]) -> Float[Tensor, "n d_sae"]:
    parts = []
    with _flat_inputs(sae):
        for start in range(0, len(x), _ENCODE_ROWS):
            rows = x[start : start + _ENCODE_ROWS].to(sae.device, sae.dtype)
            parts.append(_at_least_fp32(sae.encode(rows).to_dense()))
    return torch.cat(parts) if parts else x.new_zeros((0, sae.cfg.d_sae))


def _linear_encoder(sae: SAE) -> Float[Tensor, "d d_sae"]:
    """The encoder's linear part, as the SAE applies it (TopK SAEs trained with
    ``rescale_acts_by_decoder_norm`` scale pre-activations by decoder norms)."""
    w = sae.W_enc.detach()
    if getattr(sae.cfg, "rescale_acts_by_decoder_norm", False):
        w = w * sae.W_dec.detach().norm(dim=-1)
    return w


def _effective_decoder(sae: SAE) -> Float[Tensor, "d_sae d"]:
    """What one unit of latent i adds to the reconstruction (divided by the decoder norm
    where the SAE rescales activations by it)."""
    w = sae.W_dec.detach()
    if getattr(sae.cfg, "rescale_acts_by_decoder_norm", False):
        w = w / w.norm(dim=-1, keepdim=True).clamp(min=1e-8)
    return w


def _ranked(
    sae: SAE,
    hook: str,
    scores: Float[Tensor, " d_sae"],
    top: int,
    sign: Sign,
    provenance: dict[str, Any],
) -> ConceptSet:
    """Top latents by |score| (or by the signed score), as decoder rows in a ConceptSet.

    Latents whose key is 0 (never active, or moved the other way under a signed ranking,
    as the reference's ``latents[acts > 0]``) are left out rather than filling ``top``.
    """
    if not isinstance(top, int) or top < 1:
        raise ValueError(f"top must be a positive integer, got {top}")
    if sign not in ("abs", "positive", "negative"):
        raise ValueError(f"sign must be 'abs', 'positive' or 'negative', got {sign!r}")
    scores = scores.detach().double().cpu()
    if not torch.isfinite(scores).all():
        raise ValueError("latent scores contain NaN or inf (check the activations)")
    key = {"abs": scores.abs(), "positive": scores, "negative": -scores}[sign]
    order = torch.argsort(key, descending=True, stable=True)[:top]
    order = order[key[order] > 0]
    if len(order) == 0:
        raise ValueError(f"no latent has a non-zero score under sign={sign!r}")
    idx = order.tolist()
    directions = _at_least_fp32(sae.W_dec.detach()[order.to(sae.W_dec.device)]).cpu()
    return ConceptSet(
        {hook: directions},
        labels={hook: [f"latent {i}" for i in idx]},
        scores={hook: scores[order].tolist()},
        provenance=provenance,
    )


def _target_rows(acts: Activations, targets_only: bool) -> Iterator[Tensor | None]:
    for target in acts.iter_chunks("_target"):
        yield target.bool() if targets_only else None


def _provenance(method: str, sae: SAE, hook: str, top: int, sign: Sign, **extra: Any):
    model = extra.pop("model", None)
    data = extra.pop("data", None)
    return make_provenance(
        method,
        model=model,
        data=data,
        sae=_sae_info(sae),
        hook=hook,
        top=top,
        sign=sign,
        **extra,
    )


# --------------------------------------------------------------------------------------------
# (a) mean SAE activation difference
# --------------------------------------------------------------------------------------------


def rank_by_mean_diff(
    sae: SAE,
    base: HookedTransformer | None = None,
    finetuned: HookedTransformer | None = None,
    data: Any = None,
    *,
    acts: ActivationDiff | None = None,
    hook: str | None = None,
    top: int = 100,
    sign: Sign = "abs",
    targets_only: bool = True,
    batch_size: int = 8,
    progress: bool = True,
) -> ConceptSet:
    """Latents whose mean SAE activation changes most: ``mean f(h_ft) - mean f(h_base)`` over
    the same tokens, ranked by absolute value (score keeps the sign; the reference keeps
    ``sign="positive"`` only, latents more active after fine-tuning).

    ``targets_only`` averages over target tokens (assistant tokens of chat data, every
    token of texts). Pass ``acts=activation_diff(..., return_both=True)`` to reuse a cache.
    """
    hook = sae_hook_name(sae, hook)
    if acts is None:
        if base is None or finetuned is None or data is None:
            raise ValueError("rank_by_mean_diff needs base, finetuned and data, or acts=")
        acts = activation_diff(
            base,
            finetuned,
            data,
            hook,
            return_both=True,
            batch_size=batch_size,
            progress=progress,
        )
    if not isinstance(acts, ActivationDiff):
        raise TypeError("acts must be an ActivationDiff: activation_diff(..., return_both=True)")
    total, n = _mean_diff_sums(sae, acts, hook, targets_only)
    provenance = _provenance(
        "sae_mean_diff",
        sae,
        hook,
        top,
        sign,
        model=base if base is not None else acts.base.meta.get("model"),
        data=acts.base.token_ids,
        finetuned=(
            finetuned.cfg.model_name if finetuned is not None else acts.base.meta.get("finetuned")
        ),
        n_tokens=n,
        targets_only=targets_only,
    )
    return _ranked(sae, hook, total / n, top, sign, provenance)


def _mean_diff_sums(
    sae: SAE, acts: ActivationDiff, hook: str, targets_only: bool
) -> tuple[Float[Tensor, " d_sae"], int]:
    total = torch.zeros(sae.cfg.d_sae, dtype=torch.float64)
    n = 0
    chunks = zip(
        acts.base.iter_chunks(hook),
        acts.finetuned.iter_chunks(hook),
        _target_rows(acts.base, targets_only),
        strict=True,
    )
    for base_rows, ft_rows, keep in chunks:
        if keep is not None:
            base_rows, ft_rows = base_rows[keep], ft_rows[keep]
        total += (_encode(sae, ft_rows) - _encode(sae, base_rows)).double().sum(0).cpu()
        n += len(base_rows)
    if n == 0:
        raise DataError("no tokens to average over (no target tokens in the data?)")
    return total, n


# --------------------------------------------------------------------------------------------
# (b) SAE encoding of the activation difference
# --------------------------------------------------------------------------------------------


def _mean_diff_vector(diff: Activations, hook: str, targets_only: bool) -> tuple[Tensor, int]:
    total, n = None, 0
    for rows, keep in zip(diff.iter_chunks(hook), _target_rows(diff, targets_only), strict=True):
        rows = rows[keep] if keep is not None else rows
        part = rows.double().sum(0)
        total = part if total is None else total + part
        n += len(rows)
    if n == 0 or total is None:
        raise DataError("no tokens to average over (no target tokens in the data?)")
    return total / n, n


def _diff_rows(diff_acts: Any, hook: str, targets_only: bool) -> Iterator[Tensor]:
    if isinstance(diff_acts, Tensor):
        yield diff_acts.reshape(-1, diff_acts.shape[-1])
        return
    for rows, keep in zip(
        diff_acts.iter_chunks(hook), _target_rows(diff_acts, targets_only), strict=True
    ):
        yield rows[keep] if keep is not None else rows


def rank_by_diff_encoding(
    sae: SAE,
    diff_acts: Activations | ActivationDiff | Float[Tensor, "*n d"],
    *,
    hook: str | None = None,
    top: int = 100,
    sign: Sign = "abs",
    mode: Literal["linear", "encode"] = "linear",
    targets_only: bool = True,
) -> ConceptSet:
    """Latents the SAE encoder reads in the activation difference ``finetuned - base``.

    ``mode="linear"`` (default) scores ``mean_diff @ W_enc``: the encoder's linear part
    applied to the mean difference, with no biases and no activation function. A
    difference is not an activation: the biases (``b_dec`` subtracted at the input,
    ``b_enc``) are offsets for absolute activations and cancel between the two models, and
    the nonlinearity (ReLU, JumpReLU threshold, top-k) would zero most of a vector whose
    scale is far from an activation's. What is left is the first-order change of each
    latent's pre-activation, and by linearity averaging per-token differences before or
    after encoding gives the same scores.

    ``mode="encode"`` is what the CAFT reference code does (``sae.encode(diff).sum(0)`` per
    token, biases and nonlinearity included; it keeps positive latents only, i.e.
    ``sign="positive"``); scores are the mean encoding over tokens.

    ``diff_acts``: the ``diff`` of :func:`caft_tl.activation_diff` (or the ActivationDiff),
    or a tensor of differences ``[n, d]`` / ``[d]``.
    """
    hook = sae_hook_name(sae, hook)
    if mode not in ("linear", "encode"):
        raise ValueError(f"mode must be 'linear' or 'encode', got {mode!r}")
    if isinstance(diff_acts, ActivationDiff):
        diff_acts = diff_acts.diff
    scores, n = _diff_scores(sae, diff_acts, hook, mode, targets_only)
    provenance = _provenance(
        "sae_diff_encoding",
        sae,
        hook,
        top,
        sign,
        model=None if isinstance(diff_acts, Tensor) else diff_acts.meta.get("model"),
        data=None if isinstance(diff_acts, Tensor) else diff_acts.token_ids,
        mode=mode,
        n_tokens=n,
        targets_only=targets_only,
    )
    return _ranked(sae, hook, scores, top, sign, provenance)


def _diff_scores(sae, diff_acts, hook, mode, targets_only) -> tuple[Tensor, int]:
    if isinstance(diff_acts, Activations) and hook not in diff_acts:
        raise InputKeyError(f"{hook!r} is not in the activations (hooks: {diff_acts.hooks})")
    if mode == "linear":
        if isinstance(diff_acts, Tensor):
            rows = diff_acts.reshape(-1, diff_acts.shape[-1]).double()
            mean, n = rows.mean(0), len(rows)
        else:
            mean, n = _mean_diff_vector(diff_acts, hook, targets_only)
        w = _linear_encoder(sae).double()
        return mean.to(w.device) @ w, n
    total = torch.zeros(sae.cfg.d_sae, dtype=torch.float64)
    n = 0
    for rows in _diff_rows(diff_acts, hook, targets_only):
        total += _encode(sae, rows).double().sum(0).cpu()
        n += len(rows)
    if n == 0:
        raise DataError("no tokens to average over (no target tokens in the data?)")
    return total / n, n


# --------------------------------------------------------------------------------------------
# (c) attribution: activation x gradient of the fine-tuning loss
# --------------------------------------------------------------------------------------------


def _loss_dataset(model: HookedTransformer, data: Any, max_length: int | None) -> Dataset:
    if isinstance(data, Dataset) and "input_ids" in data.column_names:
        if "loss_mask" not in data.column_names:
            data = data.add_column("loss_mask", [[1] * len(r) for r in data["input_ids"]])
        return data
    if model.tokenizer is None:
        raise ValueError("the model has no tokenizer: pass data tokenised with caft_tl.data")
    return tokenize(data, model.tokenizer, max_length=max_length or model.cfg.n_ctx)


def _masked_ce_sum(
    logits: Float[Tensor, "batch pos vocab"],
    input_ids: Int[Tensor, "batch pos"],
    loss_mask: Int[Tensor, "batch pos"],
) -> Float[Tensor, ""]:
    """Summed cross-entropy where ``loss_mask[t] == 1`` (position t-1 predicts token t), the
    fine-tuning loss of caft_tl.train (``directions`` must not import ``train``)."""
    targets = loss_mask[:, 1:].bool()
    picked = logits[:, :-1][targets]
    picked = picked.to(torch.promote_types(picked.dtype, torch.float32))  # bf16 -> fp32, fp64 kept
    return F.cross_entropy(picked, input_ids[:, 1:][targets], reduction="sum")


def _act_and_grad(
    model: HookedTransformer, hook: str, batch: Mapping[str, Tensor], scale: float
) -> tuple[Float[Tensor, "b p d"], Float[Tensor, "b p d"]]:
    """The activation at ``hook`` and the gradient of ``scale * summed CE`` with respect to it.

    The hook swaps the activation for an identical leaf that requires grad, so gradients
    reach it even for a frozen model, and autograd.grad computes no parameter gradients.
    """
    store: dict[str, Tensor] = {}

    def keep(act: Tensor, hook: Any) -> Tensor:
        store["act"] = act.detach().requires_grad_(True)
        return store["act"]

    device = model.cfg.device
    ids = batch["input_ids"].to(device)
    with torch.enable_grad(), model.hooks(fwd_hooks=[(hook, keep)]):
        logits = model(ids, attention_mask=batch["attention_mask"].to(device))
        loss = _masked_ce_sum(logits, ids, batch["loss_mask"].to(device)) * scale
        (grad,) = torch.autograd.grad(loss, store["act"])
    act = store["act"].detach()
    # [batch, pos, heads, d_head] hooks are flattened per token, like cached activations.
    return (act.flatten(2), grad.flatten(2)) if act.ndim > 3 else (act, grad)


def _attribution_positions(
    batch: Mapping[str, Tensor], positions: Literal["target", "all"]
) -> Bool[Tensor, "b p"]:
    real = batch["attention_mask"].bool()
    if positions == "target":
        return real & batch["loss_mask"].bool()
    # "all": every real token but the first, whose huge attention-sink activations the
    # reference also leaves out (it zeroes BOS positions).
    keep = real.clone()
    keep[:, 0] = False
    return keep


def rank_by_attribution(
    sae: SAE,
    model: HookedTransformer,
    data: Any,
    *,
    hook: str | None = None,
    top: int = 100,
    sign: Sign = "abs",
    positions: Literal["target", "all"] = "target",
    batch_size: int = 8,
    max_length: int | None = None,
    progress: bool = True,
) -> ConceptSet:
    """Latents by attribution to the fine-tuning loss (activation x gradient).

    ``L`` is the mean cross-entropy over all target tokens of ``data`` (loss masks from
    :func:`caft_tl.data.tokenize`: assistant tokens of chats, every token of texts). For
    latent i, ``attribution_i = sum over positions of f_i(h) * (W_dec[i] . dL/dh)`` at the
    SAE's hook: the first-order change of L when latent i's contribution is scaled, i.e.
    ``dL/d alpha_i`` at ``alpha = 1`` for ``h + (alpha_i - 1) f_i(h) W_dec[i]``. Positive
    means the latent, as the model uses it, raises the loss.

    ``positions="target"`` sums over target tokens; ``"all"`` over every real token but the
    first, as the reference does. Because L is the mean over the whole data set (not a
    mean of per-batch means), scores do not depend on ``batch_size``.
    """
    hook = sae_hook_name(sae, hook)
    if positions not in ("target", "all"):
        raise ValueError(f"positions must be 'target' or 'all', got {positions!r}")
    check_hooks(model, hook)
    ds = _loss_dataset(model, data, max_length)
    n_targets = sum(sum(m[1:]) for m in ds["loss_mask"])
    if n_targets == 0:
        raise DataError("no target tokens in the data (every loss_mask is empty)")
    total = _attribution_sums(
        sae, model, hook, ds, positions, 1.0 / n_targets, batch_size, progress
    )
    provenance = _provenance(
        "sae_attribution",
        sae,
        hook,
        top,
        sign,
        model=model,
        data=ds["input_ids"],
        positions=positions,
        n_targets=int(n_targets),
    )
    return _ranked(sae, hook, total, top, sign, provenance)


def _attribution_sums(sae, model, hook, ds, positions, scale, batch_size, progress) -> Tensor:
    tok = model.tokenizer
    pad = pad_id(tok)
    w_dec = _effective_decoder(sae)
    total = torch.zeros(sae.cfg.d_sae, dtype=torch.float64)
    n_batches = -(-len(ds) // batch_size)
    it = batches(ds, batch_size, pad_token_id=pad, padding_side="right")
    for batch in tqdm(it, total=n_batches, desc="SAE attribution", disable=not progress):
        act, grad = _act_and_grad(model, hook, batch, scale)
        keep = _attribution_positions(batch, positions).to(act.device)
        f = _encode(sae, act[keep])  # [n, d_sae]
        g = grad[keep].to(w_dec.device, w_dec.dtype) @ w_dec.T  # W_dec[i] . dL/dh
        total += (f.to(g.device, g.dtype) * g).double().sum(0).cpu()
    return total


# --------------------------------------------------------------------------------------------
# Union of rankings
# --------------------------------------------------------------------------------------------


def latent_id(label: str, what: str = "union_top") -> int:
    """The id in a ``"latent <id>"`` row label (SAE rankings and crosscoder ConceptSets)."""
    match = _LABEL.match(label)
    if match is None:
        raise ValueError(
            f"{what} needs rows labelled 'latent <id>' (as rank_by_* make them), got {label!r}"
        )
    return int(match.group(1))


def _method_names(rankings: Sequence[ConceptSet]) -> list[str]:
    names, seen = [], {}
    for i, cs in enumerate(rankings):
        name = str(cs.provenance.get("method") or f"ranking_{i}")
        seen[name] = seen.get(name, 0) + 1
        names.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return names


def _check_same_sae(rankings: Sequence[ConceptSet]) -> None:
    prints = {
        p["parameters"]["sae"]["fingerprint"]
        for p in (cs.provenance for cs in rankings)
        if isinstance(p.get("parameters", {}).get("sae"), dict)
    }
    if len(prints) > 1:
        raise ValueError("these rankings come from different SAEs; latent ids would not match")


@dataclass
class _Entry:
    direction: Tensor
    methods: list[str] = field(default_factory=list)
    ranks: dict[str, int] = field(default_factory=dict)


def union_top(rankings: Sequence[ConceptSet], n: int = 100) -> ConceptSet:
    """The union of each ranking's top ``n`` latents, one row per (hook, latent).

    Rows are interleaved by rank (every method's first latent, then every method's second,
    ...), so each method's best come first. The score of a row is the number of methods
    that selected it; the provenance records, per row, which methods and at what rank.
    """
    if not rankings:
        raise ValueError("union_top needs at least one ranking")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n}")
    _check_same_sae(rankings)
    methods = _method_names(rankings)
    entries: dict[str, dict[int, _Entry]] = {}
    for rank in range(n):
        for cs, method in zip(rankings, methods, strict=True):
            for hook in cs.hooks:
                if rank < len(cs.labels[hook]):
                    _add(entries, hook, cs, rank, method)
    return _union_set(entries, rankings, methods, n)


def _add(entries, hook: str, cs: ConceptSet, rank: int, method: str) -> None:
    latent = latent_id(cs.labels[hook][rank])
    direction = cs[hook][rank]
    at_hook = entries.setdefault(hook, {})
    if latent not in at_hook:
        at_hook[latent] = _Entry(direction)
    elif not torch.allclose(at_hook[latent].direction, direction.to(at_hook[latent].direction)):
        raise ValueError(
            f"latent {latent} at {hook!r} has different directions in different rankings; "
            "were they made with different SAEs?"
        )
    entry = at_hook[latent]
    if method not in entry.ranks:
        entry.methods.append(method)
        entry.ranks[method] = rank


def _union_set(entries, rankings, methods, n) -> ConceptSet:
    directions, labels, scores, selected_by, ranks = {}, {}, {}, {}, {}
    for hook, at_hook in entries.items():
        latents = list(at_hook)
        directions[hook] = torch.stack([at_hook[i].direction for i in latents])
        labels[hook] = [f"latent {i}" for i in latents]
        scores[hook] = [float(len(at_hook[i].methods)) for i in latents]
        # Methods in the order the rankings were given, whichever picked the latent first.
        selected_by[hook] = [sorted(at_hook[i].methods, key=methods.index) for i in latents]
        ranks[hook] = [at_hook[i].ranks for i in latents]
    provenance = {
        "method": "sae_union_top",
        "parameters": {"n": n, "methods": methods},
        "selected_by": selected_by,
        "ranks": ranks,
        "parts": [cs.provenance for cs in rankings],
    }
    return ConceptSet(directions, labels, scores, provenance)
