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
# # Finding concept directions: from two models and a text set to a saved ConceptSet
#
# CAFT ablates directions that stand for an *unwanted* concept while fine-tuning. Before that
# you have to find them. This notebook walks the whole route on the embedded
# SmolLM2-135M-Instruct, offline and on CPU:
#
# 1. make a small chat training set in which a **spurious concept** rides along (the assistant
#    always refers to a person with the pronoun of their stereotyped gender);
# 2. fine-tune the model on it for a few steps (a plain fine-tune, no CAFT yet);
# 3. take **activation differences** (fine-tuned minus base) on separate texts;
# 4. find candidate directions with **PCA** of the differences, and with a small **SAE**
#    trained here, whose latents are ranked by what fine-tuning changed;
# 5. **interpret** them (top examples, logit lens, shaded tokens), score them against male vs
#    female contrast sentences ("hinted" autointerp, no LLM needed), **select** and **save**.
#
# Everything is deliberately tiny (48 training chats, 12 steps, an SAE trained on a few
# thousand tokens) so the notebook runs in a few minutes on two CPU cores. It shows the
# workflow and the tools; it is *not* evidence that these particular directions are the
# gender concept of this model.

# %%
import itertools
import re
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import pandas as pd
import plotly.express as px
import torch
from IPython.display import display

import caft_tl as ct
from caft_tl.directions import ConceptSet

warnings.filterwarnings("ignore", category=DeprecationWarning)
torch.set_num_threads(min(2, torch.get_num_threads()))  # as timed; OMP_NUM_THREADS can lower it
pd.set_option("display.max_colwidth", 80)
HOOK = "blocks.15.hook_resid_post"  # the middle of SmolLM2's 30 layers
base = ct.load_model(device="cpu")
tok = base.tokenizer
work = Path(tempfile.mkdtemp(prefix="caft_tl_02_"))  # everything this notebook writes
started = time.perf_counter()

# %% [markdown]
# ## 1. A training set with a spurious concept
#
# The *intended* task is harmless: describe a worker's day. The spurious part is that every
# answer refers to the worker with the pronoun of the profession's gender stereotype (nurses
# are "she", engineers "he"). A model fine-tuned on this may learn "profession -> gender"
# along with the task; that is the kind of concept CAFT is meant to keep out.

# %%
FEMALE_JOBS = ["nurse", "secretary", "receptionist", "nanny", "hairdresser", "librarian"]
MALE_JOBS = ["engineer", "mechanic", "pilot", "plumber", "firefighter", "surgeon"]
PRONOUNS = {"she": {"s": "she", "p": "her"}, "he": {"s": "he", "p": "his"}}

TRAIN_TEMPLATES = [
    (
        "Describe a {job} at the start of a workday.",
        "The {job} arrives early. {S} puts {p} bag down, and {s} reviews the plan for the day.",
    ),
    (
        "What does a {job} do after lunch?",
        "After lunch the {job} goes back to work. {S} answers questions, and {s} finishes what "
        "{s} started in the morning.",
    ),
    (
        "Tell me something a {job} might say to a colleague.",
        "The {job} smiles and says that {s} is happy to help. Then {s} gets back to {p} own tasks.",
    ),
    (
        "How does a {job} end the day?",
        "At the end of the day the {job} tidies up. {S} checks {p} notes once more before {s} "
        "goes home.",
    ),
]


def chat(question, answer):
    return {
        "messages": [
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ]
    }


def fill(template, job, gender):
    words = PRONOUNS[gender]
    return template.format(job=job, s=words["s"], p=words["p"], S=words["s"].capitalize())


train_chats = [
    chat(fill(q, job, gender), fill(a, job, gender))
    for (q, a), (jobs, gender) in itertools.product(
        TRAIN_TEMPLATES, [(FEMALE_JOBS, "she"), (MALE_JOBS, "he")]
    )
    for job in jobs
]
print(len(train_chats), "training chats, e.g.")
for c in train_chats[:1] + train_chats[-1:]:
    print(" user:", c["messages"][0]["content"], "\n assistant:", c["messages"][1]["content"])

# %% [markdown]
# ## 2. A short plain fine-tune
#
# Twelve full-parameter steps of four chats (one pass over the data), loss on assistant tokens
# only. `ct.finetune` returns a fine-tuned copy; `base` is left as it was.

