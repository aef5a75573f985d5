"""Faster forward passes for ``HookedTransformer`` components, with every hook name kept.

TransformerLens 3.x computes some layers in ways that cost time on every forward:

* ``GatedMLP`` and ``Unembed`` call ``F.linear(x, W.T.contiguous())``: a full copy of each
  weight per forward (about 430 MB for SmolLM2-135M, half of a decoding step's time, and
  the copies are kept for the backward pass);
* attention materialises the ``[batch, head, query, key]`` scores and pattern, masks them
  with ``torch.where`` and expands grouped key/value heads with ``repeat_interleave``;
* a transformer block applies ``ln1`` three times (for queries, keys and values) even when
  the three inputs are the same tensor;
* rotary builds the rotated half with a clone and two slice assignments and concatenates an
  empty pass-through part when the whole head rotates (copies in both passes; the short
  route gives the same bits without them);
* the embedding lookup ``W_E[tokens, :]`` accumulates the gradients of repeated tokens with
  atomic adds on CPU, in a different order on every backward (``F.embedding`` gives the same
  rows and a fixed order).

:func:`accelerate` gives these modules subclasses whose ``forward`` takes a shorter path
*only when nothing can tell the difference*: the weights, parameter names, state dict and
hook points stay the same, and a module falls back to TransformerLens's own ``forward``
whenever a hook is attached to an activation the short path does not compute (the
attention scores and pattern, ``ln1``'s scale and output) or the configuration uses a
feature the short path does not implement (soft-capping, local attention, attention sinks,
``use_attn_result``, split q/k/v inputs, post-norm blocks, ...). So ``run_with_cache``,
``hook_pattern`` hooks and every other TransformerLens tool behave as before, while
fine-tuning, caching at the residual stream and generation take the short path.

Results agree with the plain ``HookedTransformer`` to float rounding (tested at 1e-4
relative on logits and gradients in fp32, see ``tests/test_fast.py``); they are not bitwise
identical, because scaled-dot-product attention and an un-transposed matmul accumulate in a
different order.

:func:`caft_tl.load_model` and :func:`caft_tl.models.tiny` return accelerated models
(``fast=False`` opts out); :func:`accelerate` with ``enable=False`` reverts a model, and
``with plain_forward(model):`` does so for a block of code.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn
from torch.nn.utils import parametrize
from transformer_lens.components import (
    MLP,
    Attention,
    Embed,
    GatedMLP,
    GroupedQueryAttention,
    TransformerBlock,
    Unembed,
)
from transformer_lens.hook_points import HookPoint
from transformer_lens.utilities import get_offset_position_ids
from transformer_lens.utilities.activation_functions import softcap_enabled
from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES
from transformer_lens.utilities.attention import simple_attn_linear

from caft_tl.lora import factored

__all__ = ["accelerate", "is_accelerated", "plain_forward"]

_QK_NORM_ARCHITECTURES = ("OlmoeForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM")


def _affine(
    x: Float[Tensor, "... d_in"], w: Float[Tensor, "d_in d_out"], b: Tensor | None = None
) -> Float[Tensor, "... d_out"]:
    """``x @ w + b`` as one GEMM on the weight as stored (``[in, out]``): no copy of ``w``
    forward, and a contiguous weight gradient backward."""
    if x.device != w.device:
        x = x.to(w.device)
    flat = x.reshape(-1, x.shape[-1])
    out = flat @ w if b is None else torch.addmm(b, flat, w)
    return out.view(*x.shape[:-1], w.shape[-1])


def _linear(
    module: nn.Module, name: str, x: Float[Tensor, "... d_in"], b: Tensor | None = None
) -> Float[Tensor, "... d_out"]:
    """``x @ module.<name> + b`` for a ``[in, out]`` weight; a LoRA adapter on it is applied
    in factored form (:func:`caft_tl.lora.factored`), never merged into a copy."""
    w, adapter = factored(module, name)
    return _plus_adapter(_affine(x, w, b), adapter, x)


def _plus_adapter(out: Tensor, adapter: Any, x: Tensor) -> Tensor:
    """``out`` (a fresh product of ``x`` with a base weight, contiguous) plus the adapter's
    update, added in place; ``out`` itself without an adapter."""
    if adapter is not None:
        rows = x.to(out.device).reshape(-1, x.shape[-1])
        adapter.add_to(out.view(rows.shape[0], -1), rows)
    return out


def _hooked(*points: nn.Module | None) -> bool:
    """Whether any hook (TransformerLens or plain PyTorch, either direction) is attached."""
    return any(
        p is not None
        and bool(
            p._forward_hooks or p._forward_pre_hooks or p._backward_hooks or p._backward_pre_hooks
        )
        for p in points
    )


def _is_caching_hook(fn: Any) -> bool:
    """Whether ``fn`` is TransformerLens's own forward caching hook (``run_with_cache``,
    ``add_caching_hooks``): it only stores a detached copy, so it cannot change the forward."""
    func = getattr(fn, "func", fn)  # run_with_cache registers functools.partial(save_hook)
    kwargs = getattr(fn, "keywords", None) or {}
    return (
        getattr(func, "__module__", "") == "transformer_lens.HookedRootModule"
        and getattr(func, "__qualname__", "").endswith("<locals>.save_hook")
        and not kwargs.get("is_backward", False)
    )


def _only_caching(*points: nn.Module | None) -> bool:
    """Whether every hook on ``points`` is a forward caching hook (or there are none): then
    the short path may run, feeding the hooks the values TransformerLens would, so that
    ``run_with_cache`` takes the same route as a plain forward and gives the same logits."""
    for p in points:
        if p is None or not _hooked(p):
            continue
        if p._forward_pre_hooks or p._backward_hooks or p._backward_pre_hooks:
            return False
        handles = getattr(p, "fwd_hooks", None)
        if handles is None or len(handles) != len(p._forward_hooks):
            return False  # a plain PyTorch hook: unknown
        if not all(_is_caching_hook(h.user_hook) for h in handles):
            return False
    return True


# --------------------------------------------------------------------------- MLP, unembed


class FastGatedMLP(GatedMLP):
    """``GatedMLP`` without the per-forward transposed weight copies."""

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        if self.cfg.is_layer_norm_activation():  # SoLU-style MLPs: TransformerLens's path
            return super().forward(x)
        pre_act = self.hook_pre(_linear(self, "W_gate", x))
        pre_linear = self.hook_pre_linear(_linear(self, "W_in", x))
        post_act = self.hook_post(self.act_fn(pre_act) * pre_linear + self.b_in)
        return _linear(self, "W_out", post_act, self.b_out)


class FastMLP(MLP):
    """``MLP`` (ungated) with LoRA adapters applied in factored form; TransformerLens's
    own product is already copy-free."""

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        if self.cfg.is_layer_norm_activation():
            return super().forward(x)
        pre_act = self.hook_pre(_linear(self, "W_in", x, self.b_in))
        post_act = self.hook_post(self.act_fn(pre_act))
        return _linear(self, "W_out", post_act, self.b_out)


class FastEmbed(Embed):
    """``Embed`` through ``F.embedding``: the same rows, and a backward that adds the
    gradients of repeated tokens in a fixed order. TransformerLens's ``W_E[tokens, :]``
    adds them with ``index_put_(accumulate=True)``, which on CPU with several threads sums
    in whatever order the threads arrive, so two identical steps of a model with real
    vocabulary sizes get ``W_E`` gradients that differ in the last bits (measured on the
    embedded model: up to 3e-8), and a seeded fine-tune does not repeat itself exactly."""

    def forward(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_model"]:
        if tokens.dtype not in (torch.int64, torch.int32):  # e.g. a boolean mask: indexing
            return super().forward(tokens)
        w_e = self.W_E
        tokens = tokens.to(w_e.device)
        # Python indexing counts negative ids from the end; F.embedding refuses them.
        tokens = torch.where(tokens < 0, tokens + w_e.shape[0], tokens)
        embedded = F.embedding(tokens, w_e)
        return self.ln(embedded) if self.cfg.post_embedding_ln else embedded


class FastUnembed(Unembed):
    """``Unembed`` without copying the ``[d_model, d_vocab]`` matrix on every forward."""

    def forward(
        self, residual: Float[Tensor, "batch pos d_model"]
    ) -> Float[Tensor, "batch pos d_vocab_out"]:
        return self.hook_out(_affine(self.hook_in(residual), self.W_U, self.b_U))


# --------------------------------------------------------------------------- attention


def _overridden(module: nn.Module) -> bool:
    """Whether a method of the module's class is replaced on this instance (e.g. a test or an
    experiment patching ``calculate_qkv_matrices`` on one layer): the short path would not
    call it, so TransformerLens's own forward must run."""
    cls = type(module)
    return any(callable(v) and hasattr(cls, k) for k, v in vars(module).items())


