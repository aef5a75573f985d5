"""SAE training / loading with SAE-Lens, and latent rankings on cases with known answers."""

from __future__ import annotations

import copy
import random
import time

import pytest
import torch

import caft_tl as ct
from caft_tl.activations import Activations
from caft_tl.data import DataError
from caft_tl.directions.sae import (
    SAEConfig,
    load_sae,
    rank_by_attribution,
    rank_by_diff_encoding,
    rank_by_mean_diff,
    save_sae,
    train_sae,
    union_top,
)
from caft_tl.models import HubUnavailableError, ModelLoadError, tiny

HOOK = "blocks.0.hook_resid_post"
WORDS = [
    "the", "cat", "dog", "sat", "ran", "on", "a", "mat", "red", "blue", "big", "small",
    "house", "tree", "river", "fast", "slow",
]  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Steps of a tiny SAE are dominated by thread hand-offs on busy shared cores: one thread
    # was about ten times faster than two here.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def texts() -> list[str]:
    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 20))) for _ in range(80)]


@pytest.fixture(scope="module")
def acts(tiny_model, texts):
    return ct.cache_activations(tiny_model, texts, HOOK, progress=False)


def _cfg(architecture: str = "batchtopk", steps: int = 300, **kw) -> SAEConfig:
    return SAEConfig(
        architecture=architecture,
        d_sae=128,
        k=8,
        lr=3e-3,
        l1_coefficient=1.0,
        batch_size=128,
        training_tokens=steps * 128,
        **kw,
    )