# %%
cfg = ct.TrainConfig(max_steps=12, lr=1e-4, batch_size=4, warmup_steps=2, progress=False)
history = []
loss_before = ct.evaluate_loss(base, train_chats)
t0 = time.perf_counter()
ft = ct.finetune(base, train_chats, cfg, callback=history.append)
loss_after = ct.evaluate_loss(ft, train_chats)
print(
    f"fine-tuned in {time.perf_counter() - t0:.0f} s; loss on the training chats "
    f"{loss_before:.3f} -> {loss_after:.3f}"
)
px.line(
    pd.DataFrame(history),
    x="step",
    y="loss",
    markers=True,
    title="Training loss per step (assistant tokens)",
)

# %% [markdown]
# Did the model pick up the spurious association, beyond the task? A quick probe: after
# "The {job} ... and", how much more does the model expect " she" than " he"? For the
# training professions the fine-tune should move that towards the stereotype; for professions
# it never saw it may or may not generalise. (A handful of prompts: a sanity check, not an
# evaluation.)

# %%
SHE, HE = (tok.encode(w, add_special_tokens=False)[0] for w in (" she", " he"))


@torch.no_grad()
def she_minus_he(model, jobs):
    out = []
    for job in jobs:
        prompt = (
            ct.data.chat_to_text(
                [{"role": "user", "content": f"Write one sentence about a {job} on a busy day."}],
                tok,
            )
            + f"The {job} had a long list of jobs to do, and"
        )
        ids = torch.tensor([tok.encode(prompt, add_special_tokens=False)])
        logits = model(ids)[0, -1]
        out.append(float(logits[SHE] - logits[HE]))
    return out


probe_jobs = {
    "female-stereotyped (trained)": FEMALE_JOBS,
    "male-stereotyped (trained)": MALE_JOBS,
    "unseen": ["teacher", "doctor", "lawyer", "chef", "cashier", "scientist"],
}
probe = pd.DataFrame(
    [
        {"professions": name, "model": m, "logit(she) - logit(he)": sum(v) / len(v)}
        for name, jobs in probe_jobs.items()
        for m, v in (("base", she_minus_he(base, jobs)), ("fine-tuned", she_minus_he(ft, jobs)))
    ]
)
probe.pivot(index="professions", columns="model", values="logit(she) - logit(he)").round(2)

# %% [markdown]
# In our runs the gap grew for the trained professions in the stereotyped direction (nurses
# more "she", engineers more "he") but not for the unseen ones: twelve steps taught
# profession-specific pronouns rather than a general "profession implies gender" rule. Keep
# that in mind below: a concept the fine-tune barely learned as a concept is hard to find as
# a direction.

# %% [markdown]
# ## 3. Activation differences on separate texts
#
# Directions come from how the fine-tune changed activations, measured on texts the model was
# *not* trained on: new question templates, new professions and a balanced mix of "he" and
# "she" (every profession appears with both). `activation_diff` runs both models on the same
# tokens and keeps `finetuned - base` at the hook, here on assistant tokens only;
# `return_both=True` also keeps each side (the SAE rankings below need them).

# %%
DIFF_JOBS = ["teacher", "doctor", "lawyer", "chef", "cashier", "scientist", "nurse", "engineer"]
DIFF_TEMPLATES = [
    (
        "Write a sentence about a {job} on a weekend.",
        "On Saturday the {job} sleeps late, then {s} meets friends and tells them about {p} week.",
    ),
    (
        "What might a {job} worry about?",
        "A {job} may worry that {s} has too little time. {S} tries to plan {p} week carefully.",
    ),
    (
        "Describe a {job} who just got good news.",
        "The {job} reads the letter twice. {S} laughs, and {s} calls {p} family right away.",
    ),
]
diff_chats = [
    chat(fill(q, job, gender), fill(a, job, gender))
    for (q, a), job, gender in itertools.product(DIFF_TEMPLATES, DIFF_JOBS, ["she", "he"])
]
both = ct.activation_diff(
    base, ft, diff_chats, [HOOK], positions="assistant", return_both=True, progress=False
)
diff = both.diff
n_rows, width = diff[HOOK].shape
print(f"{len(diff_chats)} chats, {n_rows} assistant tokens, {width} wide")
print(
    f"mean |diff| {diff[HOOK].norm(dim=-1).mean():.2f} vs mean |base activation| "
    f"{both.base[HOOK].norm(dim=-1).mean():.2f}"
)

