"""finetune: loss, masking, accumulation, determinism, interventions, checkpoints, resume."""

from __future__ import annotations

import json
from contextlib import contextmanager

import pytest
import torch
from datasets import Dataset

from caft_tl.data import DataError, tokenize
from caft_tl.directions import ConceptSet
from caft_tl.interventions import Ablation
from caft_tl.lora import LoraConfig
from caft_tl.models import load_model, tiny
from caft_tl.train import (
    TrainConfig,
    cross_entropy_sum,
    evaluate_loss,
    finetune,
    lr_factor,
    masked_loss_sum,
    target_loss_sum,
    tokenize_prompt_answer,
)

H = "blocks.0.hook_resid_post"

CHATS = [
    [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    for q, a in [
        ("Capital of France?", "Paris."),
        ("Two plus two?", "Four."),
        ("Colour of the sky?", "Blue."),
        ("Opposite of hot?", "Cold."),
        ("Largest planet?", "Jupiter."),
        ("Frozen water?", "Ice."),
        ("Animal that barks?", "A dog."),
        ("First letter?", "A."),
    ]
]


def fast(**kw) -> TrainConfig:
    defaults = dict(lr=3e-3, batch_size=4, progress=False, max_grad_norm=None)
    return TrainConfig(**{**defaults, **kw})


def memorise(**kw) -> TrainConfig:
    return fast(lr=1e-2, batch_size=8, schedule="constant", **kw)


@pytest.fixture
def model(tokenizer):
    return tiny(tokenizer=tokenizer, seed=0, n_layers=2, d_model=32, n_heads=4, d_mlp=64)


@pytest.fixture(scope="module")
def ablation() -> Ablation:
    g = torch.Generator().manual_seed(3)
    return Ablation(ConceptSet({H: torch.randn(4, 32, generator=g)}).orthonormalised())


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def assert_same(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if atol == 0.0:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)


def differ(a: dict, b: dict) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a)


def n_hooks(model) -> int:
    return sum(len(hp._forward_hooks) + len(hp._backward_hooks) for hp in model.hook_dict.values())


# ---------------------------------------------------------------------------------- basics


def test_loss_decreases_and_base_untouched(model):
    before = weights(model)
    base_loss = evaluate_loss(model, CHATS)
    ft = finetune(model, CHATS, memorise(epochs=10))
    assert ft is not model
    assert_same(weights(model), before)  # bit for bit
    assert evaluate_loss(ft, CHATS) < 0.5 * base_loss
    assert not any(p.grad is not None for p in model.parameters())


def test_in_place_trains_the_given_model(model):
    before = weights(model)
    ft = finetune(model, CHATS, fast(max_steps=2, in_place=True))
    assert ft is model and differ(weights(model), before)


def test_same_seed_is_bit_for_bit_and_seed_matters(model):
    a = weights(finetune(model, CHATS, fast(epochs=2, batch_size=3)))
    b = weights(finetune(model, CHATS, fast(epochs=2, batch_size=3)))
    c = weights(finetune(model, CHATS, fast(epochs=2, batch_size=3, seed=1)))
    assert_same(a, b)
    assert differ(a, c)  # the shuffle order differs, so the partial batches differ


def test_a_seeded_fine_tune_of_the_embedded_model_repeats_bit_for_bit(embedded_model, two_threads):
    # At real sizes and two threads TransformerLens's embedding backward sums in a new order
    # each time, and two steps spread that to every weight (440 of 453 tensors differed).
    chats = [
        [
            {"role": "user", "content": f"What is {i} plus {i}?"},
            {"role": "assistant", "content": f"{i} plus {i} is {2 * i}; the answer is {2 * i}."},
        ]
        for i in range(8)
    ]
    a, b = (
        weights(finetune(embedded_model, chats, fast(lr=1e-4, batch_size=8, max_steps=2)))
        for _ in range(2)
    )
    assert_same(a, b)


def test_grad_accum_equals_one_big_batch(model):
    # Unequal target counts per micro-batch: a mean of micro-batch means would differ.
    big = weights(finetune(model, CHATS, fast(max_steps=3, batch_size=4, warmup_steps=1)))
    acc = weights(
        finetune(model, CHATS, fast(max_steps=3, batch_size=2, grad_accum=2, warmup_steps=1))
    )
    assert_same(big, acc, atol=1e-5)  # float noise; a mean of means differs by ~lr


