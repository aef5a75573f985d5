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
# # Model diffing with crosscoders: which concepts did fine-tuning introduce?
#
# PCA of activation differences and SAE latents are two ways to find the directions CAFT
# ablates. A **crosscoder** is the third: one sparse dictionary over the base and the fine-tuned
# model's activations at the same tokens, with a decoder per model. A latent whose base decoder
# is (nearly) zero is a candidate for something the fine-tune introduced.
#
# Candidates are not findings. The classic L1 crosscoder pays a penalty for every decoder's
# norm, so a concept present in both models but a little stronger after fine-tuning is cheaper
# with its base decoder at zero (**complete shrinkage**); and a concept can also look new when
# other latents reconstruct it in the base model (**latent decoupling**). Two fixes, both here:
#
# - **BatchTopK** training (no decoder-norm penalty: the `k x batch` largest decoder-norm-weighted
#   activations of a batch are kept);
# - **Latent Scaling**: for each candidate, closed-form scalars `beta` that say how much of the
#   base model's reconstruction (`nu_r`) and of its error (`nu_eps`) the latent's direction
#   explains, relative to the fine-tuned model. Genuinely new latents have both ratios near 0.
#
# This notebook diffs the embedded SmolLM2-135M-Instruct against a plain fine-tune on the
# gender-pronoun task, selects the genuinely new latents and hands them to CAFT. Sizes are small
# so it runs in CI in a few minutes; `analyses/crosscoder_study.py` is the full-size version and
# its numbers are in the README. The same steps on the command line:
# `caft-tl crosscoder train BASE FINETUNED DATA --hook H --out RUN` then
# `caft-tl crosscoder diff RUN --out DIR`.

# %%
import os
import tempfile
import time
import warnings
from pathlib import Path

import plotly.express as px
import torch

import caft_tl as ct
from caft_tl.directions import (
    CrosscoderConfig,
    DiffThresholds,
    diff_crosscoder,
    latent_examples,
    train_crosscoder,
)

warnings.filterwarnings("ignore", category=DeprecationWarning)
torch.set_num_threads(min(2, torch.get_num_threads()))  # as timed; OMP_NUM_THREADS can lower it
notebook_start = time.perf_counter()
# A new folder under runs/ each time: activations stream into fresh shards.
Path("runs").mkdir(exist_ok=True)
out = Path(tempfile.mkdtemp(prefix="06-crosscoder-", dir="runs"))
HOOK = "blocks.12.hook_resid_post"
base = ct.load_model(device="cpu")

# %% [markdown]
# ## The two models
#
# If you have run `caft-tl demo`, its plain seed-0 fine-tune is in `caft-demo/runs/s0/plain/final`
# (set `CAFT_DEMO` to another folder). Otherwise a few steps of plain fine-tuning stand in for it
# (a larger learning rate than the demo's, so that a short run still moves the activations).

# %%
train = ct.tasks.gender_pronoun("train", n=96, answer_format="pronoun")
demo = Path(os.environ.get("CAFT_DEMO", "caft-demo")) / "runs" / "s0" / "plain" / "final"
if demo.exists():
    finetuned = ct.load_model(demo, device="cpu")
else:
    cfg = ct.TrainConfig(max_steps=12, lr=1e-4, batch_size=8, warmup_steps=2, progress=False)
    finetuned = ct.finetune(base, train, cfg)

# %% [markdown]
# ## Paired activations
#
# Both models read the same tokens: the task's training prompts, generic chat prompts and
# matched female / male sentences. `activation_diff(..., return_both=True, out=...)` streams
# both sides to disk shards, row for row; the crosscoder trains from those shards.

# %%
from caft_tl.data import chat_to_text

chats = ct.tasks.chat_prompts(n=80)["messages"]
contrast = ct.tasks.gender_contrast(n=60)
texts = (
    [p + a for p, a in zip(train["prompt"], train["answer"], strict=True)]
    + [chat_to_text(m, base.tokenizer, add_generation_prompt=True) for m in chats]
    + contrast["female"]
    + contrast["male"]
)
pairs = ct.activation_diff(base, finetuned, texts, HOOK, return_both=True, out=out / "acts")
print(pairs.base)

# %% [markdown]
# ## Train a BatchTopK crosscoder (and an L1 one to compare)
#
# Each model's activations are scaled to mean norm `sqrt(d_model)`; the first token of every
# example (an attention sink with a huge norm) is left out. `out=` makes the run resumable: a
# checkpoint is written atomically every `checkpoint_every` steps, and `resume=True` continues
# a killed run to the same weights. The training log records each model's fraction of
# variance unexplained (FVU), the active latents per row (L0) and the dead fraction.