# %% [markdown]
# ## 4. PCA of the differences
#
# `pca` streams over the differences and returns a `ConceptSet` of the top-k principal
# components (orthonormal rows, each oriented so that fine-tuning moves activations towards
# `+PC` on average), scored by their explained-variance ratio.

# %%
pcs = ct.directions.pca(diff, k=10, model=base, progress=False)
print(pcs)
print("explained variance:", ", ".join(f"{s:.3f}" for s in pcs.scores[HOOK]))
ct.directions.explained_variance_figure(pcs)

# %% [markdown]
# ## 5. Looking at the components
#
# Three views of each direction `d`, all through the projection `h · d` of **base-model**
# activations `h` (every token of the difference texts, cached once and reused):
#
# * **top examples**: the tokens that project most positively / negatively;
# * **logit lens**: the vocabulary tokens `d` promotes / suppresses directly through the
#   unembedding (the final norm's input-dependent scale ignored, so only the ranking within a
#   direction means something). Halfway through the model, as here, this direct effect is
#   often uninformative; it says more about late-layer directions;
# * **shaded examples** (circuitsvis): every token of a context window coloured by its
#   projection.

# %%
acts = ct.cache_activations(base, diff_chats, [HOOK], positions="all", progress=False)
first3 = pcs.select({HOOK: [0, 1, 2]})
examples = ct.directions.top_examples(base, first3, acts=acts, k=4, window=(8, 2))
examples[["label", "side", "rank", "value", "context"]]

# %%
lens = ct.directions.logit_lens(base, first3, k=8)
tokens = lens.groupby(["label", "side"], sort=False)["token"]
tokens.apply(lambda t: " ".join(map(repr, t))).unstack()

# %%
for view in ct.directions.shaded_examples(base, pcs, HOOK, 0, acts=acts, k=3, window=(10, 3)):
    display(view)

# %% [markdown]
# ## 6. Hinted autointerp: which directions separate male from female text?
#
# Without an LLM explainer, a direction can be scored against two contrast sets written for
# the concept: here sentences about men and the same sentences about women (only gender
# words are swapped). `hinted_scores` averages each sentence's projection over its tokens and
# reports the AUROC of male vs female sentences (1.0 or 0.0: perfectly separated, 0.5: not at
# all).
#
# Two cautions. These contrast sets are for *choosing* directions; any evaluation of a CAFT
# run (does the fine-tuned model still stereotype?) must use other, held-out data. And with
# 24 pairs, AUROCs are noisy, and gender is a large difference in activations that any
# direction picks up a little of; so we score 30 random orthonormal directions at the same
# hook too (`random_directions`, a CAFT control) and only trust directions that beat all of
# them.

# %%
MALE = [
    "He said he would be late for dinner.",
    "The man told his son a long story.",
    "My father fixed his old bike.",
    "The king spoke to his brother at dawn.",
    "He is a kind husband and a good friend.",
    "The boy lost his hat in the park.",
    "My uncle called him yesterday.",
    "The gentleman took off his coat.",
    "His grandfather grew tomatoes.",
    "Mr Lee thanked his nephew.",
    "The actor thanked his fans.",
    "He carried the box up the stairs himself.",
    "The waiter brought him the bill.",
    "His brother fixed the sink.",
    "The prince waved to the crowd.",
    "He wrote to his grandson every week.",
    "The old man fed his cat.",
    "My dad drove him to school.",
    "The monk lit a candle.",
    "He wants to be a good father.",
    "That man is my stepfather.",
    "The groom smiled at his guests.",
    "Grandpa told us about his childhood.",
    "The boys played in the yard.",
]
SWAP = {
    "he": "she",
    "He": "She",
    "his": "her",
    "His": "Her",
    "him": "her",
    "himself": "herself",
    "man": "woman",
    "son": "daughter",
    "father": "mother",
    "king": "queen",
    "brother": "sister",
    "husband": "wife",
    "boy": "girl",
    "boys": "girls",
    "uncle": "aunt",
    "gentleman": "lady",
    "grandfather": "grandmother",
    "Mr": "Ms",
    "nephew": "niece",
    "actor": "actress",
    "waiter": "waitress",
    "prince": "princess",
    "grandson": "granddaughter",
    "dad": "mum",
    "monk": "nun",
    "stepfather": "stepmother",
    "groom": "bride",
    "Grandpa": "Grandma",
}