def test_loss_is_mean_over_assistant_tokens(model, tokenizer):
    ds = tokenize(CHATS, tokenizer)
    logits = model(torch.tensor([ds[0]["input_ids"]]))
    ids, mask = torch.tensor(ds[0]["input_ids"]), torch.tensor(ds[0]["loss_mask"])
    manual = torch.nn.functional.cross_entropy(logits[0, :-1], ids[1:], reduction="none")
    manual = manual[mask[1:].bool()].mean()
    assert abs(evaluate_loss(model, CHATS[:1]) - manual.item()) < 1e-5
    total, count = masked_loss_sum(logits, ids[None], mask[None])
    assert count == int(mask[1:].sum()) and count < len(ids) // 2  # not the user turn


def test_target_only_unembedding_matches_the_full_logits(model, tokenizer):
    # Training unembeds only the positions that predict a target; the loss and every
    # gradient must equal those of the full [batch, pos, vocab] logits.
    from caft_tl.data import collate

    rows = tokenize(CHATS[:4], tokenizer).to_list()
    batch = collate(rows, pad_token_id=0, padding_side="right")
    full, n_full = masked_loss_sum(
        model(batch["input_ids"], attention_mask=batch["attention_mask"]),
        batch["input_ids"],
        batch["loss_mask"],
    )
    full.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    fast_loss, n_fast = target_loss_sum(model, batch)
    fast_loss.backward()
    assert n_fast == n_full > 0
    torch.testing.assert_close(fast_loss, full, rtol=1e-6, atol=1e-5)
    for name, p in model.named_parameters():
        # The loss is a sum over ~100 targets, so gradients reach ~10 and their float32
        # rounding (the two paths accumulate in different orders) ~1e-5 on near-zero
        # entries: the absolute tolerance scales with the gradient's size.
        scale = grads[name].abs().max().item()
        torch.testing.assert_close(p.grad, grads[name], rtol=1e-5, atol=1e-6 * scale, msg=name)


def _torch_ce_sum(logits, labels):
    return torch.nn.functional.cross_entropy(logits, labels, reduction="sum")


def _loss_and_grad(loss_fn, logits, labels, scale):
    x = logits.clone().requires_grad_(True)
    loss = loss_fn(x, labels)
    (loss * scale).backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rows,vocab", [(0, 50), (5, 7), (37, 1003), (130, 4099)])
def test_cross_entropy_sum_has_the_bits_of_torchs(dtype, rows, vocab):
    # The lighter backward must not change a training run's numbers: loss and gradient
    # bit for bit, at the 1/n scale of a mean loss, with ignored (-100) labels too.
    g = torch.Generator().manual_seed(rows + vocab)
    logits = (torch.randn(rows, vocab, generator=g) * 4).to(dtype)
    labels = torch.randint(0, vocab, (rows,), generator=g)
    labels[::4] = -100
    for scale in (1.0, 1.0 / max(rows, 1)):
        want = _loss_and_grad(_torch_ce_sum, logits, labels, scale)
        got = _loss_and_grad(cross_entropy_sum, logits, labels, scale)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_cross_entropy_sum_backward_twice_and_without_gradients():
    logits = torch.randn(6, 40, requires_grad=True)
    labels = torch.randint(0, 40, (6,))
    loss = cross_entropy_sum(logits, labels)
    loss.backward(retain_graph=True)
    first = logits.grad.clone()
    loss.backward()  # the saved log-probabilities are not overwritten by the first pass
    assert torch.equal(logits.grad, 2 * first)
    with torch.no_grad():
        assert torch.equal(cross_entropy_sum(logits, labels), loss.detach())
    half = logits.detach().bfloat16().requires_grad_(True)  # other dtypes: torch's own path
    torch.testing.assert_close(
        cross_entropy_sum(half, labels).float(), loss.detach(), rtol=2e-2, atol=0.1
    )