def _attention_fast_ok(self: Any, additive_attention_mask: Any, position_bias: Any) -> bool:
    cfg = self.cfg
    return (
        additive_attention_mask is None
        and not _overridden(self)
        and position_bias is None
        and _only_caching(self.hook_attn_scores, self.hook_pattern)
        and cfg.positional_embedding_type in ("rotary", "standard", "shortformer")
        and (self._attention_dir_override or cfg.attention_dir) == "causal"
        and self.attn_type == "global"
        and not softcap_enabled(cfg.attn_scores_soft_cap)
        and not cfg.use_attention_sinks
        and not (cfg.use_logn_attn and not self.training)
        and not cfg.use_attn_result
        and not cfg.use_split_qkv_input
        and not cfg.use_attn_in
        and not cfg.load_in_4bit
        and cfg.clip_qkv is None
        and cfg.original_architecture not in _QK_NORM_ARCHITECTURES
    )


def _masks_nothing(attention_mask: Tensor | None) -> bool:
    """An all-ones mask (an unpadded batch) on the CPU. Without it the causal SDPA kernel
    and the broadcast rotary table apply (Hugging Face's SDPA models drop such masks too);
    on an accelerator, reading the mask at every layer would stall the queue, so it stays."""
    return (
        attention_mask is not None
        and attention_mask.device.type == "cpu"
        and bool(attention_mask.all())
    )


