from __future__ import annotations

import json

import pytest
import torch

import caft_tl as ct
from caft_tl.activations import Activations, check_hooks, stop_layer
from caft_tl.data import DataError

HOOK0 = "blocks.0.hook_resid_post"
HOOK1 = "blocks.1.hook_resid_post"


def _convs(n: int = 7) -> list[dict]:
    return [
        {
            "messages": [
                {"role": "user", "content": f"Tell me about item {i}."},
                {"role": "assistant", "content": "It is fine. " * (i % 3 + 1)},
            ]
        }
        for i in range(n)
    ]


def _reference(model, ids: list[int], hook: str) -> torch.Tensor:
    _, cache = model.run_with_cache(torch.tensor([ids]), names_filter=[hook])
    return cache[hook][0]


@pytest.mark.parametrize("positions", ["all", "assistant", "last"])
def test_batched_rows_match_unbatched_forward(tiny_model, positions):
    acts = ct.cache_activations(
        tiny_model, _convs(), [HOOK0, HOOK1], positions=positions, batch_size=3, progress=False
    )
    rows = acts.rows
    data = ct.data.tokenize(_convs(), tiny_model.tokenizer)
    expected_rows = {
        "all": sum(data["n_tokens"]),
        "assistant": sum(sum(m) for m in data["loss_mask"]),
        "last": len(data),
    }[positions]
    assert len(acts) == len(rows) == expected_rows
    for example in range(len(data)):
        ids = data[example]["input_ids"]
        sel = rows.example == example
        assert torch.equal(rows.token[sel], torch.tensor(ids)[rows.position[sel]])
        for hook in (HOOK0, HOOK1):
            ref = _reference(tiny_model, ids, hook)[rows.position[sel]]
            torch.testing.assert_close(acts[hook][sel], ref, atol=1e-5, rtol=1e-5)
    if positions == "last":
        assert rows.position.tolist() == [n - 1 for n in data["n_tokens"]]
    if positions == "assistant":
        masks = [torch.tensor(m) for m in data["loss_mask"]]
        for example, mask in enumerate(masks):
            sel = rows.example == example
            assert rows.position[sel].tolist() == mask.nonzero().flatten().tolist()
        assert (rows.target == 1).all()
    if positions == "all":
        flat_masks = torch.cat([torch.tensor(m) for m in data["loss_mask"]])
        assert torch.equal(rows.target, flat_masks)


def test_padding_never_leaks(tiny_model):
    """Rows are selected with the attention mask: pad id == <|im_end|> is a real token."""
    texts = ["short", "a much longer text with many more tokens in it than the first"]
    acts = ct.cache_activations(tiny_model, texts, HOOK0, batch_size=2, progress=False)
    lengths = ct.data.tokenize(texts, tiny_model.tokenizer)["n_tokens"]
    assert len(acts) == sum(lengths)
    assert (acts.rows.position[acts.rows.example == 0] < lengths[0]).all()


def test_head_hooks_are_flattened(tiny_model):
    acts = ct.cache_activations(tiny_model, ["hello there"], "blocks.0.attn.hook_z", progress=False)
    cfg = tiny_model.cfg
    assert acts["blocks.0.attn.hook_z"].shape[1] == cfg.n_heads * cfg.d_head


def test_streaming_to_disk_round_trip(tiny_model, tmp_path):
    # Same batch size on both sides: the fused attention path is not bitwise batch-invariant.
    in_memory = ct.cache_activations(tiny_model, _convs(), [HOOK0], batch_size=2, progress=False)
    on_disk = ct.cache_activations(
        tiny_model,
        _convs(),
        [HOOK0],
        out=tmp_path / "acts",
        shard_tokens=30,
        batch_size=2,
        progress=False,
    )
    assert on_disk.on_disk and len(on_disk.meta["shards"]) > 1
    reopened = Activations.load(tmp_path / "acts")
    assert torch.equal(reopened[HOOK0], in_memory[HOOK0])
    assert torch.equal(reopened.rows.example, in_memory.rows.example)
    assert reopened.token_ids == in_memory.token_ids
    chunks = list(reopened.iter_chunks(HOOK0))
    assert len(chunks) == len(on_disk.meta["shards"])
    ids, at = reopened.context(10, before=4, after=1)
    assert ids[at] == int(reopened.rows.token[10])
    # Saving in-memory activations gives the same folder format.
    in_memory.save(tmp_path / "saved")
    assert torch.equal(Activations.load(tmp_path / "saved")[HOOK0], in_memory[HOOK0])


def test_out_folder_must_be_new(tiny_model, tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "file").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        ct.cache_activations(tiny_model, ["hi"], HOOK0, out=tmp_path / "x", progress=False)
    assert (tmp_path / "x" / "file").read_text() == "keep me"