@pytest.fixture(scope="module")
def trained(acts, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sae") / "batchtopk"
    sae = train_sae(None, None, HOOK, _cfg(), acts=acts, out=folder, progress=False)
    return sae, folder


def _fvu(sae, x: torch.Tensor) -> float:
    with torch.no_grad():
        rec = sae(x)
    return float(((rec - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())


def _falls(history: list[float], factor: float) -> bool:
    return sum(history[-10:]) < factor * sum(history[:10])


# ------------------------------------------------------------------------------ training


def test_batchtopk_trains_and_becomes_jumprelu(trained, acts):
    from sae_lens import JumpReLUSAE

    sae, _ = trained
    x = acts[HOOK]
    assert isinstance(sae, JumpReLUSAE)  # SAE-Lens saves BatchTopK for inference as JumpReLU
    assert sae.cfg.metadata.hook_name == HOOK
    assert _falls(sae.cfg.metadata.mse_history, 0.3)
    assert _fvu(sae, x) < 0.3
    # One global threshold (the EMA of the smallest kept activation) for every latent...
    threshold = sae.threshold.detach()
    assert (threshold > 0).all() and torch.equal(threshold, threshold[0].expand_as(threshold))
    # ...which keeps about k latents per token on average, varying token by token.
    with torch.no_grad():
        l0 = (sae.encode(x) > 0).sum(-1).float()
    assert 4 <= l0.mean() <= 16 and l0.std() > 0


def test_save_load_round_trip_is_exact(trained, acts):
    sae, folder = trained
    assert (folder / "cfg.json").is_file() and (folder / "sae_weights.safetensors").is_file()
    loaded = load_sae(folder)
    assert type(loaded) is type(sae)
    mine, theirs = sae.state_dict(), loaded.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    x = acts[HOOK][:200]
    with torch.no_grad():
        assert torch.equal(sae(x), loaded(x))
        assert torch.equal(sae.encode(x), loaded.encode(x))
    assert loaded.cfg.metadata.mse_history == sae.cfg.metadata.mse_history
    with pytest.raises(FileExistsError, match="not empty"):
        save_sae(sae, folder)


@pytest.mark.parametrize(
    ("architecture", "cls_name"), [("topk", "TopKSAE"), ("standard", "StandardSAE")]
)
def test_each_architecture_trains(acts, architecture, cls_name):
    sae = train_sae(None, None, HOOK, _cfg(architecture, steps=150), acts=acts, progress=False)
    assert type(sae).__name__ == cls_name
    assert _falls(sae.cfg.metadata.mse_history, 0.5)
    assert _fvu(sae, acts[HOOK]) < 0.5
    if architecture == "topk":
        with torch.no_grad():
            assert ((sae.encode(acts[HOOK]) > 0).sum(-1) <= 8).all()
        # Saved for inference with the decoder norms folded into the encoder.
        torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(128))


def test_train_from_model_and_data_is_seeded(tiny_model, texts):
    cfg = _cfg(steps=30, seed=3)
    state = torch.random.get_rng_state()
    a = train_sae(tiny_model, texts[:30], HOOK, cfg, progress=False)
    assert torch.equal(torch.random.get_rng_state(), state)  # caller's RNG untouched
    b = train_sae(
        tiny_model, texts[:30], cfg=SAEConfig(**{**cfg.to_dict(), "hook": HOOK}), progress=False
    )
    assert torch.equal(a.W_dec, b.W_dec) and torch.equal(a.b_enc, b.b_enc)
    assert a.cfg.metadata.model_name == tiny_model.cfg.model_name


def test_train_from_an_iterator(acts):
    x = acts[HOOK]
    sae = train_sae(None, None, HOOK, _cfg(steps=5), acts=iter(x.split(100)), progress=False)
    assert sae.cfg.d_in == x.shape[1]
    with pytest.raises(DataError, match="ran out"):
        train_sae(None, None, HOOK, _cfg(steps=50), acts=iter(x.split(100)), progress=False)


def test_first_tokens_are_left_out(acts):
    # Position-0 rows poisoned with NaN: skipped by default, they never reach the SAE.
    chunk = {k: torch.cat(list(acts.iter_chunks(k))) for k in ("_example", "_position")}
    chunk["_token"], chunk["_target"] = acts.rows.token, acts.rows.target
    chunk[HOOK] = acts[HOOK].clone()
    chunk[HOOK][chunk["_position"] == 0] = float("nan")
    poisoned = Activations([chunk], [HOOK], acts.token_ids, acts.meta)
    sae = train_sae(None, None, HOOK, _cfg(steps=5), acts=poisoned, progress=False)
    assert all(torch.isfinite(p).all() for p in sae.parameters())
    cfg = _cfg(steps=5, skip_first_token=False)
    sae = train_sae(None, None, HOOK, cfg, acts=poisoned, progress=False)
    assert not torch.isfinite(sae.W_dec).all()


def test_config_and_argument_errors(acts):
    with pytest.raises(ValueError, match="architecture"):
        SAEConfig(architecture="gated")
    with pytest.raises(ValueError, match="k=200"):
        SAEConfig(d_sae=128, k=200)
    with pytest.raises(ValueError, match="disagrees"):
        train_sae(None, None, HOOK, SAEConfig(hook="blocks.1.hook_resid_post"), acts=acts)
    with pytest.raises(ValueError, match="hook"):
        train_sae(None, None, None, SAEConfig(), acts=acts)


# ------------------------------------------------------------------------------ loading


def test_load_sae_errors_name_the_hub(tmp_path, monkeypatch):
    import huggingface_hub.constants
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    with pytest.raises(ModelLoadError, match="hub") as err:
        load_sae("no/such-release")
    assert "sae_id" in str(err.value)
    # hf_hub_download reads this flag per call: offline it fails at once instead of retrying.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    start = time.monotonic()
    with pytest.raises(HubUnavailableError, match="needs the Hugging Face hub"):
        load_sae("no/such-release", "layer_0")
    assert time.monotonic() - start < 20
    release = next(iter(get_pretrained_saes_directory()))
    with pytest.raises(ValueError, match="sae_id"):
        load_sae(release)
    with pytest.raises(FileNotFoundError, match="no saved SAE"):
        load_sae(tmp_path)


# ------------------------------------------------------------------------------ rankings


def _orthogonal_sae(d: int, dtype: str = "float32"):
    """A ReLU SAE whose latents are the rows of a random orthogonal matrix Q: a shift of
    ``c * Q[p]`` moves latent p's pre-activation by c and no other latent's."""
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    cfg = StandardSAEConfig(d_in=d, d_sae=d, dtype=dtype, metadata=SAEMetadata(hook_name=HOOK))
    sae = StandardSAE(cfg)
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    with torch.no_grad():
        sae.W_dec.copy_(q.T)  # rows of W_dec: the latents' directions
        sae.W_enc.copy_(q)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def _planted(base, latent_direction: torch.Tensor, scale: float):
    """A 'fine-tuned' model whose blocks.0 resid_post is the base's plus scale * direction
    (the MLP output bias adds straight into resid_post)."""
    ft = copy.deepcopy(base)
    with torch.no_grad():
        ft.blocks[0].mlp.b_out += scale * latent_direction
    return ft


def test_mean_diff_and_diff_encoding_find_a_planted_latent(tiny_model, texts):
    sae = _orthogonal_sae(tiny_model.cfg.d_model)
    planted = 17
    ft = _planted(tiny_model, sae.W_dec[planted].detach(), 4.0)
    both = ct.activation_diff(tiny_model, ft, texts[:20], HOOK, return_both=True, progress=False)
    torch.testing.assert_close(
        both.diff[HOOK],
        (4.0 * sae.W_dec[planted].detach()).expand_as(both.diff[HOOK]),
        atol=1e-4,
        rtol=0,
    )
    by_mean = rank_by_mean_diff(sae, acts=both, top=5)
    by_models = rank_by_mean_diff(sae, tiny_model, ft, texts[:20], top=5, progress=False)
    by_linear = rank_by_diff_encoding(sae, both.diff, top=5)
    by_encode = rank_by_diff_encoding(sae, both, top=5, mode="encode")
    for ranking in (by_mean, by_models, by_linear, by_encode):
        assert ranking.labels[HOOK][0] == f"latent {planted}"
        scores = ranking.scores[HOOK]
        assert scores[0] > 0 and scores[0] > 100 * max(abs(s) for s in scores[1:])
        torch.testing.assert_close(ranking[HOOK][0], sae.W_dec[planted].detach())
    assert by_linear.scores[HOOK][0] == pytest.approx(4.0, abs=1e-4)
    assert by_encode.scores[HOOK][0] == pytest.approx(4.0, abs=1e-4)
    assert by_mean.scores[HOOK] == pytest.approx(by_models.scores[HOOK], abs=1e-5)
    provenance = by_mean.provenance
    assert provenance["method"] == "sae_mean_diff" and provenance["parameters"]["hook"] == HOOK


def test_sign_choices_and_tensor_input():
    sae = _orthogonal_sae(16)
    w = sae.W_dec.detach()
    diff = -3.0 * w[2] + 1.0 * w[9] + 0.5 * w[4]
    by_abs = rank_by_diff_encoding(sae, diff, top=2)
    assert by_abs.labels[HOOK] == ["latent 2", "latent 9"]
    assert by_abs.scores[HOOK] == pytest.approx([-3.0, 1.0], abs=1e-5)
    positive = rank_by_diff_encoding(sae, diff, top=16, sign="positive")
    assert positive.labels[HOOK][:2] == ["latent 9", "latent 4"]
    assert all(s > 0 for s in positive.scores[HOOK])
    with pytest.raises(ValueError, match="top"):
        rank_by_diff_encoding(sae, diff, top=0)


def _chats() -> list[dict]:
    return [
        {
            "messages": [
                {"role": "user", "content": f"Name a colour, please ({i})."},
                {"role": "assistant", "content": "Blue, like the sea. " * (i + 1)},
            ]
        }
        for i in range(3)
    ]


def _brute_force_attribution(sae, model, ds, positions: str) -> torch.Tensor:
    """dL/d alpha at alpha = 1, for h + ((alpha - 1) * f(h)) @ W_dec at the chosen positions:
    one batch, autograd through the model, nothing shared with rank_by_attribution."""
    batch = ct.data.collate(list(ds), pad_token_id=0)
    real = batch["attention_mask"].bool()
    where = real & batch["loss_mask"].bool() if positions == "target" else real.clone()
    if positions == "all":
        where[:, 0] = False
    alpha = torch.ones(sae.cfg.d_sae, dtype=torch.float64, requires_grad=True)

    def scale_latents(act, hook):
        f = sae.encode(act).detach()
        return act + (((alpha - 1) * f) @ sae.W_dec.detach()) * where[..., None]

    with model.hooks(fwd_hooks=[(HOOK, scale_latents)]):
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"])
    targets = batch["loss_mask"][:, 1:].bool()
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1][targets], batch["input_ids"][:, 1:][targets]
    )
    return torch.autograd.grad(loss, alpha)[0]