def _rotary(
    self: Any,
    x: Float[Tensor, "batch pos head d_head"],
    offset: int,
    attention_mask: Int[Tensor, "batch offset_pos"] | None,
) -> Float[Tensor, "batch pos head d_head"]:
    """``self.apply_rotary(x, offset, attention_mask)``, the same bits with fewer copies:
    TransformerLens builds the rotated half with a clone and two slice assignments, and
    concatenates an empty pass-through part when the whole head rotates (a copy each, in the
    forward and the backward pass). Anything else (adjacent pairs, dynamic NTK, a table that
    must grow or move) is TransformerLens's own method."""
    cfg, pos = self.cfg, x.size(1)
    if (
        cfg.rotary_adjacent_pairs
        or (cfg.use_dynamic_ntk_rope and not self.training)
        or x.device != self.rotary_sin.device
        or offset + pos > self.rotary_cos.shape[0]
    ):
        return self.apply_rotary(x, offset, attention_mask)
    x_rot, x_pass = x[..., : cfg.rotary_dim], x[..., cfg.rotary_dim :]
    half = x_rot.size(-1) // 2
    flip = torch.cat([-x_rot[..., half:], x_rot[..., :half]], dim=-1)
    if attention_mask is None:
        cos = self.rotary_cos[None, offset : offset + pos, None, :]
        sin = self.rotary_sin[None, offset : offset + pos, None, :]
    else:
        ids = get_offset_position_ids(offset, attention_mask).to(self.rotary_cos.device)
        cos, sin = self.rotary_cos[ids, None, :], self.rotary_sin[ids, None, :]
    rotated = x_rot * cos + flip * sin
    return rotated if x_pass.size(-1) == 0 else torch.cat([rotated, x_pass], dim=-1)