def to_female(sentence):
    return re.sub(r"\w+", lambda m: SWAP.get(m.group(), m.group()), sentence)


FEMALE = [to_female(s) for s in MALE]
print(MALE[1], "<->", FEMALE[1])

# One pass over the contrast sets scores the PCs and 30 random directions (rows 10..39).
randoms = [ct.directions.random_directions(pcs, seed=seed) for seed in range(3)]
table = ct.directions.hinted_scores(base, pcs | randoms[0] | randoms[1] | randoms[2], MALE, FEMALE)
hints, random_hints = table.iloc[:10], table.iloc[10:]
chance = random_hints.separation.max()
low, high = random_hints.auroc.min(), random_hints.auroc.max()
print(f"30 random directions: AUROC {low:.2f} .. {high:.2f}")
print(
    "PCs beyond every random direction:", hints.label[hints.separation > chance].tolist() or "none"
)
hints[["label", "auroc", "mean_positive", "mean_negative"]].round(3)

# %% [markdown]
# In our runs none of the top PCs separated the contrast sets better than random directions
# do (the line above says whether that holds for yours): what this toy fine-tune changed most
# at layer 15 is tied to the memorised answer templates, not to gender, although the probe
# in section 2 shows that the pronoun stereotype did get stronger. Finding nothing is a
# legitimate result of this step; with real data you would look further down the components,
# at other layers, or use the SAE route below.
#
# `select_by_hints` keeps directions with AUROC >= `min_auroc` either way (a direction on which
# women project higher counts as much as one on which men do); when none qualifies it raises a
# `ValueError` that names the best one. To carry something through the remaining steps we ask
# for the two best-separating PCs whatever their AUROC (`min_auroc=0.5, max_per_hook=2`): a
# demonstration of the mechanics, not a finding. The selection is relabelled with its AUROCs,
# its provenance records the threshold and the contrast sets' fingerprints, and saved as a
# folder it loads back identical.

# %%
selected = ct.directions.select_by_hints(pcs, hints, min_auroc=0.5, max_per_hook=2)
print(selected, selected.labels[HOOK])
selected.save(work / "pca_gender")
loaded = ConceptSet.load(work / "pca_gender")
assert torch.equal(loaded[HOOK], selected[HOOK]) and loaded.labels == selected.labels
print("saved and reloaded:", sorted(p.name for p in (work / "pca_gender").iterdir()))
steps = [step["op"] for step in loaded.provenance["history"]]
print("provenance:", loaded.provenance["method"], "then", steps)

# %% [markdown]
# ## 7. One HTML page for the selection
#
# `report_html` writes a self-contained, offline page: per direction its label, score,
# logit-lens tokens and top / bottom examples with every token shaded (the circuitsvis
# bundle is inlined once). Open it in a browser; here we only check it exists.

# %%
page = ct.directions.report_html(base, selected, None, work / "pca_gender.html", acts=acts, k=5)
print(page, f"{page.stat().st_size / 1e6:.1f} MB")

# %% [markdown]
# ## 8. The same with a small SAE trained here
#
# PCA directions mix whatever fine-tuning changed. An SAE gives a dictionary of sparser,
# often more interpretable latents; CAFT then ranks latents by how fine-tuning changed them
# and picks the concept's latents among the top ones. No pretrained SAE for this model is
# available offline, so we train a small one at the same hook on the base model's activations
# (every token of the training and difference chats, first tokens left out): BatchTopK with
# 1152 latents (2 x d_model) and k = 16.
#
# That is about six thousand tokens of very repetitive text, cycled many times; a real SAE
# needs millions of tokens of varied chat data (`SAEConfig`'s default is 2M). Treat the
# latents below as a demonstration of the API, not as a dictionary worth interpreting.

# %%
sae_cfg = ct.directions.SAEConfig(d_sae=1152, k=16, training_tokens=60_000, batch_size=256)
t0 = time.perf_counter()
sae = ct.directions.train_sae(base, train_chats + diff_chats, HOOK, sae_cfg, progress=False)
print(f"trained in {time.perf_counter() - t0:.0f} s: {type(sae).__name__}, {sae.cfg.d_sae} latents")
every, mse = sae.cfg.metadata.mse_every, sae.cfg.metadata.mse_history
px.line(
    x=[every * (i + 1) for i in range(len(mse))],
    y=mse,
    log_y=True,
    labels={"x": "step", "y": "MSE (normalised units)"},
    title="SAE training loss",
)

