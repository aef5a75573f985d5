"""ablation_shift, steering_vs_ablation and sign_report on tiny models, against manual maths."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from sae_lens import StandardSAE, StandardSAEConfig

import caft_tl as ct
from caft_tl.diagnostics import (
    AblationShift,
    SteeringSweep,
    ablation_shift,
    sign_report,
    sign_sentences,
    steering_vs_ablation,
)
from caft_tl.directions import ConceptSet, mean_difference
from caft_tl.interventions import Ablation, Steering

H0, H1 = "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def model(tokenizer):
    return ct.models.tiny(tokenizer=tokenizer, seed=3)


@pytest.fixture(scope="module")
def concepts():
    g = torch.Generator().manual_seed(1)
    q0 = torch.linalg.qr(torch.randn(64, 2, generator=g))[0].T
    q1 = torch.linalg.qr(torch.randn(64, 1, generator=g))[0].T
    return ConceptSet({H0: q0, H1: q1}, labels={H0: ["a", "b"], H1: ["c"]})


@pytest.fixture(scope="module")
def mc():
    return ct.tasks.gender_pronoun("ood", n=10, answer_format="pronoun")


def _sae(hook: str, d_sae: int = 8) -> StandardSAE:
    cfg = StandardSAEConfig(d_in=64, d_sae=d_sae)
    cfg.metadata.hook_name = hook
    sae = StandardSAE(cfg)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(64, d_sae, generator=torch.Generator().manual_seed(2)))
    return sae


def _manual_acts(model, data, hooks, fwd_hooks=()):
    """Activations at ``hooks`` over every token but the first, as a user would get them."""
    out = {h: [] for h in hooks}
    prompts = list(data["prompt"])
    with model.hooks(fwd_hooks=list(fwd_hooks)):
        for prompt in prompts:
            ids = torch.tensor([model.tokenizer(prompt, add_special_tokens=False)["input_ids"]])
            _, cache = model.run_with_cache(ids, names_filter=list(hooks))
            for h in hooks:
                out[h].append(cache[h][0, 1:])
    return {h: torch.cat(v) for h, v in out.items()}


# ------------------------------------------------------------------------------ ablation_shift


def test_shift_matches_manual_projections(model, concepts, mc):
    hints = ct.tasks.gender_contrast(n=8)
    probe = mean_difference(model, hints["female"], hints["male"], [H1], label="female-male")
    sae = _sae(H1)
    r = ablation_shift(model, concepts, mc, probes=probe, saes=sae, progress=False)
    clean = _manual_acts(model, mc, [H0, H1])
    ablation = Ablation(concepts, mode="zero")
    up_h1 = _manual_acts(model, mc, [H1], [(H0, dict(ablation.fwd_hooks(model))[H0])])[H1]
    after = _manual_acts(model, mc, [H1], ablation.fwd_hooks(model))[H1]

    d = r.part("direction").set_index("label")
    for label, hook, i in (("a", H0, 0), ("b", H0, 1), ("c", H1, 0)):
        proj = clean[hook] @ concepts[hook][i]
        assert d.loc[label, "clean"] == pytest.approx(proj.mean().item(), abs=1e-4)
        assert d.loc[label, "clean_std"] == pytest.approx(proj.std(unbiased=False).item(), rel=1e-3)
        assert abs(d.loc[label, "ablated"]) < 1e-5  # zero-ablation leaves nothing along q
    # Nothing is ablated before block 0; block 1 sees block 0's ablation upstream.
    assert d.loc["a", "upstream"] == pytest.approx(d.loc["a", "clean"], abs=1e-5)
    up = (up_h1 @ concepts[H1][0]).mean().item()
    assert d.loc["c", "upstream"] == pytest.approx(up, abs=1e-4)
    assert not math.isclose(up, d.loc["c", "clean"], abs_tol=1e-4)

    p = r.part("probe").iloc[0]
    v = probe[H1][0]
    assert p["clean"] == pytest.approx((clean[H1] @ v).mean().item(), abs=1e-4)
    assert p["ablated"] == pytest.approx((after @ v).mean().item(), abs=1e-4)
    assert p["change"] == pytest.approx(p["ablated"] - p["clean"], abs=1e-6)

    s = r.part("sae")
    with torch.no_grad():
        want_clean, want_after = sae.encode(clean[H1]), sae.encode(after)
    np.testing.assert_allclose(s["clean"], want_clean.mean(0).numpy(), atol=1e-4)
    np.testing.assert_allclose(s["ablated"], want_after.mean(0).numpy(), atol=1e-4)
    np.testing.assert_allclose(s["clean_active"], (want_clean > 0).float().mean(0), atol=1e-6)
    top = r.top_latents(3)
    assert set(top["moved"]) <= {"up", "down"} and len(top) <= 6
    assert (top[top["moved"] == "up"]["change"] > 0).all()
    assert len(r.figure().data) >= 3


def test_mean_ablation_keeps_the_mean_projection(model, concepts, mc):
    r = ablation_shift(model, concepts, mc, mode="mean", progress=False)
    d = r.part("direction")
    # Fitted on the same tokens: the mean along each direction is unchanged at its own hook.
    np.testing.assert_allclose(d["ablated"], d["clean"], atol=1e-5)
    assert d["change_sd"].abs().max() < 1e-4


def test_shift_bad_input_and_hooks_removed(model, concepts, mc, tmp_path):
    with pytest.raises(ValueError, match="mode must be"):
        ablation_shift(model, concepts, mc, mode="gradient", progress=False)
    with pytest.raises(ValueError, match="width"):
        ablation_shift(model, ConceptSet({H0: torch.eye(32)[:1]}), mc, progress=False)
    with pytest.raises(ValueError, match="hook"):
        ablation_shift(model, ConceptSet({"blocks.9.hook_resid_post": torch.eye(64)[:1]}), mc)
    unnamed = _sae(H1)
    unnamed.cfg.metadata.hook_name = None
    with pytest.raises(ValueError, match="records no hook_name"):
        ablation_shift(model, concepts, mc, saes=unnamed, progress=False)
    assert ablation_shift(model, concepts, mc, saes={H1: unnamed}, progress=False).meta["saes"]
    broken = _sae(H1)
    broken.encode = lambda x: (_ for _ in ()).throw(RuntimeError("boom"))
    with pytest.raises(RuntimeError, match="boom"):
        ablation_shift(model, concepts, mc, saes=broken, progress=False)
    assert all(not hp._forward_hooks for hp in model.hook_dict.values())

    r = ablation_shift(model, concepts, mc, progress=False)
    r.save(tmp_path / "shift")
    back = AblationShift.load(tmp_path / "shift")
    pd.testing.assert_frame_equal(back.table, r.table, check_dtype=False)
    assert back.meta == r.meta
    with pytest.raises(ValueError, match="no SAE"):
        r.top_latents()


# ------------------------------------------------------------------------ steering_vs_ablation


def test_sweep_rows_match_independent_evaluations(model, concepts, mc):
    sweep = steering_vs_ablation(model, concepts, mc, coefs=[-2, 2], progress=False)
    t = sweep.table
    assert set(t["directions"]) == {"a @ " + H0, "b @ " + H0, "c @ " + H1, "all"}
    # -1 and 0 join the sweep: the steering that matches zero- and mean-ablation's shift.
    assert sorted(t[t["condition"] == "steer"]["coef"].unique()) == [-2, -1, 0, 2]
    allrows = t[t["directions"] == "all"].set_index(["condition", "coef"])

    clean = ct.evals.multiple_choice(model, mc, return_examples=True)["examples"]
    assert allrows.loc[("steer", 0.0), "logit_diff"] == pytest.approx(
        clean["margin"].mean(), abs=1e-4
    )
    assert allrows.loc[("steer", 0.0), "kl"] == pytest.approx(0.0, abs=1e-6)

    zero = ct.evals.multiple_choice(model, mc, intervention=Ablation(concepts, mode="zero"))
    assert allrows.loc[("zero", -1.0), "accuracy"] == pytest.approx(zero["accuracy"])
    assert allrows.loc[("zero", -1.0), "logit_diff"] == pytest.approx(zero["mean_margin"], abs=1e-4)
    assert allrows.loc[("zero", -1.0), "kl"] > 0

    # Steering uses the model's mean over the data's real tokens (first token included).
    steer = Steering(concepts, 2.0).fit_mean(model, _token_batches(model, mc))
    r = ct.evals.multiple_choice(model, mc, intervention=steer)
    assert allrows.loc[("steer", 2.0), "logit_diff"] == pytest.approx(r["mean_margin"], abs=1e-4)

    # A set at block 1 starts from the cached residual entering block 1: same numbers.
    only_c = concepts.select({H1: [0]})
    at_h1 = t[t["directions"] == "c @ " + H1].set_index(["condition", "coef"])
    r = ct.evals.multiple_choice(model, mc, intervention=Ablation(only_c, mode="zero"))
    assert at_h1.loc[("zero", -1.0), "logit_diff"] == pytest.approx(r["mean_margin"], abs=1e-4)
    assert at_h1.loc[("zero", -1.0), "accuracy"] == pytest.approx(r["accuracy"])

    report = sweep.sign_report()
    assert list(report["directions"]) == sweep.direction_sets
    assert set(report["acts_like"]) <= {
        "negative steering", "positive steering", "no measurable effect",
        "not reproduced by steering",
    }  # fmt: skip
    fig = sweep.figure()
    zero_points = [tr for tr in fig.data if tr.name == "zero-ablation"]
    assert zero_points and all(list(tr.x) == [-1.0] for tr in zero_points)


def _token_batches(model, mc):
    for prompt in mc["prompt"]:
        yield torch.tensor([model.tokenizer(prompt, add_special_tokens=False)["input_ids"]])


def test_sweep_on_texts_with_a_judge(model, concepts, tmp_path):
    texts = ["The cat sat on the mat today.", "A quick brown fox jumps over the dog."]
    seen = []

    def judge(questions, answers):
        seen.append((list(questions), list(answers)))
        return [float(len(a)) for a in answers]

    sweep = steering_vs_ablation(
        model, concepts, texts, coefs=[3], per_direction=False, judge=judge,
        max_new_tokens=4, progress=False,
    )  # fmt: skip
    t = sweep.table.set_index(["condition", "coef"])
    assert set(sweep.direction_sets) == {"all"}
    # clean + zero + mean + steer -1, +3 (steer 0 reuses clean)
    assert len(seen) == 5 and all(q == texts for q, _ in seen)
    assert {"loss", "kl", "judge_score"} <= set(sweep.metrics)
    assert sweep.default_metric == "judge_score"
    # The clean loss is the mean next-token loss of each text, tokenised as caft_tl.data
    # tokenises plain texts (the tokenizer's own special tokens).
    ids = [torch.tensor([model.tokenizer(text)["input_ids"]]) for text in texts]
    losses = [model(x, return_type="loss").item() for x in ids]
    assert t.loc[("steer", 0.0), "loss"] == pytest.approx(np.mean(losses), rel=1e-4)
    assert t.loc[("steer", 3.0), "kl"] > 0 and t.loc[("steer", 0.0), "kl"] == 0

    with pytest.raises(ValueError, match="returned 1 scores"):
        steering_vs_ablation(
            model, concepts, texts, coefs=[3], per_direction=False,
            judge=lambda q, a: [1.0], max_new_tokens=2, progress=False,
        )  # fmt: skip

    sweep.save(tmp_path / "sweep")
    back = SteeringSweep.load(tmp_path / "sweep")
    pd.testing.assert_frame_equal(back.table, sweep.table, check_dtype=False)


def test_sweep_bad_input(model, concepts, mc):
    with pytest.raises(ValueError, match="judge"):
        steering_vs_ablation(model, concepts, mc, judge=lambda q, a: [], progress=False)
    with pytest.raises(ValueError, match="at least one steering"):
        steering_vs_ablation(model, concepts, mc, coefs=[0, -1], progress=False)
    with pytest.raises(ValueError, match="width"):
        steering_vs_ablation(model, ConceptSet({H0: torch.eye(32)[:1]}), mc, progress=False)
    with pytest.raises(TypeError, match="ConceptSet"):
        steering_vs_ablation(model, torch.eye(64)[:1], mc, progress=False)
    with pytest.raises(ValueError, match="empty"):
        steering_vs_ablation(model, concepts, [], progress=False)


# ------------------------------------------------------------------------------ sign_report


def _synthetic(curve, zero_values, n=50, noise=0.0):
    """A sweep whose steering curve is ``curve(c)`` and whose zero-ablation gives
    ``zero_values`` per example; clean per-example values are 0 + noise."""
    rng = np.random.default_rng(0)
    base = rng.normal(0, noise, n) if noise else np.zeros(n)
    rows, examples = [], []

    def add(condition, coef, values):
        rows.append({"directions": "all", "condition": condition, "coef": coef,
                     "logit_diff": float(np.mean(values))})  # fmt: skip
        examples.append(pd.DataFrame({"directions": "all", "condition": condition, "coef": coef,
                                      "example": range(n), "logit_diff": values}))  # fmt: skip

    for c in (-4.0, -3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0, 4.0):
        add("steer", c, base + curve(c))
    add("zero", -1.0, base + zero_values)
    add("mean", 0.0, base + 0.5)
    return SteeringSweep(pd.DataFrame(rows), pd.concat(examples), {"kind": "multiple_choice",
                                                                   "n_examples": n})  # fmt: skip


def test_sign_report_finds_the_equivalent_coefficient():
    sweep = _synthetic(lambda c: 2 * c, np.full(50, -4.0) + np.linspace(-0.1, 0.1, 50))
    r = sign_report(sweep).iloc[0]
    assert r["clean"] == 0.0
    assert r["zero_change"] == pytest.approx(-4.0)
    assert r["equivalent_coef"] == pytest.approx(-2.0)
    assert r["shift_change"] == pytest.approx(-2.0)
    assert r["shift_explains"] == pytest.approx(0.5)
    assert r["mean_change"] == pytest.approx(0.5)
    assert r["acts_like"] == "negative steering"

    up = sign_report(_synthetic(lambda c: 2 * c, np.full(50, 3.0) + np.linspace(-0.1, 0.1, 50)))
    assert up.iloc[0]["equivalent_coef"] == pytest.approx(1.5)
    assert up.iloc[0]["acts_like"] == "positive steering"

    far = sign_report(_synthetic(lambda c: 0.1 * c, np.full(50, -3.0) + np.linspace(-0.1, 0.1, 50)))
    assert math.isnan(far.iloc[0]["equivalent_coef"])
    assert far.iloc[0]["acts_like"] == "not reproduced by steering"

    # A change well inside the examples' noise is no measurable effect.
    noisy = _synthetic(lambda c: 2 * c, np.random.default_rng(1).normal(0, 1, 50), noise=0.0)
    assert sign_report(noisy).iloc[0]["acts_like"] == "no measurable effect"


def test_sign_report_prefers_the_crossing_its_shift_explains():
    # Zero-ablation equals steering by -1 up to float noise, and the non-monotone curve also
    # reaches that value at c = +0.4: the crossing nearest 0 would say "positive steering".
    curve = {-4.0: -1.5, -3.0: -1.2, -2.0: -0.8, -1.0: -0.4, 0.0: 0.0, 1.0: -0.9, 2.0: -1.0,
             3.0: -1.1, 4.0: -1.2}  # fmt: skip
    zero = np.full(50, -0.4 + 1e-7) + np.linspace(-0.01, 0.01, 50)
    r = sign_report(_synthetic(lambda c: curve[c], zero)).iloc[0]
    assert r["equivalent_coef"] == pytest.approx(-1.0)  # the grid point, found within tolerance
    assert r["acts_like"] == "negative steering"
    assert r["crossings"] == [pytest.approx(-1.0), pytest.approx(0.4444444, rel=1e-4)]
    assert not r["monotone"]
    text = " ".join(sign_sentences(sign_report(_synthetic(lambda c: curve[c], zero))))
    assert "not monotone" in text and "+0.44" in text

    # A U-shaped curve reaches -1 at c = 0.5 and at c = 2.5: the one nearer -1 is reported.
    curve = {-4.0: 3, -3.0: 2, -2.0: 1, -1.0: 0, 0.0: 0, 1.0: -2, 2.0: -1.5, 3.0: -0.5, 4.0: 1}
    sweep = _synthetic(lambda c: curve[c], np.full(50, -1.0) + np.linspace(-0.01, 0.01, 50))
    r = sign_report(sweep).iloc[0]
    assert r["equivalent_coef"] == pytest.approx(0.5)
    assert r["crossings"] == [pytest.approx(0.5), pytest.approx(2.5)]
    monotone = sign_report(_synthetic(lambda c: 2 * c, np.full(50, -4.0))).iloc[0]
    assert monotone["monotone"] and monotone["crossings"] == [pytest.approx(-2.0)]


def test_starting_at_the_first_hooked_block_changes_nothing(model, concepts, monkeypatch):
    import caft_tl.diagnostics.steering as steering

    texts = ["The cat sat on the mat today.", "A quick brown fox jumps over the dog, twice."]
    only_h1 = concepts.select({H1: [0]})
    fast = steering_vs_ablation(model, only_h1, texts, coefs=[2], progress=False)
    monkeypatch.setattr(steering, "PREFIX_BUDGET", 0)  # whole forwards only
    slow = steering_vs_ablation(model, only_h1, texts, coefs=[2], progress=False)
    pd.testing.assert_frame_equal(fast.table, slow.table, atol=1e-5)
    assert fast.table["kl"].max() > 0