def _attention_forward(
    self: Any,
    query_input: Float[Tensor, "batch pos d_model"],
    key_input: Float[Tensor, "batch kv_pos d_model"],
    value_input: Float[Tensor, "batch kv_pos d_model"],
    past_kv_cache_entry: Any = None,
    additive_attention_mask: Tensor | None = None,
    attention_mask: Int[Tensor, "batch offset_pos"] | None = None,
    position_bias: Tensor | None = None,
) -> Float[Tensor, "batch pos d_model"]:
    if not _attention_fast_ok(self, additive_attention_mask, position_bias):
        return self._plain.forward(
            self,
            query_input,
            key_input,
            value_input,
            past_kv_cache_entry=past_kv_cache_entry,
            additive_attention_mask=additive_attention_mask,
            attention_mask=attention_mask,
            position_bias=position_bias,
        )
    q, k, v = _qkv(self, query_input, key_input, value_input)
    offset, rotated_past = 0, None
    entry = past_kv_cache_entry
    if entry is None and _masks_nothing(attention_mask):
        attention_mask = None  # the same numbers through the unmasked rotary and kernel
    # Rotated keys may be remembered across decoding steps only when rotating them again
    # would give the same tensor: not with dynamic NTK (the table changes with the length,
    # and TransformerLens re-rotates every key with the current one), and not when a hook on
    # hook_rot_k could edit the remembered tensor in place (the edit would compound).
    memo = (
        entry is not None
        and not self.cfg.use_dynamic_ntk_rope
        and not _hooked(getattr(self, "hook_rot_k", None))
    )
    if entry is not None:
        offset = entry.past_keys.size(1)
        rotated_past = _rotated_past_keys(entry, attention_mask) if memo else None
        k, v = entry.append(k, v)
    if self.cfg.positional_embedding_type == "rotary":
        q = self.hook_rot_q(_rotary(self, q, offset, attention_mask))
        if rotated_past is None:
            k = _rotary(self, k, 0, attention_mask)
        else:
            new = _rotary(self, k[:, offset:], offset, attention_mask)
            k = torch.cat([rotated_past, new], dim=1)
        if memo and not entry.frozen:
            _remember_rotated_keys(entry, k, attention_mask)
        k = self.hook_rot_k(k)
    if _hooked(self.hook_attn_scores, self.hook_pattern):  # caching hooks only (see above)
        _feed_pattern_hooks(self, q, k, offset, attention_mask)
    z = self.hook_z(_sdpa(q, k, v, offset, attention_mask, 1.0 / self.attn_scale))
    w_o, adapter = factored(self, "W_O")  # the stored weight, not a merged copy
    n_heads, d_head, d_model = w_o.shape
    z_flat = z.reshape(*z.shape[:2], n_heads * d_head)
    out = _affine(z_flat, w_o.reshape(n_heads * d_head, d_model), self.b_O)  # a view of W_O
    return _plus_adapter(out, adapter, z_flat)


# Up to this many token rows, q/k/v are projected head by head with one batched GEMM on the
# weights as stored ([head, d_model, d_head]); TransformerLens rearranges each weight into a
# [head * d_head, d_model] copy first, which costs more than the product itself when few
# tokens go through (decoding: 3-4x per projection here). With many rows one big GEMM on the
# copy wins, so training keeps TransformerLens's projection. Measured on 2 CPU threads,
# SmolLM2-135M shapes: break-even between 128 and 256 rows.
PER_HEAD_MAX_ROWS = 128


def _per_head(
    x: Float[Tensor, "batch pos d_model"],
    w: Float[Tensor, "head d_model d_head"],
    b: Float[Tensor, "head d_head"],
) -> Float[Tensor, "batch pos head d_head"]:
    batch, pos, d_model = x.shape
    n_heads, _, d_head = w.shape
    if x.device != w.device:
        x = x.to(w.device)
    rows = x.reshape(batch * pos, d_model).expand(n_heads, batch * pos, d_model)
    out = torch.baddbmm(b[:, None, :], rows, w)  # [head, batch * pos, d_head]
    return out.view(n_heads, batch, pos, d_head).permute(1, 2, 0, 3)