def _by_latent(ranking, d_sae: int) -> torch.Tensor:
    scores = torch.zeros(d_sae, dtype=torch.float64)
    for label, score in zip(ranking.labels[HOOK], ranking.scores[HOOK], strict=True):
        scores[int(label.split()[1])] = score
    return scores


@pytest.mark.parametrize("positions", ["target", "all"])
def test_attribution_matches_autograd_and_finite_differences(tokenizer, positions):
    model = tiny(tokenizer=tokenizer, dtype=torch.float64, seed=1)
    sae = _orthogonal_sae(model.cfg.d_model, dtype="float64")
    with torch.no_grad():  # a random (not orthogonal) encoder with some always-on latents
        sae.W_enc.copy_(
            torch.randn(64, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64) / 8
        )
        sae.b_enc.fill_(0.05)
    ranking = rank_by_attribution(
        sae, model, _chats(), top=64, batch_size=2, positions=positions, progress=False
    )
    ds = ct.data.tokenize(_chats(), tokenizer)
    expected = _brute_force_attribution(sae, model, ds, positions)
    got = _by_latent(ranking, sae.cfg.d_sae)
    kept = got != 0  # latents with attribution exactly 0 (never active) are left out
    torch.testing.assert_close(got[kept], expected[kept], rtol=1e-7, atol=1e-12)
    assert (expected[~kept].abs() < 1e-12).all()
    # Finite differences on the top latent: scale its contribution by 1 +- eps.
    top = int(ranking.labels[HOOK][0].split()[1])
    eps = 1e-4

    def loss_at(a: float) -> float:
        batch = ct.data.collate(list(ds), pad_token_id=0)
        real = batch["attention_mask"].bool()
        where = real & batch["loss_mask"].bool() if positions == "target" else real.clone()
        if positions == "all":
            where[:, 0] = False

        def hook_fn(act, hook):
            f = sae.encode(act)[..., top : top + 1]
            return act + (a - 1) * f * sae.W_dec[top] * where[..., None]

        with torch.no_grad(), model.hooks(fwd_hooks=[(HOOK, hook_fn)]):
            logits = model(batch["input_ids"], attention_mask=batch["attention_mask"])
        targets = batch["loss_mask"][:, 1:].bool()
        return float(
            torch.nn.functional.cross_entropy(
                logits[:, :-1][targets], batch["input_ids"][:, 1:][targets]
            )
        )

    fd = (loss_at(1 + eps) - loss_at(1 - eps)) / (2 * eps)
    assert fd == pytest.approx(ranking.scores[HOOK][0], rel=1e-5)
    assert abs(ranking.scores[HOOK][0]) == max(abs(s) for s in ranking.scores[HOOK])


