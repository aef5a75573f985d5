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
# # Steering vs ablation: what does zero-ablation do besides removing a concept?
#
# CAFT projects concept directions out of the activations: `h <- h - Q Q^T h`. The residual
# stream has no preferred origin, so this does two things at once:
#
# - it **removes** the variation along the directions (the model cannot read or learn through
#   them), and
# - it **shifts** every activation by `-Q Q^T h`, on average `-Q Q^T mu`: a steering vector.
#
# Before trusting a CAFT result you want to know which of the two it rests on. This notebook
# answers four questions with `ct.diagnostics` on the embedded SmolLM2-135M-Instruct and the
# gender-pronoun task, with the directions the demo selects:
#
# 1. where zero-ablation moves the model (projections, a concept probe, SAE latents);
# 2. ablation vs steering by `c x mean projection`, with no training;
# 3. whether zero-ablation acts like positive or negative steering, and by which coefficient;
# 4. which half of CAFT does the work in training: the activation change (detached) or the
#    gradient projection, against steering with `±k x mean projection`.
#
# The same four answers come from the command line: `caft-tl diagnose all CONCEPTS --probe
# --train`. Sizes here are small so that the notebook runs in CI in a few minutes; the
# full-size numbers are in the README.

# %%
import os
import time
import warnings
from pathlib import Path

import torch

import caft_tl as ct
from caft_tl.demo import DemoConfig, demo_concepts
from caft_tl.diagnostics import (
    ablation_shift,
    decomposition_figure,
    decomposition_table,
    diagnostics_report,
    sign_sentences,
    steering_vs_ablation,
    training_decomposition,
)

warnings.filterwarnings("ignore", category=DeprecationWarning)
torch.set_num_threads(min(2, torch.get_num_threads()))  # as timed; OMP_NUM_THREADS can lower it
notebook_start = time.perf_counter()
base = ct.load_model(device="cpu")
# Runs, directions and the report land here; running the notebook again reuses the runs.
out = Path("runs") / "05-steering-vs-ablation"

# %% [markdown]
# ## The demo's ConceptSet
#
# If you have run `caft-tl demo`, its selected directions are in `caft-demo/concepts/pca` (set
# `CAFT_DEMO` to another folder). Otherwise `demo_concepts` runs only the demo's concept
# finding (a plain fine-tune, PCA of the activation differences at blocks 6/12/18/24, hinted
# selection against random directions) at a tiny size.

# %%
demo = Path(os.environ.get("CAFT_DEMO", "caft-demo")) / "concepts" / "pca"
if demo.exists():
    concepts = ct.ConceptSet.load(demo)
else:
    cfg = DemoConfig.quick(
        n_train=48,
        max_steps=6,
        batch_size=4,
        n_direction_prompts=24,
        n_chat_prompts=24,
        n_hint_pairs=40,
        n_null=20,
        k_pcs=8,
    )
    concepts = demo_concepts(out / "demo", cfg, model=base)
print(concepts)
print(concepts.labels)

# %% [markdown]
# ## 1. Where ablation moves the model
#
# `ablation_shift` runs the base model with and without zero-ablation and reports, for each
# direction, its mean projection clean, entering its own hook (with earlier hooks already
# ablated: `upstream`) and after (0 by construction). `change_sd` is the change in units of the
# direction's natural spread: a shift of several standard deviations is a strong steer. A
# probe, here the female-minus-male difference of means on matched sentence pairs
# (`ct.directions.mean_difference`), shows whether the ablation pushes the model towards one
# gender. Pass `saes=` (SAE-Lens SAEs) to see which SAE latents it pushes up and down.

# %%
ood = ct.tasks.gender_pronoun("ood", n=32, answer_format="pronoun")
hints = ct.tasks.gender_contrast(n=60)
probe_hooks = [f"blocks.{layer}.hook_resid_post" for layer in (6, 12, 18, 24)]
probe = ct.directions.mean_difference(
    base, hints["female"], hints["male"], probe_hooks, label="female-male"
)
shift = ablation_shift(base, concepts, ood, probes=probe)
columns = ["kind", "hook", "label", "clean", "upstream", "ablated", "change", "change_sd"]
shift.table[columns].round(3)

# %%
shift.figure()

# %% [markdown]
# ## 2. Ablation vs steering, no training
#
# `steering_vs_ablation` measures the task behaviour (the correct pronoun's logit minus the
# other's, accuracy, KL from the unablated model at the answer position) under zero-ablation,
# mean-ablation (`h - Q Q^T (h - mu)`: removal without the average shift) and steering by
# `c x Q Q^T mu` for a sweep of `c`, for each direction alone and all together. Zero-ablation
# is drawn at `c = -1`, the steering that reproduces its average shift, and mean-ablation at
# `c = 0`: a marker on its curve means the ablation does what its shift does.

# %%
sweep = steering_vs_ablation(base, concepts, ood, coefs=[-3, -1, 0, 3])
sweep.figure()

# %% [markdown]
# ## 3. Sign report
#
# For each direction set: zero-ablation's change in the logit difference (with a standard
# error paired by example), the steering coefficient that gives the same change, and how much
# of the change the average shift alone reproduces.

# %%
report = sweep.sign_report()
for sentence in sign_sentences(report):
    print("-", sentence)
report.round(3)

# %% [markdown]
# ## 4. Training decomposition
#
# The same fine-tune with no intervention, zero-ablation (CAFT), its activation-only half
# (`detached`: `h - stopgrad(Q Q^T h)`), its gradient-only half (`gradient`: forward unchanged,
# backward `g - Q Q^T g`) and steering by `±3 x` the base model's mean projection. Here one
# seed, 3 steps of 4 examples and 16 examples per split (mechanics only: too few to learn
# anything); `analyses/decomposition_study.py` runs the full size (3 seeds, 30 steps, k = 3
# and 5).

# %%
train = ct.tasks.gender_pronoun("train", n=32, answer_format="pronoun")
splits = {s: ct.tasks.gender_pronoun(s, n=16, answer_format="pronoun") for s in ("test", "ood")}
train_cfg = ct.TrainConfig(max_steps=3, lr=5e-5, batch_size=4, warmup_steps=1, progress=False)
results = training_decomposition(
    base, train, concepts, splits, train_cfg, out / "decomposition", seeds=[0], ks=[3.0]
)
decomposition_table(results).round(3)

# %%
decomposition_figure(results, title="Training decomposition (1 seed, 3 steps: mechanics only)")

# %% [markdown]
# Everything above in one self-contained HTML page (the CLI writes the same page):

# %%
page = diagnostics_report(
    out / "report.html",
    shift=shift,
    sweep=sweep,
    decomposition=results,
    title="Steering vs ablation on the gender task",
)
print(f"{page}: {page.stat().st_size / 1e6:.1f} MB")
print(f"notebook ran in {time.perf_counter() - notebook_start:.0f} s")