def _head_linear(
    self: Any, name: str, x: Float[Tensor, "batch pos d_model"], b: Tensor, per_head: bool
) -> Float[Tensor, "batch pos head d_head"]:
    """One of q/k/v from the weight as stored, plus its LoRA adapter in factored form."""
    w, adapter = factored(self, name)
    if adapter is None:
        return _per_head(x, w, b) if per_head else simple_attn_linear(x, w, b)
    x = x.to(w.device)
    if per_head:  # a permuted view: add the update in place, one temporary
        out = _per_head(x, w, b)
        return out.add_(adapter.project(x.reshape(-1, x.shape[-1])).view(out.shape))
    return _plus_adapter(simple_attn_linear(x, w, b), adapter, x)  # contiguous output


def _feed_pattern_hooks(
    self: Any, q: Tensor, k: Tensor, offset: int, attention_mask: Tensor | None
) -> None:
    """Compute the attention scores and pattern as TransformerLens's forward does, only to
    hand them to their (caching) hooks; the output still comes from the short path."""
    with torch.no_grad():
        scores = self.calculate_attention_scores(q, k)
        scores = self.hook_attn_scores(self.apply_causal_mask(scores, offset, attention_mask))
        pattern = F.softmax(scores, dim=-1)
        self.hook_pattern(torch.where(torch.isnan(pattern), torch.zeros_like(pattern), pattern))


def _contiguous_if_hooked(point: HookPoint, x: Tensor) -> Tensor:
    """``point(x)``; the per-head product is a permuted view, and a hook may ``.view`` what it
    gets as it can TransformerLens's contiguous tensor: give such hooks a contiguous copy
    (caching hooks store the view as it is, so a cached run computes what a plain one does)."""
    return point(x.contiguous() if _hooked(point) and not _only_caching(point) else x)


def _qkv(
    self: Any,
    query_input: Float[Tensor, "batch pos d_model"],
    key_input: Float[Tensor, "batch kv_pos d_model"],
    value_input: Float[Tensor, "batch kv_pos d_model"],
) -> tuple[Tensor, Tensor, Tensor]:
    """TransformerLens's ``calculate_qkv_matrices`` (same hooks, same values), with the
    per-head GEMM for short inputs and LoRA adapters in factored form."""
    grouped = isinstance(self, GroupedQueryAttention)
    if grouped and self.cfg.ungroup_grouped_query_attention:
        return self.calculate_qkv_matrices(query_input, key_input, value_input)
    # Grouped: the un-repeated key/value heads, as TransformerLens's GQA uses them.
    names = ("W_Q", "_W_K", "_W_V") if grouped else ("W_Q", "W_K", "W_V")
    rows = max(t.shape[0] * t.shape[1] for t in (query_input, key_input, value_input))
    per_head = rows <= PER_HEAD_MAX_ROWS
    if not per_head and all(factored(self, n)[1] is None for n in names):
        return self.calculate_qkv_matrices(query_input, key_input, value_input)
    biases = (self.b_Q, self._b_K, self._b_V) if grouped else (self.b_Q, self.b_K, self.b_V)
    inputs = (query_input, key_input, value_input)
    points = (self.hook_q, self.hook_k, self.hook_v)
    q, k, v = (
        _contiguous_if_hooked(point, _head_linear(self, name, x, b, per_head))
        for point, name, x, b in zip(points, names, inputs, biases, strict=True)
    )
    if self.cfg.use_qk_norm:
        q = self._apply_qk_norm(q, self.q_norm)
        k = self._apply_qk_norm(k, self.k_norm)
    return q, k, v


# TransformerLens caches keys before the rotary embedding and rotates all of them again at
# every decoding step (a third of a SmolLM2 layer's non-GEMM time at 100 cached tokens). The
# cache keeps that layout, so TransformerLens's own forward can continue any cache; the
# rotated keys are remembered beside it, on the cache entry, and reused only while the entry
# still holds the very tensor they were computed from (same object, same in-place version)
# under the same attention mask: anything else (rows dropped from the batch, a frozen or
# edited cache) rotates everything again.
_ROTATED = "_caft_tl_rotated_keys"