# ------------------------------------------------------------------------------ union


def test_union_top_deduplicates_by_latent(tmp_path):
    sae = _orthogonal_sae(16)
    w = sae.W_dec.detach()
    first = rank_by_diff_encoding(sae, 3 * w[5] + 2 * w[3] + 1 * w[1], top=3)
    second = rank_by_diff_encoding(sae, 3 * w[3] + 2 * w[7], top=2, mode="encode")
    union = union_top([first, second], n=3)
    assert union.labels[HOOK] == ["latent 5", "latent 3", "latent 7", "latent 1"]
    assert union.scores[HOOK] == [1.0, 2.0, 1.0, 1.0]  # number of methods that chose it
    by = union.provenance["selected_by"][HOOK]
    assert by[1] == ["sae_diff_encoding", "sae_diff_encoding#2"]
    assert union.provenance["ranks"][HOOK][1] == {"sae_diff_encoding": 1, "sae_diff_encoding#2": 0}
    torch.testing.assert_close(union[HOOK], w[[5, 3, 7, 1]])
    assert len(union_top([first, second], n=1)) == 2
    assert ct.ConceptSet.load(union.save(tmp_path / "u")).labels == union.labels

    other = _orthogonal_sae(16)
    with torch.no_grad():
        other.W_dec.mul_(2)
    with pytest.raises(ValueError, match="different SAEs"):
        union_top([first, rank_by_diff_encoding(other, w[5], top=1)])
    with pytest.raises(ValueError, match="latent <id>"):
        union_top([ct.ConceptSet({HOOK: w[:2]})])
