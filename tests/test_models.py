from __future__ import annotations

import json

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
)

import caft_tl as ct
from caft_tl import models

TINY_HF_CONFIGS = {
    "llama": lambda: LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rope_theta=50000.0,
        tie_word_embeddings=True,
    ),
    "qwen2": lambda: Qwen2Config(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    ),
    "mistral": lambda: MistralConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        sliding_window=None,
        head_dim=16,
    ),
    "gemma2": lambda: Gemma2Config(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=128,
        query_pre_attn_scalar=16,
        sliding_window=8,
    ),
    "gpt2": lambda: GPT2Config(vocab_size=300, n_embd=64, n_layer=2, n_head=4, n_positions=128),
}


def _save_random_hf(kind: str, folder) -> torch.nn.Module:
    torch.manual_seed(0)
    config = TINY_HF_CONFIGS[kind]()
    hf = AutoModelForCausalLM.from_config(config).eval()
    # Random init leaves norms at 1 (or 0 for Gemma); perturb them so a wrong norm
    # convention shows up in the logits.
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name or "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    hf.save_pretrained(folder)
    return hf


@pytest.mark.parametrize("kind", sorted(TINY_HF_CONFIGS))
def test_hf_folder_logits_match(kind, tmp_path):
    hf = _save_random_hf(kind, tmp_path)
    with pytest.warns(UserWarning, match="no tokenizer"):
        model = ct.load_model(tmp_path, device="cpu")
    # Longer than Gemma's sliding window (8) so local attention is exercised.
    tokens = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(tokens).logits
        got = model(tokens)
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), (got - expected).abs().max()


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    from transformers import AutoConfig

    cfg = AutoConfig.for_model("bert")
    with pytest.raises(models.ModelLoadError, match="not supported"):
        models.tl_config_from_hf(cfg)


def test_folder_that_is_not_a_model(tmp_path):
    with pytest.raises(models.ModelLoadError, match="neither a caft-tl checkpoint"):
        ct.load_model(tmp_path)


def test_unknown_name():
    with pytest.raises(models.ModelLoadError, match="not a local folder"):
        ct.load_model("no-such-model-anywhere")


@pytest.mark.hub
def test_official_name_through_hub_or_clear_error():
    """With a hub, an official name loads; without one, the error says so (then skip)."""
    try:
        model = ct.load_model("gpt2", device="cpu")
    except models.HubUnavailableError as exc:
        assert "needs the Hugging Face hub" in str(exc) and "load_model()" in str(exc)
        pytest.skip(f"no hub reachable (clear error checked): {str(exc)[:80]}")
    assert model.cfg.n_layers == 12