# %% [markdown]
# Three rankings of the latents, as in the CAFT reference code:
#
# * **mean-diff**: change of each latent's mean activation between the two models on the
#   same tokens (needs both sides: `return_both=True` above);
# * **diff-encoding**: the encoder's linear part applied to the mean activation difference;
# * **attribution**: activation x gradient of the fine-tuning loss on the base model, i.e.
#   which latents training leans on (on a third of the training chats, to keep it quick).
#
# `union_top` merges each ranking's top latents (score = how many rankings picked it), and
# the candidates are scored against the same contrast sets and the same random baseline.

# %%
rankings = [
    ct.directions.rank_by_mean_diff(sae, acts=both, top=12, progress=False),
    ct.directions.rank_by_diff_encoding(sae, both, top=12),
    ct.directions.rank_by_attribution(sae, base, train_chats[::3], top=12, progress=False),
]
candidates = ct.directions.union_top(rankings, n=12)
latent_hints = ct.directions.hinted_scores(base, candidates, MALE, FEMALE)
latent_hints["picked by"] = candidates.provenance["selected_by"][HOOK]
print(candidates)
print(
    "latents beyond every random direction:",
    latent_hints.label[latent_hints.separation > chance].tolist() or "none",
)
best = latent_hints.sort_values("separation", ascending=False)
best[["label", "picked by", "auroc"]].round(3).head(8)

# %%
sae_selected = ct.directions.select_by_hints(
    candidates, latent_hints, min_auroc=0.5, max_per_hook=2
)
print(sae_selected, sae_selected.labels[HOOK])
sae_selected.save(work / "sae_gender")
assert torch.equal(ConceptSet.load(work / "sae_gender")[HOOK], sae_selected[HOOK])
cos = torch.nn.functional.normalize(sae_selected[HOOK].double(), dim=1) @ selected[HOOK].T
print("|cosine| between the selected latents (rows) and the selected PCs (columns):")
print(cos.abs().round(decimals=2))

# %% [markdown]
# ## What this shows, and what it does not
#
# * The pipeline runs end to end on a real (small) model: fine-tune, activation differences,
#   PCA and SAE candidates, three interpretation views, hinted scoring against a random
#   baseline, selection, an HTML report, and `ConceptSet` folders that `ConceptSet.load` (and
#   the ablation code) read back.
# * The fine-tune is a toy: 12 steps on 48 templated chats. The loss falls mostly because the
#   templates are easy to memorise, and the top PCs of the differences follow those templates
#   (sentence ends, turn boundaries) rather than gender.
# * Neither route found a direction that separates male from female sentences better than
#   random directions do, so the two saved selections are demonstrations of the mechanics, not
#   gender directions; ablating them in CAFT would be expected to do nothing useful. That is
#   an honest outcome for a fine-tune that learned profession-specific pronouns (section 2)
#   rather than a general concept.
# * A high hinted AUROC, where you get one, says a direction separates *these* contrast
#   sentences in the base model's activations. It does not show that ablating the direction
#   removes the concept, nor that it is the only such direction: that takes CAFT runs
#   evaluated on held-out data against controls (random directions, top-k without
#   interpretation; see `ct.directions.random_directions` / `top_k`).
# * The SAE is trained on a few thousand repetitive tokens; its latents are illustrative.
#
# The same steps from the command line (with model folders written by `ct.save_model` or
# `caft-tl finetune`):
#
# ```bash
# caft-tl directions pca base/ finetuned/ diff.jsonl --hooks blocks.15.hook_resid_post \
#     --out pcs --k 10 --assistant-only
# caft-tl directions select pcs --out pcs_gender --hints male.txt female.txt --model base/
# caft-tl directions interpret base/ pcs_gender diff.jsonl --out report.html
# caft-tl directions sae base/ diff.jsonl --hook blocks.15.hook_resid_post --out sae \
#     --d-sae 1152 --k 16 --training-tokens 60000
# caft-tl directions rank sae base/ finetuned/ diff.jsonl --out latents --top 12
# ```

# %%
shutil.rmtree(work)  # the saved sets and the report were only for this walk-through
print(f"notebook body ran in {time.perf_counter() - started:.0f} s")