# %%
common = dict(
    n_latents=1152,
    training_tokens=80_000,
    batch_size=512,
    lr=5e-4,
    warmup_steps=10,
    dead_tokens=20_000,
    checkpoint_every=50,
)
cc = train_crosscoder(
    out / "acts", CrosscoderConfig(architecture="batchtopk", k=16, **common), out=out / "btk"
)
l1 = train_crosscoder(
    out / "acts", CrosscoderConfig(architecture="l1", l1_coefficient=1.0, **common), out=out / "l1"
)
log = [{**r, "crosscoder": "batchtopk"} for r in cc.meta["log"]]
log += [{**r, "crosscoder": "l1"} for r in l1.meta["log"]]
px.line(
    log,
    x="step",
    y="fvu_finetuned",
    color="crosscoder",
    height=320,
    title="Fine-tuned model's FVU while training",
)

# %% [markdown]
# ## Which latents are new? Decoder norms and Latent Scaling
#
# `diff_crosscoder` makes one pass over the paired activations. Per latent: both decoder
# norms, the relative norm (0 base-only, 0.5 shared, 1 fine-tune-only), the class from
# `DiffThresholds`, activity, the four Latent Scaling betas, `nu_r` and `nu_eps`, and the flags
# `complete_shrinkage`, `latent_decoupling` and `genuine`. Each model's FVU is in `meta`.

# %%
diff = diff_crosscoder(cc, out / "acts")
diff_l1 = diff_crosscoder(l1, out / "acts")
print("BatchTopK:", diff, "FVU", {k: round(v, 3) for k, v in diff.meta["fvu"].items()})
print("L1:       ", diff_l1, "FVU", {k: round(v, 3) for k, v in diff_l1.meta["fvu"].items()})
diff.summary()

# %%
diff_l1.summary()

# %%
diff.norm_figure()

# %%
diff_l1.nu_figure(title="L1 crosscoder: Latent Scaling of its fine-tune-only latents")

# %%
diff.kept_figure()

# %% [markdown]
# ## Select the genuine fine-tune-only latents
#
# `diff.genuine()` lists them (most frequent first). At this tiny size there may be none: a
# short fine-tune changes little, and a crosscoder trained on 80k rows is rough. Then we say so
# and, for the rest of the walk-through only, relax the thresholds with `with_thresholds`
# (the classes are recomputed from the saved table; no pass over the data).

# %%
chosen = diff
if diff.table["genuine"].sum() == 0:
    print("no genuine fine-tune-only latent at the default thresholds; relaxing them")
    chosen = diff.with_thresholds(DiffThresholds(finetuned_only=0.7, max_nu_eps=0.5, max_nu_r=0.8))
if chosen.table["genuine"].sum() == 0:
    print("still none: using the latents with the highest relative norm, for illustration")
    live = chosen.table[chosen.table["n_active"] > 0]
    top = live.sort_values("rel_norm", ascending=False)["latent"].head(4).tolist()
    concepts = chosen.concepts(cc, latents=top, by="rel_norm")
else:
    concepts = chosen.concepts(cc, top=4)
columns = ["latent", "rel_norm", "frequency", "nu_eps", "nu_r", "genuine"]
print(concepts)
chosen.table.set_index("latent").loc[
    [int(label.split()[1]) for label in concepts.labels[HOOK]], columns[1:]
]

# %% [markdown]
# ## What do they respond to?
#
# `latent_examples` finds the rows where each latent fires most (by its crosscoder activation)
# and shows the context, the firing token marked `[[ ]]`. For a full page with logit lens and
# shaded examples, `ct.directions.report_html(finetuned, concepts, texts, "page.html")` works on
# crosscoder ConceptSets as on PCA and SAE ones.

# %%
latents = [int(label.split()[1]) for label in concepts.labels[HOOK]]
latent_examples(cc, out / "acts", latents, base, k=3)

# %%
ct.directions.logit_lens(finetuned, concepts, k=8)

# %% [markdown]
# ## Hand them to CAFT
#
# The ConceptSet holds the fine-tuned decoder directions at the crosscoder's hook; CAFT
# projects them out while fine-tuning the base model again. Here only a few steps, to show
# the wiring; the comparison with plain fine-tuning over seeds is `ct.compare` /
# `caft-tl demo`.

# %%
ablation = ct.Ablation(concepts.orthonormalised(), mode="zero")
cfg = ct.TrainConfig(max_steps=4, lr=1e-4, batch_size=8, progress=False)
caft = ct.finetune(base, train, cfg, intervention=ablation)
ood = ct.tasks.gender_pronoun("ood", n=32, answer_format="pronoun")
print("CAFT (4 steps), OOD:", ct.evals.multiple_choice(caft, ood)["accuracy"])
print("fine-tuned model, OOD:", ct.evals.multiple_choice(finetuned, ood)["accuracy"])
print(f"notebook ran in {time.perf_counter() - notebook_start:.0f} s")
