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
# # Spurious correlations: the built-in tasks, multiple-choice evaluation, a small CAFT study
#
# CAFT's toy settings are multiple-choice tasks where the training data holds a spurious cue:
#
# - **gender pronoun**: pick the grammatical pronoun; in training the profession's gender
#   stereotype always agrees with the correct pronoun, out of distribution (OOD) it never does.
#   With two professions only (doctor / nurse, the CAFT paper's design) the embedded model
#   learns the shortcut: that is the demo's task;
# - **double multiple choice**: two questions side by side with combined options; in training
#   both correct answers sit in the same option, OOD they do not, and the model must follow the
#   intended (first) question.
#
# This notebook shows the generated data (`ct.tasks`, offline and deterministic by seed), scores
# the embedded SmolLM2-135M-Instruct with `ct.evals.multiple_choice`, and runs the study of
# `caft-tl demo` **at a tiny size** (one seed, a few steps) so that it executes in CI in a few
# minutes. The numbers of the full comparison (five seeds) are in the README; the numbers below
# only show the mechanics.

# %%
import time
import warnings
from pathlib import Path

import pandas as pd
import torch

import caft_tl as ct
from caft_tl.demo import DemoConfig, run_demo, summary_table
from caft_tl.viz import accuracy_figure

warnings.filterwarnings("ignore", category=DeprecationWarning)
torch.set_num_threads(min(2, torch.get_num_threads()))  # as timed; OMP_NUM_THREADS can lower it
notebook_start = time.perf_counter()
model = ct.load_model(device="cpu")

# %% [markdown]
# ## 1. The gender-pronoun task
#
# Each row is a prompt, the correct option and the options, plus metadata. Row *i* of `test`
# and of `ood` is the same held-out sentence with the pronoun's gender flipped; training
# sentences come from other templates.

# %%
test = ct.tasks.gender_pronoun("test", n=40)
ood = ct.tasks.gender_pronoun("ood", n=40)
print(test[0]["prompt"], test[0]["answer"], sep="")
print()
print(ood[0]["prompt"], ood[0]["answer"], sep="")
columns = ["profession", "stereotype", "pronoun", "distractor", "case", "answer"]
pd.DataFrame(test.select(range(6)))[columns]

# %% [markdown]
# ### The two-profession design
#
# With one profession per gender (`ct.tasks.gender_two_professions`, doctor and nurse by
# default), one word predicts the pronoun's gender in every training row. A pre-registered
# search (`analyses/evidence_search.py`) fine-tuned the embedded model on this and other
# candidate tasks and kept every result; a setting qualifies when the plain fine-tune reaches
# ID >= 0.90 and OOD <= 0.30 over three seeds. Its table ships with the package:

# %%
from caft_tl.viz import search_table

train2 = ct.tasks.gender_two_professions("train")
print(len(train2), "training rows, e.g.:")
print(train2[0]["prompt"], train2[0]["answer"], sep="")
search = search_table()
print(
    "criterion:",
    search["criterion"],
    "| pick:",
    search["chosen"]["candidate"],
    search["chosen"]["epochs"],
    "epoch(s)",
)
cols = ["candidate", "epochs", "steps", "mean_id", "mean_ood", "verdict"]
pd.DataFrame(search["settings"])[cols].round(3)

# %% [markdown]
# The reference's format answers with a letter. A 135M model does not bind answers to letters
# (below, and it stays at chance after a short fine-tune: see the README), so the tasks also
# offer the options as words: `answer_format="pronoun"` here, `"word"` for double multiple
# choice.

# %%
test_words = ct.tasks.gender_pronoun("test", n=40, answer_format="pronoun")
print(test_words[0]["prompt"], test_words[0]["answer"], sep="")
rows = []
for fmt, data in [("letter", test), ("pronoun", test_words)]:
    r = ct.evals.multiple_choice(model, data)
    keys = ("accuracy", "vocab_accuracy", "option_mass", "n")
    rows.append({"format": fmt, **{k: r[k] for k in keys}})
pd.DataFrame(rows).set_index("format").round(3)