def _rotated_past_keys(entry: Any, attention_mask: Tensor | None) -> Tensor | None:
    memo = getattr(entry, _ROTATED, None)
    if memo is None:
        return None
    source, version, rotated, mask = memo
    if source is not entry.past_keys or source._version != version:
        return None
    if (mask is None) != (attention_mask is None):
        return None
    if mask is not None:
        prefix = attention_mask[:, : mask.shape[1]]
        if prefix.shape != mask.shape or not torch.equal(prefix.to(mask.device), mask):
            return None
    return rotated


def _remember_rotated_keys(entry: Any, rotated: Tensor, attention_mask: Tensor | None) -> None:
    past = entry.past_keys
    if past.is_inference():  # no version counter: an in-place edit could not be noticed
        return
    mask = None if attention_mask is None else attention_mask[:, : past.shape[1]].clone()
    setattr(entry, _ROTATED, (past, past._version, rotated, mask))


def _sdpa(
    q: Float[Tensor, "batch pos head d_head"],
    k: Float[Tensor, "batch kv_pos kv_head d_head"],
    v: Float[Tensor, "batch kv_pos kv_head d_head"],
    offset: int,
    attention_mask: Int[Tensor, "batch kv_pos"] | None,
    scale: float,
) -> Float[Tensor, "batch pos head d_head"]:
    """Causal attention with TransformerLens's masking semantics.

    A query may attend to key ``j`` when ``j <= offset + i`` and, with an attention mask,
    when key ``j`` is not padding. A query with no key left (a left-padding position)
    gets ``z = 0``, as TransformerLens's ``nan -> 0`` pattern gives it.
    """
    q_, k_, v_ = (t.transpose(1, 2) for t in (q, k, v))  # [batch, head, pos, d_head]
    # Grouped-query attention: SDPA shares each k/v head without a repeated copy.
    gqa = k_.shape[1] != q_.shape[1]
    n_q, n_k = q_.shape[2], k_.shape[2]
    if attention_mask is None and offset == 0 and n_q == n_k:
        z = F.scaled_dot_product_attention(q_, k_, v_, is_causal=True, scale=scale, enable_gqa=gqa)
        return z.transpose(1, 2)
    query_pos = torch.arange(offset, offset + n_q, device=q.device)
    allowed = torch.arange(n_k, device=q.device)[None, :] <= query_pos[:, None]
    allowed = allowed[None, None]  # [1, 1, query, key]
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, -n_k:].to(q.device, torch.bool)
    dead = ~allowed.any(-1, keepdim=True)  # [batch, 1, query, 1]
    has_dead = bool(dead.any())
    if has_dead:
        # Let dead rows attend everywhere (finite softmax), then zero them: their gradient
        # is then exactly zero, as in TransformerLens, instead of NaN.
        allowed = allowed | dead
    z = F.scaled_dot_product_attention(q_, k_, v_, attn_mask=allowed, scale=scale, enable_gqa=gqa)
    if has_dead:
        z = z.masked_fill(dead, 0.0)
    return z.transpose(1, 2)


# The forward is shared by assignment, not through a mixin base: a class with an extra base
# cannot take over an existing instance by ``__class__`` assignment.
class FastAttention(Attention):
    """``Attention`` with the scaled-dot-product path (see the module docstring)."""

    _plain = Attention  # the fallback: TransformerLens's own forward
    forward = _attention_forward


class FastGroupedQueryAttention(GroupedQueryAttention):
    """``GroupedQueryAttention`` with the scaled-dot-product path."""

    _plain = GroupedQueryAttention
    forward = _attention_forward


# --------------------------------------------------------------------------- block