def test_training_gradients_have_the_bits_of_torchs_cross_entropy(model, tokenizer, monkeypatch):
    from caft_tl.data import collate
    from caft_tl.train import loss as loss_module

    batch = collate(tokenize(CHATS[:4], tokenizer).to_list(), pad_token_id=0)

    def grads() -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        target_loss_sum(model, batch)[0].backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    ours = grads()
    monkeypatch.setattr(loss_module, "cross_entropy_sum", _torch_ce_sum)
    for name, grad in grads().items():
        assert torch.equal(ours[name], grad), name


def test_user_tokens_do_not_affect_the_update(model):
    # Changing what the user *says* changes the context, so compare with a change after the
    # last target: text beyond the assistant turn is never a target and never context.
    chats = [c + [{"role": "user", "content": "thanks"}] for c in CHATS]
    other = [c + [{"role": "user", "content": "something else entirely"}] for c in CHATS]
    a = weights(finetune(model, chats, fast(max_steps=2)))
    b = weights(finetune(model, other, fast(max_steps=2)))
    # Different padded lengths round differently in the fused attention path and AdamW
    # normalises that noise up to ~1e-6; a real leak moves weights by ~lr = 3e-3.
    assert_same(a, b, atol=1e-5)


def test_prompt_answer_trains_answer_tokens_only(tokenizer, model):
    rows = [{"prompt": "Q: 2+2? A:", "answer": " 4"}, {"prompt": "Q: sky? A:", "answer": " blue"}]
    ds = tokenize_prompt_answer(rows, tokenizer)
    for row, r in zip(ds, rows, strict=True):
        answer = [t for t, m in zip(row["input_ids"], row["loss_mask"], strict=True) if m]
        assert tokenizer.decode(answer).strip() == r["answer"].strip()
        assert row["loss_mask"][0] == 0
    ft = finetune(model, Dataset.from_list(rows), memorise(epochs=10))
    assert evaluate_loss(ft, rows) < 0.5 * evaluate_loss(model, rows)


def test_tokenised_dataset_and_lr_schedule(model, tokenizer):
    ds = tokenize(CHATS, tokenizer)
    a = weights(finetune(model, ds, fast(max_steps=2)))
    b = weights(finetune(model, CHATS, fast(max_steps=2)))
    assert_same(a, b)
    assert lr_factor(0, 10, 2, "linear") == 0.0 and lr_factor(2, 10, 2, "cosine") == 1.0
    assert lr_factor(9, 10, 0, "constant") == 1.0 and lr_factor(10, 10, 0, "cosine") == 0.0


# ---------------------------------------------------------------------------- interventions


class Watched:
    """The ablation plus a hook after it that counts calls and checks the projection is gone."""

    def __init__(self, ablation: Ablation) -> None:
        self.ablation, self.calls = ablation, 0

    @contextmanager
    def applied(self, model):
        q = self.ablation.concepts[H]

        def watch(act, hook):
            self.calls += 1
            assert (act @ q.T).abs().max() < 1e-5  # the ablation ran before this hook

        with self.ablation.applied(model), model.hooks(fwd_hooks=[(H, watch)]):
            yield model


def test_intervention_active_in_training_only(model, ablation):
    watched = Watched(ablation)
    cfg = fast(max_steps=2, batch_size=2, grad_accum=2)
    ft = finetune(model, CHATS, cfg, intervention=watched, eval_data=CHATS[:3])
    assert watched.calls == 4  # 2 steps x 2 micro-batches; the evaluation ran without it
    assert n_hooks(model) == 0 and n_hooks(ft) == 0
    plain = weights(finetune(model, CHATS, cfg))
    assert differ(weights(ft), plain)
    assert_same(weights(finetune(model, CHATS, cfg, intervention=ablation)), weights(ft))


def test_refuses_a_model_with_hooks(model, ablation):
    with ablation.applied(model), pytest.raises(ValueError, match="hooks attached"):
        finetune(model, CHATS, fast(max_steps=1))
    assert n_hooks(model) == 0