# %% [markdown]
# `accuracy` compares the options' logits; `vocab_accuracy` asks for the correct option to be
# the argmax over the whole vocabulary (the reference's measure); `option_mass` is the
# probability the model puts on the options at all. Per-example results come back with
# `return_examples=True`, e.g. to split accuracy by case and stereotype:

# %%
r = ct.evals.multiple_choice(model, test_words, return_examples=True)
r["examples"].groupby(["case", "stereotype"])[["correct", "margin"]].mean().round(3)

# %% [markdown]
# ## 2. Double multiple choice
#
# Four sub-tasks (sentiment, subject-verb agreement, pronoun gender, country to continent) and
# every ordered pair of them. The intended question comes first.

# %%
print(ct.tasks.SUBTASKS)
for split in ("train", "ood"):
    row = ct.tasks.double_mc("sentiment", "verbs", split, n=4, answer_format="word")[0]
    print(f"--- {split}: answer {row['answer']!r}, distractor's pick {row['distractor_answer']!r}")
    print(row["prompt"])
pairs = ct.tasks.double_mc_pairs()
print(len(pairs), "ordered pairs, e.g.", pairs[:3])

# %%
rows = []
for sub in ct.tasks.SUBTASKS:
    data = ct.tasks.single_mc(sub, "test", n=40, answer_format="word")
    r = ct.evals.multiple_choice(model, data)
    rows.append({"sub-task": sub, "accuracy": r["accuracy"], "n": r["n"]})
pd.DataFrame(rows).set_index("sub-task").round(3)

# %% [markdown]
# ## 3. A tiny CAFT study
#
# `run_demo` is what `caft-tl demo` runs: base accuracy, plain fine-tunes, PCA of activation
# differences, selection of the directions that separate sentences about women from the same
# sentences about men better than random directions do (never task or OOD data), CAFT
# fine-tunes with the selected directions ablated, the random-direction and top-PC controls,
# the plain model with CAFT's ablation at test time only (`plain+ablate-pca`), the CAFT model
# with its ablation kept on (`caft-pca+hook`), and a report. Here, on the two-profession task:
# one seed, 5 steps of 4 examples, 40 evaluation examples per split, 30 random directions in
# the null. Every artefact lands in `out/` (`runs/04-spurious-correlations/` beside the
# notebook); running the notebook again reuses them, and deleting the folder starts afresh.

# %%
out = Path("runs") / "04-spurious-correlations"
cfg = DemoConfig(
    task="gender2:doctor|nurse",
    seeds=[0],
    n_train=80,
    n_eval=40,
    max_steps=5,
    batch_size=4,
    lr=5e-5,
    warmup_steps=1,
    schedule="constant",
    learned_less_step=None,
    test_time=True,
    n_direction_prompts=40,
    n_chat_prompts=40,
    n_hint_pairs=60,
    n_null=30,
)
results = run_demo(out, cfg, model=model)
summary_table(results)

# %%
accuracy_figure(results, title="Tiny study (1 seed, 5 steps): mechanics only")

# %% [markdown]
# Which principal components were selected, and how well each separates the gender contrast
# sets: the share of matched pairs ("She ..." / "He ...") whose female sentence projects
# higher (0.5 = not at all). Random directions separate such pairs too (gender is written all
# over the residual stream), so a direction is selected only when its separation beats that of
# every one of the 30 random directions at its hook (`threshold`):

# %%
d = results["directions"]["pca"]
print("selected:", d["selected"], "(fallback)" if d["fallback"] else "")
pd.DataFrame(d["scores"]).sort_values("separation", ascending=False).head(8)[
    ["hook", "label", "auroc", "separation", "threshold"]
].round(3)

# %% [markdown]
# `report.html` in `out/` holds the same table and figures plus the selected directions' logit
# lens and shaded top examples, in one file that needs no network.

# %%
print(sorted(p.name for p in out.iterdir()))
print(f"report: {(out / 'report.html').stat().st_size / 1e6:.1f} MB")
print(f"notebook ran in {time.perf_counter() - notebook_start:.0f} s")
