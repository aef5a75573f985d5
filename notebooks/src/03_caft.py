# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # CAFT on the embedded model: interventions, fine-tuning, controls, resume, LoRA
#
# Concept Ablation Fine-Tuning (CAFT) fine-tunes a model while the activations along some
# concept directions are projected out, so the fine-tune cannot use those directions to fit
# the data. This notebook walks through the machinery of `caft_tl` on the embedded
# SmolLM2-135M-Instruct (d_model 576), on CPU, in a few minutes:
#
# 1. a toy chat data set and a `ConceptSet` at three hook points;
# 2. what each intervention does to the activations (and to the gradients);
# 3. a short CAFT fine-tune against a plain one, and the controls of `finetune_with_baselines`;
# 4. killing a run and resuming it to the very same weights;
# 5. the LoRA variant, and the command-line equivalent.
#
# **This is a demo of the mechanics, not a CAFT result.** The directions below are the top
# principal components of the base model's activations on the toy data: directions of high
# variance, *not* interpreted concepts (finding and interpreting concept directions is the
# job of notebook 02). The fine-tunes run three optimiser steps on toy data, far too little
# to say anything about generalisation.

# %%
import json
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import pandas as pd
import plotly.express as px
import torch
import torch.nn.functional as F

import caft_tl as ct
from caft_tl.compare import finetune_with_baselines, mean_batches
from caft_tl.directions import pca

warnings.filterwarnings("ignore", category=DeprecationWarning)
torch.set_num_threads(min(2, torch.get_num_threads()))  # as timed; OMP_NUM_THREADS can lower it
# Bit-for-bit reproducible training on a multi-threaded CPU (see section 4).
torch.use_deterministic_algorithms(True, warn_only=True)
notebook_start = time.perf_counter()
work = Path(tempfile.mkdtemp(prefix="caft-demo-"))  # all run folders; removed at the end
model = ct.load_model(device="cpu")
print(model.cfg.model_name, "d_model", model.cfg.d_model, "layers", model.cfg.n_layers)

# %% [markdown]
# ## 1. Toy data and a ConceptSet
#
# 32 short single-turn chats generated from a template: simple facts, and every answer ends
# with the same sign-off ("Have a sunny day!"), the kind of side behaviour a fine-tune picks
# up along with the task. 8 chats about other facts are held out for evaluation.

# %%
FACTS = [
    ("the capital of France", "Paris"),
    ("the capital of Japan", "Tokyo"),
    ("the capital of Italy", "Rome"),
    ("the capital of Egypt", "Cairo"),
    ("the largest planet", "Jupiter"),
    ("the closest star to Earth", "the Sun"),
    ("the colour of grass", "green"),
    ("the colour of the sky on a clear day", "blue"),
    ("the boiling point of water in Celsius", "100 degrees"),
    ("two plus three", "five"),
    ("ten minus four", "six"),
    ("the opposite of hot", "cold"),
    ("the chemical symbol for gold", "Au"),
    ("the fastest land animal", "the cheetah"),
    ("the longest river in Africa", "the Nile"),
    ("the number of days in a week", "seven"),
    # held out
    ("the capital of Canada", "Ottawa"),
    ("the capital of Kenya", "Nairobi"),
    ("the smallest prime number", "two"),
    ("frozen water", "ice"),
    ("the author of Hamlet", "William Shakespeare"),
    ("the animal that says moo", "a cow"),
    ("the number of legs on a spider", "eight"),
    ("the capital of Spain", "Madrid"),
]
QUESTIONS = ["What is {}?", "Quick question: what is {}?"]
ANSWERS = ["It is {}. Have a sunny day!", "The answer is {}. Have a sunny day!"]


