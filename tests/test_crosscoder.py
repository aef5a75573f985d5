"""Crosscoders and Latent Scaling: planted features are recovered, L1's complete shrinkage is
caught, the closed-form betas equal least squares, and runs checkpoint, resume and reload."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

import caft_tl as ct
from caft_tl.activations import Activations, activation_diff
from caft_tl.cli import main
from caft_tl.directions import (
    ConceptSet,
    Crosscoder,
    CrosscoderConfig,
    CrosscoderDiff,
    DiffThresholds,
    diff_crosscoder,
    latent_examples,
    load_crosscoder,
    paired_activations,
    save_crosscoder,
    train_crosscoder,
)
from caft_tl.directions import crosscoder as cc_module
from tests._planted import HOOK, planted_pairs

# Small and fast: 585 steps of 512 rows, 64 latents over 32 dimensions (about 2 s each).
PLANTED = dict(
    n_latents=64, training_tokens=300_000, batch_size=512, lr=1e-3, warmup_steps=20,
    dead_tokens=20_000, checkpoint_every=0,
)  # fmt: skip


def _unit(w: torch.Tensor) -> torch.Tensor:
    return w / w.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def _best_latents(cc: Crosscoder, directions: torch.Tensor, model: int):
    """For each planted direction, the latent whose ``model`` decoder row is closest."""
    best = (directions @ _unit(cc.W_dec.detach()[model]).T).max(1)
    return best.values, best.indices.tolist()


@pytest.fixture(scope="module")
def planted():
    return planted_pairs(seed=0)


@pytest.fixture(scope="module")
def batchtopk(planted):
    pairs, _ = planted
    # k=1 is the planted data's own sparsity (about 1.1 features per row): with a larger
    # budget BatchTopK can pair a fine-tune-only feature with a negative base-only one in one
    # latent, which reconstructs as well and hides both (seen with k=2 on 2 of 4 seeds).
    cfg = CrosscoderConfig(architecture="batchtopk", k=1, **PLANTED)
    cc = train_crosscoder(pairs, cfg, progress=False)
    return cc, diff_crosscoder(cc, pairs, progress=False)


@pytest.fixture(scope="module")
def l1(planted):
    pairs, _ = planted
    cfg = CrosscoderConfig(architecture="l1", l1_coefficient=3.0, **PLANTED)
    cc = train_crosscoder(pairs, cfg, progress=False)
    return cc, diff_crosscoder(cc, pairs, progress=False)


# ------------------------------------------------------------------------- the science


def test_batchtopk_recovers_planted_features(planted, batchtopk):
    _, roles = planted
    cc, diff = batchtopk
    table = diff.table.set_index("latent")
    expected = {"shared": "shared", "base_only": "base-only", "finetuned_only": "finetuned-only"}
    for role, cls in expected.items():
        cos, latents = _best_latents(cc, roles[role], 0 if role == "base_only" else 1)
        assert (cos > 0.9).all(), (role, cos)
        assert list(table.loc[latents, "class"]) == [cls] * len(latents), role
    # A feature in both models, three times weaker in the base one, is not fine-tune-only.
    _, weak = _best_latents(cc, roles["weak_shared"], 1)
    assert (table.loc[weak, "rel_norm"] < 0.9).all()
    # The genuinely new features pass Latent Scaling: the base model explains none of them.
    _, new = _best_latents(cc, roles["finetuned_only"], 1)
    assert table.loc[new, "genuine"].all()
    assert (table.loc[new, ["nu_eps", "nu_r"]].abs() < 0.05).all().all()
    assert max(diff.meta["fvu"].values()) < 0.1
    assert cc.threshold > 0  # an inference threshold was learnt


def test_latent_scaling_flags_l1_complete_shrinkage(planted, l1):
    _, roles = planted
    cc, diff = l1
    table = diff.table.set_index("latent")
    # L1 pays for every decoder's norm, so it drops the weak base half of a shared feature:
    _, weak = _best_latents(cc, roles["weak_shared"], 1)
    assert list(table.loc[weak, "class"]) == ["finetuned-only"] * 2
    # ... and Latent Scaling sees the base error still holds it (nu_eps about 0.3).
    assert table.loc[weak, "complete_shrinkage"].all()
    assert not table.loc[weak, "genuine"].any()
    assert (table.loc[weak, "nu_eps"] > 0.25).all()
    # Genuine latents are the planted fine-tune-only features and nothing else.
    _, new = _best_latents(cc, roles["finetuned_only"], 1)
    assert table.loc[new, "genuine"].all()
    genuine = table[table["genuine"]].index.tolist()
    cos = _unit(cc.W_dec.detach()[1, genuine]) @ roles["finetuned_only"].T
    assert (cos.abs().max(1).values > 0.9).all()
    summary = diff.summary().set_index("class")
    assert summary.loc["finetuned-only", "complete_shrinkage"] >= 2


def test_latent_scaling_betas_equal_least_squares():
    torch.manual_seed(0)
    d, n_latents, n = 8, 12, 400
    cc = Crosscoder(d, n_latents, "l1", hook=HOOK)
    with torch.no_grad():
        for p in cc.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
        cc.scale.copy_(torch.tensor([0.7, 1.3]))
    x = torch.randn(n, 2, d) * 2
    pairs = paired_activations(*_two_sides(x))
    diff = diff_crosscoder(cc, pairs, progress=False, batch_size=64).table
    xn = cc.normalise(x)
    f = cc.encode(xn, normalised=True).detach()
    recon = cc.decode(f).detach()
    owner = cc.W_dec.detach()[1]
    for j in range(n_latents):
        if f[:, j].sum() == 0:
            assert pd.isna(diff.loc[j, "nu_r"])
            continue
        design = (f[:, j, None] * owner[j]).reshape(-1, 1)  # beta * f(x) d, stacked over rows
        for m, name in enumerate(("base", "finetuned")):
            own = f[:, j, None] * cc.W_dec.detach()[m, j]
            targets = {"recon": recon[:, m], "error": xn[:, m] - recon[:, m] + own}
            for kind, y in targets.items():
                beta = torch.linalg.lstsq(design.double(), y.reshape(-1, 1).double()).solution
                assert diff.loc[j, f"beta_{kind}_{name}"] == pytest.approx(float(beta), rel=1e-6)
        for kind, nu in (("error", "nu_eps"), ("recon", "nu_r")):
            ratio = diff.loc[j, f"beta_{kind}_base"] / diff.loc[j, f"beta_{kind}_finetuned"]
            assert diff.loc[j, nu] == pytest.approx(ratio)  # signed, as the paper has it
    # The sign matters: some latents here have a negative fine-tuned beta.
    assert (diff["beta_error_finetuned"] < 0).any()


def _two_sides(x: torch.Tensor) -> tuple[Activations, Activations]:
    def acts(rows):
        n = len(rows)
        chunk = {
            HOOK: rows, "_example": torch.arange(n) // 10, "_position": torch.arange(n) % 10 + 1,
            "_token": torch.arange(n) % 7, "_target": torch.ones(n, dtype=torch.long),
        }  # fmt: skip
        meta = {"model": "m", "positions": "all", "n_examples": n // 10 + 1, "n_tokens": n}
        return Activations([chunk], [HOOK], [[0] * 11] * (n // 10 + 1), meta)

    return acts(x[:, 0]), acts(x[:, 1])


# ------------------------------------------------------------------------- the mechanics


def test_batchtopk_encoding_budget_and_threshold(batchtopk, planted):
    cc, _ = batchtopk
    x = next(planted[0].chunks())[:256]
    f = cc.encode(x, batch_topk=True)
    assert int((f > 0).sum()) <= cc.k * len(x)
    weighted = (cc.pre_activations(cc.normalise(x)) * cc.decoder_norms().sum(0)).detach()
    kept = weighted[f > 0]
    dropped = weighted[(f == 0) & (weighted > 0)]
    if len(dropped):
        assert kept.min() >= dropped.max()  # the largest weighted activations are the ones kept
    g = cc.encode(x)  # eval mode: per-row threshold, independent of the batch
    torch.testing.assert_close(g[:10], cc.encode(x[:10]))
    assert torch.equal(g > 0, weighted > cc.threshold)
    # The learnt threshold keeps about k latents per row, as the batch top-k did.
    assert float((g > 0).sum(-1).float().mean()) == pytest.approx(cc.k, rel=0.3)


def test_norm_outliers_are_left_out(planted):
    pairs, _ = planted
    x = next(pairs.chunks())
    spiked = x.clone()
    spiked[:50] *= 1000  # attention-sink-like rows: far above the rest
    both = paired_activations(*_two_sides(spiked))
    cfg = CrosscoderConfig(k=1, n_latents=32, training_tokens=4096, batch_size=512)
    cc = train_crosscoder(both, cfg, progress=False)
    assert int((~cc.kept_rows(spiked)).sum()) == 50
    diff = diff_crosscoder(cc, both, progress=False)
    assert (diff.meta["n_outliers"], diff.meta["n_rows"]) == (50, len(x) - 50)
    kept_all = train_crosscoder(both, CrosscoderConfig(**{**cfg.to_dict(), "outlier_factor": None}),
                                progress=False)  # fmt: skip
    assert bool(kept_all.kept_rows(spiked).all())


def test_dead_latents_get_the_auxiliary_loss(planted):
    pairs, _ = planted
    cfg = CrosscoderConfig(k=1, n_latents=64, training_tokens=20_480, batch_size=512,
                           dead_tokens=2048, log_every=5, checkpoint_every=0)  # fmt: skip
    cc = train_crosscoder(pairs, cfg, progress=False)
    assert any("aux" in record for record in cc.meta["log"])
    assert {"fvu_base", "fvu_finetuned", "l0", "dead"} <= set(cc.meta["log"][-1])


def test_killed_run_resumes_to_the_same_weights(planted, tmp_path, monkeypatch):
    pairs, _ = planted
    cfg = CrosscoderConfig(
        k=1, n_latents=32, training_tokens=512 * 12, batch_size=512, checkpoint_every=5,
        log_every=1, threshold_start_fraction=0.0,
    )  # fmt: skip
    whole = train_crosscoder(pairs, cfg, out=tmp_path / "whole", progress=False)

    real_step, calls = cc_module._step, []

    def dies_at_step_8(*args, **kwargs):
        calls.append(1)
        if len(calls) == 8:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(cc_module, "_step", dies_at_step_8)
    with pytest.raises(KeyboardInterrupt):
        train_crosscoder(pairs, cfg, out=tmp_path / "killed", progress=False)
    monkeypatch.setattr(cc_module, "_step", real_step)
    state = json.loads((tmp_path / "killed" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 5 and not (tmp_path / "killed" / "crosscoder").exists()
    with pytest.raises(FileExistsError, match="resume=True"):
        train_crosscoder(pairs, cfg, out=tmp_path / "killed", progress=False)
    resumed = train_crosscoder(pairs, cfg, out=tmp_path / "killed", resume=True, progress=False)
    for name, value in whole.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name
    assert resumed.meta["log"] == whole.meta["log"]
    changed = CrosscoderConfig(**{**cfg.to_dict(), "lr": 1e-3})
    with pytest.raises(ValueError, match="config differs"):
        train_crosscoder(pairs, changed, out=tmp_path / "killed", resume=True, progress=False)


def test_save_load_round_trip(batchtopk, planted, tmp_path):
    cc, diff = batchtopk
    save_crosscoder(cc, tmp_path / "cc")
    again = load_crosscoder(tmp_path / "cc")
    assert repr(again) == repr(cc)
    x = next(planted[0].chunks())[:64]
    assert torch.equal(again(x), cc(x))
    with pytest.raises(FileExistsError):
        save_crosscoder(cc, tmp_path / "cc")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "crosscoder.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        load_crosscoder(tmp_path / "bad")
    diff.save(tmp_path / "diff")
    back = CrosscoderDiff.load(tmp_path / "diff")
    pd.testing.assert_frame_equal(back.table, diff.table, check_dtype=False)
    assert back.meta["fvu"] == diff.meta["fvu"]


def test_diff_thresholds_figures_and_concepts(batchtopk, planted, tiny_model):
    cc, diff = batchtopk
    strict = diff.with_thresholds(DiffThresholds(finetuned_only=0.99))
    assert strict.table["genuine"].sum() <= diff.table["genuine"].sum()
    loose = diff.with_thresholds(DiffThresholds(max_nu_eps=10.0, max_nu_r=10.0))
    assert loose.table["genuine"].sum() == (loose.table["class"] == "finetuned-only").sum()
    for fig in (diff.norm_figure(), diff.nu_figure(), diff.kept_figure()):
        assert len(fig.data) >= 2
    concepts = diff.concepts(cc, top=2)
    assert isinstance(concepts, ConceptSet) and concepts.hooks == [HOOK]
    idx = [int(label.split()[1]) for label in concepts.labels[HOOK]]
    assert torch.equal(concepts[HOOK], cc.W_dec.detach()[1, idx])
    assert concepts.provenance["method"] == "crosscoder_latent_scaling"
    with pytest.raises(ValueError, match="no latent to select"):
        strict.with_thresholds(DiffThresholds(max_nu_eps=1e-9)).concepts(cc)
    with pytest.raises(ValueError, match="another crosscoder"):
        diff.concepts(Crosscoder(32, 8, hook=HOOK))


def test_bad_input_is_refused(planted, tmp_path):
    pairs, _ = planted
    base, ft = pairs.base, pairs.finetuned
    with pytest.raises(KeyError, match="not in the base"):
        paired_activations(base, ft, hook="blocks.9.hook_resid_post")
    short = Activations([{k: v[:10] for k, v in base._chunks[0].items()}], [HOOK],
                        base.token_ids, {**base.meta, "n_tokens": 10})  # fmt: skip
    with pytest.raises(ValueError, match="tokens"):
        paired_activations(short, ft)
    shuffled = {**ft._chunks[0], "_token": ft._chunks[0]["_token"].flip(0)}
    other = Activations([shuffled, *ft._chunks[1:]], [HOOK], ft.token_ids, ft.meta)
    with pytest.raises(ValueError, match="not of the same tokens"):
        paired_activations(base, other)
    with pytest.raises(TypeError):
        paired_activations(torch.zeros(3, 2, 4))
    with pytest.raises(FileNotFoundError, match="no paired activations"):
        paired_activations(tmp_path)
    with pytest.raises(ValueError, match="wide"):
        diff_crosscoder(Crosscoder(16, 8, hook=HOOK), pairs, progress=False)
    with pytest.raises(ValueError, match="k=40 is larger"):
        CrosscoderConfig(k=40, n_latents=8)
    with pytest.raises(ValueError, match="architecture"):
        CrosscoderConfig(architecture="topk")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs paired activations"):
        train_crosscoder(None, CrosscoderConfig())
    with pytest.raises(ValueError, match="shared"):
        DiffThresholds(shared=(0.05, 0.6))


# ------------------------------------------------------------------------- real models


@pytest.fixture(scope="module")
def tiny_pair(tokenizer):
    base = ct.models.tiny(tokenizer=tokenizer, seed=0)
    ft = ct.models.tiny(tokenizer=tokenizer, seed=0)
    with torch.no_grad():  # a "fine-tune": one block's MLP output weights moved
        ft.blocks[0].mlp.W_out.add_(0.05 * torch.randn_like(ft.blocks[0].mlp.W_out))
    texts = [f"The doctor number {i} said that she would call back soon." for i in range(40)]
    return base, ft, texts


def test_train_from_models_and_show_examples(tiny_pair, tmp_path):
    base, ft, texts = tiny_pair
    hook = "blocks.1.hook_resid_post"
    cfg = CrosscoderConfig(n_latents=64, k=4, training_tokens=4096, batch_size=256)
    cc = train_crosscoder(cfg=cfg, base=base, finetuned=ft, data=texts, hook=hook,
                          out=tmp_path / "run", progress=False)  # fmt: skip
    assert (tmp_path / "run" / "acts" / "base" / "meta.json").exists()
    assert load_crosscoder(tmp_path / "run").hook == hook
    diff = diff_crosscoder(cc, tmp_path / "run" / "acts", progress=False)
    cached = Activations.load(tmp_path / "run" / "acts" / "base")
    n_rows = diff.meta["n_rows"] + diff.meta["n_outliers"]
    assert n_rows == len(cached) - len(texts)  # first tokens left out
    live = diff.table[diff.table["n_active"] > 0]["latent"].tolist()[:3]
    examples = latent_examples(cc, tmp_path / "run" / "acts", live, base, k=2)
    assert set(examples["latent"]) == set(live)
    assert examples["context"].str.contains(r"\[\[").all()
    # A ConceptSet from the crosscoder works as a CAFT ablation on the model.
    concepts = diff.concepts(cc, latents=live)
    with ct.Ablation(concepts.orthonormalised(), mode="zero").applied(ft):
        ft(texts[0])
    both = activation_diff(base, ft, texts[:4], hook, return_both=True, progress=False)
    assert len(paired_activations(both)) == len(both.base)


def test_cli_train_and_diff(tiny_pair, tmp_path, capsys):
    base, ft, texts = tiny_pair
    b, f = ct.save_model(base, tmp_path / "base"), ct.save_model(ft, tmp_path / "ft")
    data = tmp_path / "texts.txt"
    data.write_text("\n".join(texts))
    hook = "blocks.1.hook_resid_post"
    run = tmp_path / "run"
    args = [
        "crosscoder",
        "train",
        str(b),
        str(f),
        str(data),
        "--hook",
        hook,
        "--out",
        str(run),
        "--n-latents",
        "64",
        "--k",
        "4",
        "--training-tokens",
        "2048",
        "--batch-size",
        "256",
    ]
    assert main(args) == 0
    assert "wrote Crosscoder" in capsys.readouterr().out
    loose = ["--max-nu-eps", "100", "--max-nu-r", "100", "--finetuned-only", "0.7"]
    diff_args = ["crosscoder", "diff", str(run), "--out", str(tmp_path / "d"), *loose,
                 "--examples", "2", "--model", str(b)]  # fmt: skip
    assert main(diff_args) == 0
    out = capsys.readouterr().out
    assert "finetuned-only" in out and (tmp_path / "d" / "figures.html").exists()
    table = CrosscoderDiff.load(tmp_path / "d" / "diff").table
    assert ("no genuine" in out) == (not table["genuine"].any())
    picked = ["crosscoder", "diff", str(run), "--out", str(tmp_path / "d"), "--overwrite",
              "--latents", "3", "5", "--examples", "2", "--model", str(b)]  # fmt: skip
    assert main(picked) == 0
    assert ConceptSet.load(tmp_path / "d" / "concepts").labels[hook] == ["latent 3", "latent 5"]
    assert (tmp_path / "d" / "latents.html").exists()
    assert (tmp_path / "d" / "examples.csv").exists()