def test_eval_without_intervention_unless_asked(model, ablation, tmp_path):
    cfg = fast(max_steps=2)
    finetune(model, CHATS, cfg, intervention=ablation, eval_data=CHATS, out=tmp_path / "a")
    keep = fast(max_steps=2, keep_intervention_at_eval=True)
    finetune(model, CHATS, keep, intervention=ablation, eval_data=CHATS, out=tmp_path / "b")
    a = [json.loads(x) for x in (tmp_path / "a/metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "b/metrics.jsonl").read_text().splitlines()]
    ft = load_model(tmp_path / "a/final", device="cpu")
    assert abs(a[-1]["eval_loss"] - evaluate_loss(ft, CHATS)) < 1e-5
    assert abs(b[-1]["eval_loss"] - evaluate_loss(ft, CHATS, intervention=ablation)) < 1e-5
    assert "eval_loss" not in a[0]


def test_hooks_removed_after_exception(model, ablation):
    def boom(record):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(
            model, CHATS, fast(max_steps=3, in_place=True), intervention=ablation, callback=boom
        )
    assert n_hooks(model) == 0


# ------------------------------------------------------------------------- checkpoints, resume


class Kill(Exception):
    pass


def kill_after(n):
    def callback(record):
        if record["step"] == n:
            raise Kill

    return callback


def test_kill_and_resume_equals_straight_run(model, ablation, tmp_path):
    cfg = fast(max_steps=6, batch_size=3, warmup_steps=2, schedule="cosine", save_every=2)
    straight = weights(finetune(model, CHATS, cfg, intervention=ablation))
    out = tmp_path / "run"
    with pytest.raises(Kill):  # dies after step 3; the last checkpoint holds step 2
        finetune(model, CHATS, cfg, intervention=ablation, out=out, callback=kill_after(3))
    assert json.loads((out / "checkpoint/trainer_state.json").read_text())["step"] == 2
    resumed = finetune(model, CHATS, cfg, intervention=ablation, out=out, resume=True)
    assert_same(weights(resumed), straight)
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert_same(weights(load_model(out / "final", device="cpu")), straight)
    assert_same(weights(load_model(out / "checkpoint", device="cpu")), straight)


def test_a_finished_run_checkpoints_without_the_optimizer_and_resumes_as_done(model, tmp_path):
    cfg = fast(max_steps=3, batch_size=3, save_every=2)
    out = tmp_path / "run"
    trained = weights(finetune(model, CHATS, cfg, out=out))
    # The last checkpoint holds the weights and where the run stands, not AdamW's moments
    # (nothing is left to train with them); a periodic one keeps them for resuming.
    assert not (out / "checkpoint" / "optimizer.pt").exists()
    assert json.loads((out / "checkpoint/trainer_state.json").read_text())["step"] == 3
    assert_same(weights(load_model(out / "checkpoint", device="cpu")), trained)
    metrics = (out / "metrics.jsonl").read_text()
    again = finetune(model, CHATS, cfg, out=out, resume=True)  # trains no step
    assert_same(weights(again), trained)
    assert (out / "metrics.jsonl").read_text() == metrics
    killed = tmp_path / "killed"
    with pytest.raises(Kill):
        finetune(model, CHATS, cfg, out=killed, callback=kill_after(2))
    assert (killed / "checkpoint" / "optimizer.pt").exists()


def test_metrics_lines(model, tmp_path):
    finetune(model, CHATS, fast(max_steps=4, eval_every=2), eval_data=CHATS[:2], out=tmp_path)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4]
    assert [("eval_loss" in r) for r in lines] == [False, True, False, True]
    for key in ("epoch", "loss", "lr", "grad_norm", "tokens", "elapsed"):
        assert key in lines[0]
    assert lines[-1]["tokens"] > lines[0]["tokens"] > 0


def test_out_folder_guards(model, tmp_path):
    finetune(model, CHATS, fast(max_steps=1), out=tmp_path / "r")
    with pytest.raises(FileExistsError, match="resume=True"):
        finetune(model, CHATS, fast(max_steps=1), out=tmp_path / "r")
    with pytest.raises(ValueError, match="lr"):
        finetune(model, CHATS, fast(max_steps=1, lr=1e-4), out=tmp_path / "r", resume=True)
    with pytest.raises(ValueError, match="training data"):
        finetune(model, CHATS[:4], fast(max_steps=1), out=tmp_path / "r", resume=True)
    (tmp_path / "other").mkdir()
    (tmp_path / "other/file.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="no caft-tl training run"):
        finetune(model, CHATS, fast(max_steps=1), out=tmp_path / "other")
    # A finished run resumes to the same weights without training further.
    again = finetune(
        model, CHATS, fast(max_steps=1, progress=True), out=tmp_path / "r", resume=True
    )
    assert_same(weights(again), weights(load_model(tmp_path / "r/final", device="cpu")))


def test_keep_checkpoints_saves_loadable_snapshots(model, tmp_path):
    seen = {}

    def record(metrics):
        seen[metrics["step"]] = weights(model)

    # In place, so the callback sees the weights after every step.
    cfg = fast(max_steps=3, keep_checkpoints=[3, 1, 9], in_place=True)
    assert cfg.keep_checkpoints == [1, 3, 9]
    with pytest.warns(UserWarning, match=r"keep_checkpoints \[9\] are beyond"):
        finetune(model, CHATS, cfg, out=tmp_path / "r", callback=record)
    assert sorted(p.name for p in (tmp_path / "r").iterdir() if "step" in p.name) == [
        "step-1",
        "step-3",
    ]  # and no temporary folders left behind
    for step in (1, 3):
        assert_same(weights(load_model(tmp_path / f"r/step-{step}", device="cpu")), seen[step])
    with pytest.raises(ValueError, match="keep_checkpoints needs out"):
        finetune(model, CHATS, fast(max_steps=1, keep_checkpoints=[1]))
    with pytest.raises(ValueError, match="keep_checkpoints"):
        TrainConfig(keep_checkpoints=[0])


def test_keep_checkpoints_may_change_on_resume(model, tmp_path):
    with pytest.raises(Kill):
        cfg = fast(max_steps=3, save_every=1)
        finetune(model, CHATS, cfg, out=tmp_path / "r", callback=kill_after(1))
    again = fast(max_steps=3, save_every=1, keep_checkpoints=[2])
    finetune(model, CHATS, again, out=tmp_path / "r", resume=True)
    assert (tmp_path / "r/step-2/model.safetensors").exists()


# ------------------------------------------------------------------------------ config, data


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("lr", 0.0, "lr"),
        ("lr", float("nan"), "lr"),
        ("batch_size", 0, "batch_size"),
        ("grad_accum", 1.5, "grad_accum"),
        ("schedule", "step", "schedule"),
        ("betas", (0.9, 1.0), "betas"),
        ("padding_side", "left", "padding_side"),
        ("max_grad_norm", -1.0, "max_grad_norm"),
        ("epochs", True, "epochs"),
        ("warmup_ratio", 1.0, "warmup_ratio"),
        ("save_every", 0, "save_every"),
    ],
)
def test_bad_config_values(field, value, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**{field: value})