def test_interrupted_folder_is_not_a_result(tmp_path):
    (tmp_path / "shard_00000.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="no meta.json"):
        Activations.load(tmp_path)
    (tmp_path / "meta.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ValueError, match="not a caft-tl activations"):
        Activations.load(tmp_path)


def test_activation_diff(tiny_model):
    other = ct.models.tiny(seed=7, tokenizer=tiny_model.tokenizer)
    both = ct.activation_diff(
        tiny_model,
        other,
        _convs(),
        [HOOK1],
        positions="assistant",
        return_both=True,
        progress=False,
    )
    torch.testing.assert_close(both.diff[HOOK1], both.finetuned[HOOK1] - both.base[HOOK1])
    alone = ct.cache_activations(other, _convs(), [HOOK1], positions="assistant", progress=False)
    torch.testing.assert_close(both.finetuned[HOOK1], alone[HOOK1])
    same = ct.activation_diff(tiny_model, tiny_model, _convs(), HOOK1, progress=False)
    assert same[HOOK1].abs().max() == 0


def test_activation_diff_streams(tiny_model, tmp_path):
    other = ct.models.tiny(seed=7, tokenizer=tiny_model.tokenizer)
    result = ct.activation_diff(
        tiny_model, other, _convs(), [HOOK0], out=tmp_path / "d", return_both=True, progress=False
    )
    for kind in ("diff", "base", "finetuned"):
        assert torch.equal(
            Activations.load(tmp_path / "d" / kind)[HOOK0], getattr(result, kind)[HOOK0]
        )


def test_unknown_hook_suggests(tiny_model):
    with pytest.raises(ValueError, match="did you mean.*blocks.0.hook_resid_post"):
        ct.cache_activations(tiny_model, ["hi"], "blocks.0.hook_resid_pots", progress=False)
    with pytest.raises(ValueError, match="unknown hook 'blocks.9.hook_resid_post'"):
        check_hooks(tiny_model, ["blocks.9.hook_resid_post"])
    with pytest.raises(ValueError, match="not a per-token"):
        check_hooks(tiny_model, ["blocks.0.attn.hook_pattern"])
    with pytest.raises(ValueError, match="no hook names"):
        check_hooks(tiny_model, [])


def test_bad_data(tiny_model):
    with pytest.raises(DataError, match="no examples"):
        ct.cache_activations(tiny_model, [], HOOK0, progress=False)
    with pytest.raises(DataError, match="assistant"):
        ct.cache_activations(tiny_model, ["plain text"], HOOK0, positions="assistant")
    with pytest.raises(ValueError, match="positions must be"):
        ct.cache_activations(tiny_model, ["hi"], HOOK0, positions="first")


def test_model_tokenizer_mismatch(tiny_model):
    small = ct.models.tiny(tokenizer=None)  # 1000-token vocabulary
    data = ct.data.tokenize(["a sentence with ordinary words"], tiny_model.tokenizer)
    with pytest.raises(ValueError, match="outside .* vocabulary"):
        ct.cache_activations(small, data, HOOK0, progress=False)
    with pytest.raises(ValueError, match="vocabularies differ"):
        ct.activation_diff(tiny_model, small, data, HOOK0, progress=False)
    with pytest.raises(ValueError, match="no tokenizer"):
        ct.cache_activations(small, ["text"], HOOK0, progress=False)


def test_stop_layer():
    assert stop_layer([HOOK0, "blocks.5.attn.hook_z"]) == 6
    assert stop_layer(["hook_embed"]) == 0
    assert stop_layer([HOOK0, "ln_final.hook_normalized"]) is None


@pytest.mark.slow
def test_embedded_model_caching(embedded_model):
    acts = ct.cache_activations(
        embedded_model,
        _convs(3),
        ["blocks.15.hook_resid_post"],
        positions="assistant",
        progress=False,
    )
    assert acts["blocks.15.hook_resid_post"].shape[1] == 576
    ids = acts.token_ids[0]
    sel = acts.rows.example == 0
    ref = _reference(embedded_model, ids, "blocks.15.hook_resid_post")[acts.rows.position[sel]]
    torch.testing.assert_close(acts["blocks.15.hook_resid_post"][sel], ref, atol=1e-4, rtol=1e-4)


def test_shards_are_bounded_in_bytes(tiny_model, tmp_path):
    acts = ct.cache_activations(
        tiny_model,
        _convs(),
        [HOOK0, HOOK1],
        out=tmp_path / "a",
        batch_size=1,
        shard_tokens=10**9,
        shard_mb=0.02,
        progress=False,
    )
    sizes = [(tmp_path / "a" / name).stat().st_size for name in acts.meta["shards"]]
    assert len(sizes) > 1
    # A shard closes once it passes the budget, so it exceeds it by at most one batch.
    assert max(sizes) < 0.02 * 2**20 + 60 * (2 * 64 * 4 + 4 * 8) + 4096