def test_checkpoint_round_trip_is_exact(tiny_model, tmp_path):
    model = models.tiny(seed=3, tokenizer=tiny_model.tokenizer)
    with torch.no_grad():
        model.blocks[0].attn.W_Q.add_(0.5)
    ct.save_model(model, tmp_path / "ckpt", metadata={"note": "x"})
    loaded = ct.load_model(tmp_path / "ckpt", device="cpu")
    for (name, a), (_, b) in zip(model.named_parameters(), loaded.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    assert loaded.cfg.to_dict().keys() == model.cfg.to_dict().keys()
    text = "<|im_start|>user\nhello<|im_end|>"
    assert loaded.tokenizer.encode(text) == model.tokenizer.encode(text)
    tokens = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(model(tokens), loaded(tokens))
    marker = json.loads((tmp_path / "ckpt" / "caft_tl.json").read_text())
    assert marker["metadata"] == {"note": "x"}


def test_save_overwrites_atomically(tiny_model, tmp_path):
    ct.save_model(tiny_model, tmp_path / "ckpt")
    ct.save_model(tiny_model, tmp_path / "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_failed_save_leaves_old_checkpoint(tiny_model, tmp_path, monkeypatch):
    ct.save_model(tiny_model, tmp_path / "ckpt")
    before = (tmp_path / "ckpt" / "model.safetensors").read_bytes()

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(models, "write_tensors", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        ct.save_model(tiny_model, tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_corrupt_checkpoint_is_a_clear_error(tiny_model, tmp_path):
    ct.save_model(tiny_model, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(models.ModelLoadError, match="not a readable caft-tl checkpoint"):
        ct.load_model(tmp_path / "ckpt")


def test_dtype_option(tiny_model, tmp_path):
    ct.save_model(tiny_model, tmp_path / "ckpt")
    model = ct.load_model(tmp_path / "ckpt", device="cpu", dtype="bfloat16")
    assert model.W_E.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="Unknown dtype"):
        ct.load_model(tmp_path / "ckpt", dtype="float77")


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.delenv("CAFT_TL_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.cache_dir() == tmp_path / "xdg" / "caft-tl"
    monkeypatch.setenv("CAFT_TL_CACHE", str(tmp_path / "mine"))
    assert models.cache_dir() == tmp_path / "mine"


def test_processes_starting_on_an_empty_cache_convert_the_embedded_model_once(
    monkeypatch, tmp_path
):
    # torchrun ranks or parallel test workers on a fresh machine: the first converts, the
    # others wait for it (before the lock each converted and swapped the folder under the
    # others' feet).
    import threading
    import time

    monkeypatch.setenv("CAFT_TL_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "_embedded_key", lambda gguf: "key")
    conversions = []

    def slow_convert(folder):
        conversions.append(folder)
        time.sleep(0.3)
        folder.mkdir(parents=True)
        (folder / models.CHECKPOINT_MARKER).write_text("{}")

    monkeypatch.setattr(models, "_convert_embedded", slow_convert)
    monkeypatch.setattr(models, "_load_checkpoint", lambda folder, device, dtype: folder)
    loaded = []
    threads = [
        threading.Thread(target=lambda: loaded.append(models._load_embedded("cpu", torch.float32)))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(conversions) == 1
    assert loaded == [models.embedded_cache_path()] * 3


def test_exclusive_lock_makes_the_second_holder_wait(tmp_path):
    import threading
    import time

    from caft_tl._io import exclusive_lock

    order, held = [], threading.Event()

    def first():
        with exclusive_lock(tmp_path / "thing"):
            held.set()
            time.sleep(0.2)
            order.append("first released")

    t = threading.Thread(target=first)
    t.start()
    held.wait()
    with exclusive_lock(tmp_path / "thing"):
        order.append("second acquired")
    t.join()
    assert order == ["first released", "second acquired"]
    assert not (tmp_path / "thing").exists()  # the lock file sits beside, hidden


def test_tiny_model_uses_real_tokenizer(tiny_model, tokenizer):
    assert tiny_model.cfg.d_vocab == len(tokenizer)
    tokens = torch.tensor([tokenizer.encode("Hello world", add_special_tokens=False)])
    assert tiny_model(tokens).shape == (1, tokens.shape[1], len(tokenizer))
    assert "blocks.1.hook_resid_post" in tiny_model.hook_dict


def test_model_info(tiny_model):
    info = models.model_info(tiny_model)
    assert info["n_layers"] == 2 and info["d_model"] == 64
    assert "hook_resid_post" in info["hooks_per_block"]


# ----------------------------------------------------------------- embedded model


@pytest.mark.slow
def test_embedded_matches_hf_and_answers(embedded_model):
    gguf = models.embedded_gguf_path()
    hf = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    ).eval()
    tok = embedded_model.tokenizer
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tok.encode(prompt, add_special_tokens=False)])
    with torch.no_grad():
        diff = (embedded_model(ids) - hf(ids).logits).abs().max().item()
    assert diff < 1e-3
    out = embedded_model.generate(ids, max_new_tokens=16, do_sample=False, verbose=False)
    answer = tok.decode(out[0, ids.shape[1] :])
    assert "Paris" in answer


@pytest.mark.slow
def test_embedded_second_load_uses_cache(embedded_model, monkeypatch):
    def no_conversion(*args, **kwargs):
        raise AssertionError("the GGUF was de-quantised again")

    monkeypatch.setattr(models, "_convert_embedded", no_conversion)
    again = ct.load_model(device="cpu")
    assert torch.equal(again.W_E, embedded_model.W_E)
    assert embedded_model.cfg.rotary_base == 100000.0
    assert embedded_model.cfg.default_prepend_bos is False


@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("kind", sorted(TINY_HF_CONFIGS))
def test_hf_folder_in_bf16_is_the_float32_load_rounded(kind, stored, tmp_path, monkeypatch):
    # A folder stored in bf16 loads in bf16 (no float32 copy of the HF model); one stored
    # wider goes through float32. The weights are the same either way.
    hf = _save_random_hf(kind, tmp_path)
    hf.to(stored).save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="no tokenizer"):
        fp32 = ct.load_model(tmp_path, device="cpu")
    loaded_as = []
    real = AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        loaded_as.append(kwargs["dtype"])
        return real(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    with pytest.warns(UserWarning, match="no tokenizer"):
        bf16 = ct.load_model(tmp_path, device="cpu", dtype="bfloat16")
    assert loaded_as == [torch.bfloat16 if stored == torch.bfloat16 else torch.float32]
    for (name, a), (_, b) in zip(fp32.named_parameters(), bf16.named_parameters(), strict=True):
        assert b.dtype == torch.bfloat16
        torch.testing.assert_close(b, a.to(torch.bfloat16), rtol=0, atol=0, msg=name)


def test_n_devices_needs_that_many_gpus():
    if torch.cuda.device_count() >= 2:
        pytest.skip("this machine has 2 GPUs")
    with pytest.raises(ValueError, match="n_devices=2 splits the model over that many CUDA"):
        ct.load_model(n_devices=2)
    with pytest.raises(ValueError, match="n_devices must be an integer >= 1"):
        ct.load_model(n_devices=0)


def test_split_across_devices_places_blocks_where_the_forward_expects_them(monkeypatch):
    from transformer_lens.utilities.multi_gpu import get_device_for_block_index

    from caft_tl.models import split_across_devices, tiny

    model = tiny(tokenizer=None, n_layers=5)
    placed: dict[int, torch.device] = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    # No GPU here: record where each module would go instead of moving it.
    monkeypatch.setattr(
        torch.nn.Module, "to", lambda self, device: placed.__setitem__(id(self), device) or self
    )
    split_across_devices(model, 2)
    where = {name: placed.get(id(m)) for name, m in model.named_children()}
    blocks = [placed[id(b)] for b in model.blocks]
    assert where["embed"] == torch.device("cuda", 0)
    assert blocks == [get_device_for_block_index(i, model.cfg) for i in range(5)]
    assert blocks == [torch.device("cuda", i) for i in (0, 0, 0, 1, 1)]
    assert where["ln_final"] == where["unembed"] == torch.device("cuda", 1)
    assert model.cfg.n_devices == 2