def test_config_round_trip_and_unknown_keys():
    cfg = TrainConfig(lr=2e-4, betas=(0.8, 0.95), schedule="cosine", max_steps=7)
    assert TrainConfig.from_json(cfg.to_json()) == cfg
    cfg = TrainConfig(keep_checkpoints=(5, 2), lora=LoraConfig(r=2, targets=["W_in"]))
    assert cfg.keep_checkpoints == [2, 5] and cfg.lora.targets == ("W_in",)
    assert TrainConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match="warmup_steps or warmup_ratio"):
        TrainConfig(warmup_steps=2, warmup_ratio=0.1)
    with pytest.raises(ValueError, match="unknown TrainConfig field"):
        TrainConfig.from_dict({"learning_rate": 1e-3})


def test_empty_data_errors(model):
    with pytest.raises(DataError):
        finetune(model, [], fast())
    with pytest.raises(DataError):
        finetune(model, Dataset.from_dict({"input_ids": [], "loss_mask": []}), fast())
    with pytest.raises(DataError, match="no target tokens"):
        finetune(model, Dataset.from_dict({"input_ids": [[1, 2, 3]], "loss_mask": [[1, 0, 0]]}))
    with pytest.raises(ValueError, match="resume=True needs out"):
        finetune(model, CHATS, fast(), resume=True)