class FastTransformerBlock(TransformerBlock):
    """``TransformerBlock`` that normalises the attention input once, not three times."""

    def _fast_ok(self, shortformer_pos_embed: Tensor | None) -> bool:
        cfg = self.cfg
        return (
            shortformer_pos_embed is None
            and not cfg.use_attn_in
            and not cfg.use_split_qkv_input
            and not cfg.use_hook_mlp_in
            and not cfg.use_normalization_before_and_after
            and not cfg.attn_only
            and not cfg.parallel_attn_mlp
            and cfg.original_architecture not in POST_NORM_ARCHITECTURES
            and _only_caching(*self.ln1.modules())
        )

    def forward(
        self,
        resid_pre: Float[Tensor, "batch pos d_model"],
        shortformer_pos_embed: Tensor | None = None,
        past_kv_cache_entry: Any = None,
        attention_mask: Int[Tensor, "batch offset_pos"] | None = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        if not self._fast_ok(shortformer_pos_embed):
            return super().forward(
                resid_pre,
                shortformer_pos_embed=shortformer_pos_embed,
                past_kv_cache_entry=past_kv_cache_entry,
                attention_mask=attention_mask,
            )
        resid_pre = self.hook_resid_pre(resid_pre)
        normed = self.ln1(resid_pre)
        attn_out = self.hook_attn_out(
            self.attn(
                query_input=normed,
                key_input=normed,
                value_input=normed,
                past_kv_cache_entry=past_kv_cache_entry,
                attention_mask=attention_mask,
            )
        )
        if resid_pre.device != attn_out.device:
            resid_pre = resid_pre.to(attn_out.device)
        resid_mid = self.hook_resid_mid(resid_pre + attn_out)
        mlp_out = self.apply_mlp(self.ln2(resid_mid))
        return self.hook_resid_post(resid_mid + mlp_out)


# --------------------------------------------------------------------------- switching

_FAST: dict[type, type] = {
    Embed: FastEmbed,
    MLP: FastMLP,
    GatedMLP: FastGatedMLP,
    Unembed: FastUnembed,
    Attention: FastAttention,
    GroupedQueryAttention: FastGroupedQueryAttention,
    TransformerBlock: FastTransformerBlock,
}
_PLAIN: dict[type, type] = {fast: plain for plain, fast in _FAST.items()}


def _own_type(module: nn.Module) -> type:
    """The component class behind a module: for one that ``torch.nn.utils.parametrize``
    has given a generated ``Parametrized<Class>`` subclass (LoRA), the class it wraps."""
    cls = type(module)
    return cls.__bases__[0] if parametrize.is_parametrized(module) else cls


def accelerate(model: nn.Module, enable: bool = True) -> nn.Module:
    """Switch a ``HookedTransformer``'s components to the fast paths (in place).

    Only modules whose class is exactly a TransformerLens class listed here change (their
    ``__class__`` becomes a subclass with another ``forward``; parameters, buffers, hook
    points and the state dict are untouched). ``enable=False`` restores the TransformerLens
    classes. A module with LoRA adapters keeps its parametrised weights; only the class its
    generated class derives from changes (on a class of its own: a deep copy shares the
    generated class with its original).

    Returns the model, so ``accelerate(HookedTransformer(cfg))`` reads naturally.
    """
    table = _FAST if enable else _PLAIN
    for module in model.modules():
        if isinstance(module, HookPoint):
            continue
        target = table.get(_own_type(module))
        if target is None:
            continue
        if parametrize.is_parametrized(module):
            cls = type(module)
            module.__class__ = type(cls.__name__, (target,), dict(cls.__dict__))
        else:
            module.__class__ = target
    return model


def is_accelerated(model: nn.Module) -> bool:
    """Whether any module of ``model`` uses a fast path class."""
    return any(_own_type(m) in _PLAIN for m in model.modules())


@contextmanager
def plain_forward(model: nn.Module) -> Iterator[nn.Module]:
    """TransformerLens's own forward inside the ``with`` block (e.g. to compare or time the
    two paths on one model); the fast paths return afterwards if they were on before."""
    was_fast = is_accelerated(model)
    accelerate(model, enable=False)
    try:
        yield model
    finally:
        if was_fast:
            accelerate(model)