def chat(i, k):
    question, answer = FACTS[i]
    return [
        {"role": "user", "content": QUESTIONS[k % 2].format(question)},
        {"role": "assistant", "content": ANSWERS[k // 2 % 2].format(answer)},
    ]


train_chats = [chat(i % 16, i // 16 + i) for i in range(32)]  # facts 0-15, each twice
eval_chats = [chat(16 + i, i) for i in range(8)]  # facts 16-23, never trained on
print(train_chats[0], train_chats[17], eval_chats[0], sep="\n")

# %% [markdown]
# The ConceptSet: the top 4 principal components of the base model's activations on the
# assistant tokens of the training chats, at three residual-stream hooks. Any `ConceptSet`
# works the same way from here on (SAE latents, PCs of a fine-tuning difference,
# hand-picked directions).

# %%
HOOKS = [f"blocks.{layer}.hook_resid_post" for layer in (10, 15, 20)]
acts = ct.cache_activations(model, train_chats, HOOKS, positions="assistant", progress=False)
concepts = pca(acts, k=4, progress=False, model=model).to(dtype=torch.float32)
print(concepts)
variance = pd.DataFrame(concepts.scores, index=concepts.labels[HOOKS[0]])
variance.style.format("{:.1%}").set_caption("share of the variance on assistant tokens")

# %% [markdown]
# ## 2. What each intervention does
#
# With `Q` the `[d, k]` matrix of a hook's directions (orthonormal columns) and `h` an
# activation:
#
# | intervention | forward | backward (gradient reaching `h`) |
# | --- | --- | --- |
# | `Ablation(mode="zero")` (CAFT as published) | `h - QQᵀh` | `g - QQᵀg` |
# | `Ablation(mode="mean")` | `h - QQᵀ(h - μ)` | `g - QQᵀg` |
# | `Ablation(mode="detached")` | `h - QQᵀh` | `g` (activation effect only) |
# | `Ablation(mode="gradient")` | `h` | `g - QQᵀg` (gradient effect only) |
# | `Steering(coef)` | `h + coef·QQᵀμ` | `g` |
#
# `μ` is the mean activation on reference data (`fit_mean`; `finetune_with_baselines` and
# the CLI use all real tokens of the training data, as the hooks act at every position).
# Below, 8 chats run through the model with each intervention's hooks on, and we measure
# at every hook the RMS of the projection `Qᵀh` over the real tokens, its spread over tokens
# at blocks.10, and the share of the loss gradient at the input of blocks.10's hook that lies
# in span(Q).

# %%
(batch,) = mean_batches(model, train_chats[:8], batch_size=8)  # one padded batch
tokens, mask = batch["input_ids"], batch["mask"]
real = mask.bool()
H10 = HOOKS[0]


def probe(intervention=None):
    """Qᵀh at every hook (real tokens) with the intervention on, and the loss gradient
    g at the input of the blocks.10 hook."""
    seen = {}

    def make_leaf(act, hook):  # runs before the intervention's hook at blocks.10
        seen["leaf"] = act.detach().requires_grad_(True)
        return seen["leaf"]

    def record(act, hook):  # runs after it
        seen[hook.name] = act.detach()

    hooks = [(H10, make_leaf)] + (intervention.fwd_hooks(model) if intervention else [])
    with torch.enable_grad(), model.hooks(fwd_hooks=hooks + [(h, record) for h in HOOKS]):
        logits = model(tokens, attention_mask=mask)
        loss = F.cross_entropy(logits[:, :-1][real[:, 1:]], tokens[:, 1:][real[:, 1:]])
        (grad,) = torch.autograd.grad(loss, seen["leaf"])
    return {h: seen[h][real] @ concepts[h].T for h in HOOKS}, grad[real]


# μ from these same tokens, so that the steering comparison below is exact.
mean_ablation = ct.Ablation(concepts, mode="mean").fit_mean(model, [batch])
mu = mean_ablation.mean  # {hook: mean activation}
interventions = {
    "none": None,
    "zero": ct.Ablation(concepts, mode="zero"),
    "mean": mean_ablation,
    "detached": ct.Ablation(concepts, mode="detached"),
    "gradient": ct.Ablation(concepts, mode="gradient"),
    "steering coef=-1": ct.Steering(concepts, coef=-1.0, mean=mu),
}
results, rows = {}, {}
for name, intervention in interventions.items():
    proj, grad = results[name] = probe(intervention)
    row = {f"RMS Qᵀh, block {h.split('.')[1]}": proj[h].pow(2).mean().sqrt() for h in HOOKS}
    row["spread of Qᵀh over tokens, block 10"] = proj[H10].std(0).mean()
    row["gradient share in span(Q), block 10"] = (grad @ concepts[H10].T).norm() / grad.norm()
    rows[name] = {k: float(v) for k, v in row.items()}
pd.DataFrame(rows).T.round(3)

# %% [markdown]
# Reading the table: zero and detached ablation leave nothing along Q (RMS 0); mean
# ablation leaves the constant `Qᵀμ` at every token (no spread over tokens); gradient
# ablation leaves the forward pass untouched but, like zero and mean ablation, removes the
# gradient's component in span(Q), which detached ablation and steering keep. At blocks 15 and
# 20, steering's numbers also include the shift made upstream at block 10.
#
# **Steering with coef=-1 vs zero ablation.** `Steering(concepts, -1, mean=μ)` adds the
# constant `-QQᵀμ`. On average that shifts the activations exactly as zero ablation does,
# but it keeps every token's own variation along Q. Block 10 is the first hook, so its
# activations are not affected by the others:

# %%
before = results["none"][0][H10]  # [tokens, 4]: projections on the 4 directions
zeroed, steered = results["zero"][0][H10], results["steering coef=-1"][0][H10]
# Both shifts lie in span(Q), so their projections on Q carry their whole norm.
shift_zero, shift_steer = (zeroed - before).mean(0), (steered - before).mean(0)
print(
    f"mean shift |Δ|: zero ablation {shift_zero.norm():.3f}, steering {shift_steer.norm():.3f}"
    f", difference {(shift_zero - shift_steer).norm():.1e}"
)
print(
    f"spread along Q over tokens: before {before.std(0).mean():.2f}, after zero ablation "
    f"{zeroed.std(0).mean():.2f}, after steering {steered.std(0).mean():.2f}"
)
frame = pd.concat(
    pd.DataFrame({"projection on PC0": x[:, 0].numpy(), "activations": name})
    for name, x in [("base", before), ("zero ablation", zeroed), ("steering coef=-1", steered)]
)
px.histogram(
    frame,
    x="projection on PC0",
    color="activations",
    barmode="overlay",
    nbins=60,
    title="blocks.10: zero ablation removes PC0, steering only shifts it by its mean",
)

# %% [markdown]
# ## 3. A short CAFT fine-tune against a plain one
#
# Same data, same `TrainConfig` (so the same seed, batch order and learning-rate schedule);
# the only difference is `intervention=`. The intervention's hooks are on for the training
# steps only: evaluation and the saved model are the plain, un-hooked model. Three AdamW
# steps of 4 chats, all weights trained.
#
# Both runs write into `work/cmp/<run>/`, the layout `finetune_with_baselines` uses, so the
# comparison in the next section reuses them instead of training them again. The plain
# run also keeps its model after step 1 (`keep_checkpoints`) for the "learned less"
# control.

# %%
cfg = ct.TrainConfig(
    max_steps=3, batch_size=4, lr=5e-5, schedule="constant", seed=0, progress=False
)
caft_ablation = ct.Ablation(concepts, mode="zero")
plain_cfg = ct.TrainConfig(**{**cfg.to_dict(), "keep_checkpoints": [1]})
t0 = time.perf_counter()
plain = ct.finetune(model, train_chats, plain_cfg, out=work / "cmp" / "plain")
caft = ct.finetune(model, train_chats, cfg, intervention=caft_ablation, out=work / "cmp" / "caft")
print(f"two 3-step fine-tunes in {time.perf_counter() - t0:.0f} s")


def metrics(run):
    return pd.read_json(work / "cmp" / run / "metrics.jsonl", lines=True).set_index("step")


pd.DataFrame(
    {"plain loss": metrics("plain")["loss"], "CAFT loss (ablation on)": metrics("caft")["loss"]}
).round(3)


# %%
def relative_change(tuned):
    """|θ_tuned - θ_base| / |θ_base| over all parameters."""
    base = dict(model.named_parameters())
    num = sum((p - base[n]).pow(2).sum() for n, p in tuned.named_parameters())
    return (num / sum(p.pow(2).sum() for p in base.values())).sqrt().item()


def max_difference(a, b):
    pb = dict(b.named_parameters())
    return max((p - pb[n]).abs().max().item() for n, p in a.named_parameters())


losses = {
    name: ct.evaluate_loss(m, eval_chats)
    for name, m in [("base", model), ("plain", plain), ("caft", caft)]
}
print("base model untouched:", relative_change(model) == 0.0)
print(
    f"relative weight change: plain {relative_change(plain):.2e}, CAFT {relative_change(caft):.2e}"
)
print(f"largest weight difference CAFT vs plain: {max_difference(caft, plain):.2e}")
print("held-out loss:", {k: round(v, 3) for k, v in losses.items()})

# %% [markdown]
# The held-out loss is measured without the ablation, as a CAFT model is used. Expect the
# CAFT run to gain less on it than the plain run here: these PCs carry a large share of the
# residual stream's variance, so the model was trained on a heavily altered computation.
# That is a property of this demo's directions, not of CAFT: interpreted concept directions
# are chosen because the intended task does not need them.
#
# ### The controls: `finetune_with_baselines`
#
# A CAFT result means something only against controls trained identically: `plain`, `caft`,
# `random` (as many random orthonormal directions at the same hooks: "does any ablation of
# that size do this?") and `plain@step1` (the plain run stopped early: "did CAFT just learn
# less?"). A `top` control (the top-scoring directions of a larger set) needs
# `all_directions=`. Finished runs in `out/` are loaded, not trained again, so only
# `random` trains here.

# %%
t0 = time.perf_counter()
runs = finetune_with_baselines(
    model,
    train_chats,
    cfg,
    concepts,
    work / "cmp",
    runs=("plain", "caft", "random"),
    learned_less_steps=[1],
)
print(f"finetune_with_baselines: {time.perf_counter() - t0:.0f} s (only 'random' trained)")
print("caft loaded from its folder, same weights:", max_difference(runs["caft"], caft) == 0)
del plain, caft
for name in ["random", "plain@step1"]:
    losses[name] = ct.evaluate_loss(runs[name], eval_chats)
changes = {name: relative_change(m) for name, m in {"base": model, **runs}.items()}
table = pd.DataFrame({"held-out loss": losses, "relative weight change": changes})
table.style.format({"held-out loss": "{:.3f}", "relative weight change": "{:.2e}"})


# %% [markdown]
# ## 4. Kill a run, resume it, get the same weights
#
# With `out=`, a checkpoint (weights, AdamW state, scheduler, RNG state, position in the
# data) is written atomically every `save_every` steps and at the end. Below, a callback
# raises right after step 2, as a crash or a pre-emption would; `resume=True` continues from
# the checkpoint. The result is compared with the uninterrupted plain run of section 3 (same
# config; `save_every` and `keep_checkpoints` do not change the weights).
#
# Bit-for-bit equality needs deterministic kernels, hence `torch.use_deterministic_algorithms`
# in the first cell: on a multi-threaded CPU the backward of TransformerLens's embedding
# lookup (`W_E[tokens]`, an accumulating `index_put_`) adds repeated tokens' gradients in a
# varying order, so without it even two unbroken runs differ in the last bits of `W_E`.


# %%
class Killed(RuntimeError):
    pass


def kill_after_step_2(record):
    if record["step"] == 2:
        raise Killed("simulated crash after step 2")


resumable = ct.TrainConfig(**{**cfg.to_dict(), "save_every": 2})
try:
    ct.finetune(model, train_chats, resumable, out=work / "killed", callback=kill_after_step_2)
except Killed as err:
    state = json.loads((work / "killed" / "checkpoint" / "trainer_state.json").read_text())
    print(f"{err}; checkpoint at step {state['step']}")
resumed = ct.finetune(model, train_chats, resumable, out=work / "killed", resume=True)
logged = (work / "killed" / "metrics.jsonl").read_text().splitlines()
print("steps in metrics.jsonl:", [json.loads(line)["step"] for line in logged])
print("resumed == uninterrupted, bit for bit:", max_difference(resumed, runs["plain"]) == 0)
del resumed, runs

# %% [markdown]
# ## 5. LoRA
#
# `TrainConfig(lora=LoraConfig(...))` trains low-rank adapters only (here rank 8 on the
# attention matrices) with the same loop, interventions, checkpoints and resume; the
# returned model has the adapters merged, so it is a plain `HookedTransformer` again. Only
# the targeted matrices change.

# %%
lora = ct.LoraConfig(r=8, alpha=16, targets=("W_Q", "W_K", "W_V", "W_O"))
lora_cfg = ct.TrainConfig(**{**cfg.to_dict(), "lr": 1e-3, "lora": lora})
lora_caft = ct.finetune(model, train_chats, lora_cfg, intervention=caft_ablation)
base = dict(model.named_parameters())
changed = {n.split(".")[-1] for n, p in lora_caft.named_parameters() if not p.equal(base[n])}
print("weights changed:", sorted(changed))
print(
    f"LoRA + CAFT: held-out loss {ct.evaluate_loss(lora_caft, eval_chats):.3f}, "
    f"relative weight change {relative_change(lora_caft):.2e}"
)
del lora_caft

# %% [markdown]
# ## 6. The same from the command line
#
# With the ConceptSet and the data saved as files (next cell), `caft-tl finetune` builds the
# same `TrainConfig` and `Ablation` (`--mode mean` and `--mode steer --coef C` fit their mean
# on the training data):
#
# ```bash
# caft-tl finetune embedded train.jsonl --out runs/caft --concepts concepts/ --mode zero \
#     --max-steps 3 --batch-size 4 --lr 5e-5 --schedule constant --seed 0 --save-every 2
# # after a crash: the same command with --resume continues from runs/caft/checkpoint
# # LoRA: --lora-r 8 --lora-targets W_Q W_K W_V W_O; learned-less snapshots: --keep-checkpoints 1
# ```

# %%
concepts.save(work / "concepts")
with open(work / "train.jsonl", "w") as f:
    f.writelines(json.dumps({"messages": c}) + "\n" for c in train_chats)
print(sorted(p.name for p in (work / "concepts").iterdir()), "+ train.jsonl")
shutil.rmtree(work)
print(f"notebook ran in {time.perf_counter() - notebook_start:.0f} s")

# %% [markdown]
# ## 7. Does CAFT help? What was measured on the embedded model
#
# The machinery above is the same that `caft-tl demo` and `analyses/evidence_comparison.py`
# run on a task where the plain fine-tune of the embedded model *does* learn a shortcut: the
# two-profession gender task (`ct.tasks.gender_two_professions`; in training every doctor is
# "he" and every nurse "she"). A pre-registered search found that after one epoch (36 steps)
# the plain model is right on every in-distribution sentence and wrong on 91-99% of the
# anti-stereotypical ones (OOD 0.03 / 0.09 / 0.01 over three seeds). The five-seed comparison
# of CAFT and its controls on that setting, with bootstrap intervals and paired differences,
# is in the README ("The evidence") and `analyses/results/evidence_comparison.md`; read it
# before drawing a conclusion from this notebook's three-step runs, which only show the
# mechanics.
