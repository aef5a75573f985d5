"""Tests for caft_tl.data: loading, validation, chat loss masks, truncation, batching."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from datasets import Dataset
from transformers import AutoTokenizer

from caft_tl.data import (
    DataError,
    DataWarning,
    as_dataset,
    batches,
    chat_to_text,
    collate,
    load_jsonl,
    tokenize,
)

END = "<|im_end|>"


@pytest.fixture(scope="module")
def tokenizer():
    try:
        from caft_tl.models import load_tokenizer

        return load_tokenizer()
    except ImportError:
        return AutoTokenizer.from_pretrained("/tmp/toksave")


@pytest.fixture(scope="module")
def tl_tokenizer(tokenizer):
    """The tokenizer as TransformerLens wraps it: add_bos_token=True."""
    from transformer_lens.utilities.tokenize_utils import get_tokenizer_with_bos

    wrapped = get_tokenizer_with_bos(tokenizer)
    assert wrapped("hi")["input_ids"][0] == wrapped.bos_token_id  # the hazard being tested
    return wrapped


def msg(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


SINGLE = [msg("user", "What is 2+2?"), msg("assistant", "It is 4.")]
MULTI = [
    msg("user", "Hi"),
    msg("assistant", "Hello! How can I help?"),
    msg("user", "Name a colour."),
    msg("assistant", "Blue.\nOr green."),
]
WITH_SYSTEM = [msg("system", "You are terse."), *MULTI]
CONVERSATIONS = [SINGLE, MULTI, WITH_SYSTEM]


def write_jsonl(path, lines: list[str]):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def masked_spans(ids: list[int], mask: list[int]) -> list[list[int]]:
    """Contiguous runs of masked tokens."""
    spans, current = [], []
    for token, m in zip(ids, mask, strict=True):
        if m:
            current.append(token)
        elif current:
            spans, current = [*spans, current], []
    return spans + ([current] if current else [])


def decoded_spans(tok, row) -> list[str]:
    return [tok.decode(span) for span in masked_spans(row["input_ids"], row["loss_mask"])]


def assistant_targets(messages) -> list[str]:
    return [m["content"] + END for m in messages if m["role"] == "assistant"]


# --------------------------------------------------------------------------- loading


def test_jsonl_round_trip_skips_blank_lines(tmp_path):
    lines = [json.dumps({"messages": c}) for c in CONVERSATIONS]
    path = write_jsonl(tmp_path / "d.jsonl", [lines[0], "", "   ", *lines[1:]])
    ds = load_jsonl(path)
    assert ds.column_names == ["messages"]
    assert list(ds["messages"]) == CONVERSATIONS


BAD_LINES = {
    "bad json": ('{"messages": [', "invalid JSON"),
    "not an object": ("[1, 2]", "expected a JSON object"),
    "missing messages": ('{"text": "hi"}', "missing 'messages'"),
    "messages not a list": ('{"messages": "hi"}', "must be a list"),
    "empty messages": ('{"messages": []}', "empty"),
    "message not an object": ('{"messages": ["hi"]}', "message 0 must be an object"),
    "missing role": ('{"messages": [{"content": "hi"}]}', "message 0 is missing 'role'"),
    "missing content": ('{"messages": [{"role": "user"}]}', "message 0 is missing 'content'"),
    "unknown role": (
        '{"messages": [{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}]}',
        "message 1 has unknown role 'tool'",
    ),
    "content not a string": (
        '{"messages": [{"role": "user", "content": ["a"]}]}',
        "content must be a string",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_malformed_line_names_file_and_line(tmp_path, case):
    bad, expected = BAD_LINES[case]
    good = json.dumps({"messages": SINGLE})
    path = write_jsonl(tmp_path / "bad.jsonl", [good, "", bad, good])
    with pytest.raises(DataError) as info:
        load_jsonl(path)
    message = str(info.value)
    assert str(path) in message and "line 3" in message and expected in message


def test_invalid_utf8_names_line(tmp_path):
    path = tmp_path / "enc.jsonl"
    path.write_bytes(json.dumps({"messages": SINGLE}).encode() + b"\n\xff\xfe\n")
    with pytest.raises(DataError, match=r"line 2: not valid UTF-8"):
        load_jsonl(path)


def test_missing_assistant_turn_reported_when_needed(tokenizer, tmp_path):
    line = json.dumps({"messages": [msg("user", "only a question")]})
    path = write_jsonl(tmp_path / "q.jsonl", [json.dumps({"messages": SINGLE}), line])
    assert len(load_jsonl(path)) == 2  # fine for prompts
    with pytest.raises(DataError, match=r"q\.jsonl, line 2: .*no assistant turn"):
        tokenize(path, tokenizer)
    with pytest.raises(DataError, match=r"example 0: .*no assistant turn"):
        tokenize([[msg("user", "q")]], tokenizer)


def test_skip_invalid_warns_with_count(tmp_path):
    good = json.dumps({"messages": SINGLE})
    path = write_jsonl(tmp_path / "mixed.jsonl", [good, "{oops", good, '{"messages": 3}'])
    with pytest.warns(DataWarning, match=r"skipped 2 invalid example\(s\).*line 2.*line 4"):
        ds = load_jsonl(path, skip_invalid=True)
    assert len(ds) == 2


def test_empty_inputs_raise(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    blank = write_jsonl(tmp_path / "blank.jsonl", ["", "  "])
    only_bad = write_jsonl(tmp_path / "bad.jsonl", ["nope"])
    for path in (empty, blank):
        with pytest.raises(ValueError, match="no examples"):
            load_jsonl(path)
    with pytest.warns(DataWarning), pytest.raises(ValueError, match="no valid examples"):
        load_jsonl(only_bad, skip_invalid=True)
    for data in ([], Dataset.from_dict({"messages": []})):
        with pytest.raises(ValueError, match="no examples"):
            as_dataset(data)


def test_as_dataset_input_kinds():
    texts = as_dataset(["a", "b"])
    assert texts.column_names == ["text"] and texts["text"] == ["a", "b"]
    assert as_dataset(Dataset.from_dict({"text": ["x"], "id": [1]})).column_names == ["text"]
    bare = as_dataset([SINGLE])  # a list of message lists
    assert list(bare["messages"]) == [SINGLE]
    with pytest.raises(DataError, match="example 1: plain string mixed"):
        as_dataset([{"messages": SINGLE}, "text"])
    with pytest.raises(DataError, match="example 1: message 0 has unknown role"):
        as_dataset([{"messages": SINGLE}, {"messages": [msg("bot", "x")]}])
    with pytest.raises(DataError, match="'messages' or 'text' column"):
        as_dataset(Dataset.from_dict({"prompt": ["x"]}))
    with pytest.raises(TypeError, match="DatasetDict"):
        as_dataset({"train": []})


def test_dataset_list_and_path_tokenise_identically(tokenizer, tmp_path):
    records = [{"messages": c} for c in CONVERSATIONS]
    path = write_jsonl(tmp_path / "d.jsonl", [json.dumps(r) for r in records])
    results = [
        tokenize(data, tokenizer).to_dict()
        for data in (records, CONVERSATIONS, Dataset.from_list(records), path, str(path))
    ]
    assert all(r == results[0] for r in results[1:])
    assert results[0]["n_tokens"] == [len(ids) for ids in results[0]["input_ids"]]


# --------------------------------------------------------------------------- masks


@pytest.mark.parametrize("messages", CONVERSATIONS, ids=["single", "multi", "system"])
def test_assistant_mask_is_exactly_assistant_content(tokenizer, messages):
    row = tokenize([messages], tokenizer)[0]
    assert decoded_spans(tokenizer, row) == assistant_targets(messages)
    text = tokenizer.decode(row["input_ids"])
    assert text == chat_to_text(messages, tokenizer, add_generation_prompt=False)
    has_system = messages[0]["role"] == "system"
    assert ("You are terse." in text) == has_system
    assert ("SmolLM" in text) != has_system  # the template's default system prompt


def test_assistant_mask_awkward_contents(tokenizer):
    contents = ["\nstarts with newline", " leading space", "", "émoji 🙂 ünïcode", "ends\n\n"]
    messages = [m for c in contents for m in (msg("user", "q"), msg("assistant", c))]
    row = tokenize([messages], tokenizer)[0]
    assert decoded_spans(tokenizer, row) == [c + END for c in contents]


def test_last_assistant_mask(tokenizer):
    row = tokenize([MULTI], tokenizer, mask="last_assistant")[0]
    assert decoded_spans(tokenizer, row) == assistant_targets(MULTI)[-1:]


def test_all_and_none_masks(tokenizer):
    rows = tokenize([MULTI, [msg("user", "q")]], tokenizer, mask="all")
    assert all(all(r["loss_mask"]) for r in rows)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # mask="none" is intentional: no empty-mask warning
        rows = tokenize([MULTI], tokenizer, mask="none")
    assert not any(rows[0]["loss_mask"])


def test_tl_wrapped_tokenizer_adds_no_bos_to_chats(tokenizer, tl_tokenizer):
    plain = tokenize(CONVERSATIONS, tokenizer)
    wrapped = tokenize(CONVERSATIONS, tl_tokenizer)
    assert wrapped.to_dict() == plain.to_dict()
    for ids in wrapped["input_ids"]:
        assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>") and ids[1] != ids[0]


def test_generation_prompt(tokenizer):
    prompt = chat_to_text(SINGLE[:1], tokenizer)
    assert prompt.endswith("<|im_start|>assistant\n")
    row = tokenize([SINGLE[:1]], tokenizer, mask="none", add_generation_prompt=True)[0]
    assert tokenizer.decode(row["input_ids"]) == prompt


def test_not_prefix_stable_template_raises(tokenizer):
    tok = copy.deepcopy(tokenizer)
    # Rendering depends on the number of messages, so shorter renders are not prefixes.
    tok.chat_template = (
        "{{ messages|length }}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    with pytest.raises(DataError, match="example 0: chat template is not prefix-stable"):
        tokenize([SINGLE], tok)
    tok.chat_template = "{% for m in messages %}{{ m.content }}\n{% endfor %}"  # no gen prompt
    with pytest.raises(DataError, match="not prefix-stable"):
        tokenize([SINGLE], tok)


def test_plain_texts(tokenizer, tl_tokenizer):
    texts = ["Hello world", "Another line of text."]
    raw = tokenize(texts, tokenizer)[0]
    assert raw["input_ids"] == tokenizer("Hello world", add_special_tokens=False)["input_ids"]
    assert all(raw["loss_mask"])
    with_bos = tokenize(texts, tl_tokenizer)[0]  # prepend_bos=None follows add_bos_token
    assert with_bos["input_ids"] == [tokenizer.bos_token_id, *raw["input_ids"]]
    assert with_bos["loss_mask"] == [0, *raw["loss_mask"]]
    assert tokenize(texts, tl_tokenizer, prepend_bos=False)[0] == raw
    with pytest.raises(DataError, match="needs chat data"):
        tokenize(texts, tokenizer, mask="assistant")
    with pytest.raises(ValueError, match="prepend_bos is for plain texts"):
        tokenize([SINGLE], tokenizer, prepend_bos=True)


# --------------------------------------------------------------------------- truncation


def test_truncation_right_and_left(tokenizer):
    full = tokenize(CONVERSATIONS, tokenizer)
    short = min(full["n_tokens"])
    max_length = short  # truncates the two longer conversations, keeps the shortest whole
    with pytest.warns(DataWarning, match=r"truncated 2 of 3 example\(s\).*right side"):
        right = tokenize(CONVERSATIONS, tokenizer, max_length=max_length)
    with pytest.warns(DataWarning, match=r"truncated 2 of 3 example\(s\).*left side"):
        left = tokenize(CONVERSATIONS, tokenizer, max_length=max_length, truncation_side="left")
    for f, r, lft in zip(full, right, left, strict=True):
        assert r["input_ids"] == f["input_ids"][:max_length]
        assert r["loss_mask"] == f["loss_mask"][:max_length]
        assert lft["input_ids"] == f["input_ids"][-max_length:]
        assert lft["loss_mask"] == f["loss_mask"][-max_length:]
        assert r["n_tokens"] == lft["n_tokens"] == min(f["n_tokens"], max_length)


def test_truncation_reports_all_zero_masks(tokenizer):
    long_user = [msg("user", "word " * 200), msg("assistant", "ok")]
    data = [SINGLE, long_user]
    with pytest.warns(DataWarning) as record:
        rows = tokenize(data, tokenizer, max_length=60)
    messages = [str(w.message) for w in record]
    assert any("truncated 1 of 2" in m for m in messages)
    zero = [m for m in messages if "all-zero loss_mask" in m]
    assert len(zero) == 1 and "1 example(s)" in zero[0] and "indices: 1" in zero[0]
    assert len(rows) == 2 and not any(rows[1]["loss_mask"])  # kept, aligned, and reported


# --------------------------------------------------------------------------- batching


def _examples(tokenizer):
    return tokenize(CONVERSATIONS, tokenizer).to_list()


def test_collate_right_padding(tokenizer):
    examples = _examples(tokenizer)
    pad = tokenizer.pad_token_id
    assert pad == tokenizer.eos_token_id  # the case that forbids `ids != pad` as a mask
    batch = collate(examples, pad_token_id=pad, padding_side="right")
    lengths = [len(e["input_ids"]) for e in examples]
    assert batch["input_ids"].shape == (3, max(lengths))
    for key in ("input_ids", "attention_mask", "loss_mask", "position_ids"):
        assert batch[key].dtype == torch.long
    for row, e, n in zip(range(3), examples, lengths, strict=True):
        assert batch["input_ids"][row, :n].tolist() == e["input_ids"]
        assert (batch["input_ids"][row, n:] == pad).all()
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (max(lengths) - n)
        assert batch["loss_mask"][row, :n].tolist() == e["loss_mask"]
        assert not batch["loss_mask"][row, n:].any()
        assert batch["position_ids"][row, :n].tolist() == list(range(n))
    # Real end-of-turn tokens share the pad id yet stay attended and trained.
    real_eos = (batch["input_ids"] == pad) & (batch["attention_mask"] == 1)
    assert real_eos.any() and batch["loss_mask"][real_eos].any()


def test_collate_left_padding(tokenizer):
    examples = _examples(tokenizer)
    batch = collate(examples, pad_token_id=tokenizer.pad_token_id, padding_side="left")
    width = batch["input_ids"].shape[1]
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        assert batch["input_ids"][row, width - n :].tolist() == e["input_ids"]
        assert batch["attention_mask"][row].tolist() == [0] * (width - n) + [1] * n
        assert batch["loss_mask"][row].tolist() == [0] * (width - n) + e["loss_mask"]
        assert batch["position_ids"][row, width - n :].tolist() == list(range(n))
        assert not batch["position_ids"][row, : width - n].any()


def test_batches_sorted_by_length_map_back(tokenizer):
    texts = ["a " * k for k in (3, 9, 1, 7, 5)]
    ds = tokenize(texts, tokenizer)
    got = list(batches(ds, 2, pad_token_id=0, sort_by_length=True))
    assert [len(b["example_index"]) for b in got] == [2, 2, 1]
    order = torch.cat([b["example_index"] for b in got]).tolist()
    assert sorted(order) == list(range(len(texts)))
    lengths = [ds[i]["n_tokens"] for i in order]
    assert lengths == sorted(lengths, reverse=True)
    # Restore dataset order from the per-row indices.
    restored = {}
    for b in got:
        for row, index in enumerate(b["example_index"].tolist()):
            n = int(b["attention_mask"][row].sum())
            restored[index] = b["input_ids"][row, :n].tolist()
    assert [restored[i] for i in range(len(texts))] == ds["input_ids"]


def test_batches_in_order(tokenizer):
    ds = tokenize(CONVERSATIONS, tokenizer)
    got = list(batches(ds, 2, pad_token_id=tokenizer.pad_token_id, padding_side="left"))
    assert torch.cat([b["example_index"] for b in got]).tolist() == [0, 1, 2]
    same = collate(ds.to_list()[:2], pad_token_id=tokenizer.pad_token_id, padding_side="left")
    assert all(torch.equal(got[0][k], same[k]) for k in same)
