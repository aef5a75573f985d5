"""Chat and plain-text data: loading, validation, tokenisation with loss masks, batching.

Conventions:
- A conversation is a list of ``{"role": "system"|"user"|"assistant", "content": str}``.
- ``loss_mask[t] == 1`` means token ``t`` is a training target, i.e. the prediction made at
  position ``t - 1`` is trained. Callers shift (``logits[:, :-1]`` vs ``input_ids[:, 1:]``
  with ``loss_mask[:, 1:]``).
- Padding is tracked only by ``attention_mask``: the pad id may equal a real token id
  (SmolLM2 pads with ``<|im_end|>``, which ends every turn).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Literal, TypedDict

import torch
from datasets import Dataset
from jaxtyping import Int
from torch import Tensor

ROLES = ("system", "user", "assistant")
MaskMode = Literal["assistant", "last_assistant", "all", "none"]
Side = Literal["left", "right"]
ChatData = str | os.PathLike | Dataset | Sequence[Any]

_ASSISTANT_MASKS = ("assistant", "last_assistant")
_MASKS = (*_ASSISTANT_MASKS, "all", "none")
_SIDES = ("left", "right")
_SHOWN = 5  # how many offending items a warning lists before "..."


class DataError(ValueError):
    """Malformed or unusable data; the message says where and what."""


class DataWarning(UserWarning):
    """Examples were skipped, truncated, or left with nothing to train on."""


class Batch(TypedDict, total=False):
    """Collated tensors; ``example_index`` is added by :func:`batches`."""

    input_ids: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]
    loss_mask: Int[Tensor, "batch pos"]
    position_ids: Int[Tensor, "batch pos"]
    example_index: Int[Tensor, " batch"]


# --------------------------------------------------------------------------- validation


def validate_messages(messages: Any, *, require_assistant: bool = False) -> list[dict[str, str]]:
    """Check one conversation; return it reduced to ``role``/``content`` dicts."""
    if not isinstance(messages, list):
        raise DataError(f"'messages' must be a list, got {type(messages).__name__}")
    if not messages:
        raise DataError("'messages' is empty")
    clean = [_validate_message(m, i) for i, m in enumerate(messages)]
    if require_assistant and not any(m["role"] == "assistant" for m in clean):
        raise DataError("conversation has no assistant turn (an assistant loss mask needs one)")
    return clean


def _validate_message(message: Any, i: int) -> dict[str, str]:
    where = f"message {i}"
    if not isinstance(message, Mapping):
        raise DataError(f"{where} must be an object, got {type(message).__name__}")
    for key in ("role", "content"):
        if key not in message:
            raise DataError(f"{where} is missing '{key}'")
    role, content = message["role"], message["content"]
    if role not in ROLES:
        raise DataError(f"{where} has unknown role {role!r} (expected one of {', '.join(ROLES)})")
    if not isinstance(content, str):
        raise DataError(f"{where} content must be a string, got {type(content).__name__}")
    return {"role": role, "content": content}


def _conversation_from_record(record: Any, *, require_assistant: bool) -> list[dict[str, str]]:
    if not isinstance(record, Mapping):
        raise DataError(f"expected a JSON object, got {type(record).__name__}")
    if "messages" not in record:
        raise DataError(f"missing 'messages' (keys: {sorted(record)})")
    return validate_messages(record["messages"], require_assistant=require_assistant)


def _conversation_from_item(item: Any, *, require_assistant: bool) -> list[dict[str, str]]:
    # A bare list of messages is accepted as a conversation, for convenience.
    if isinstance(item, list):
        return validate_messages(item, require_assistant=require_assistant)
    if isinstance(item, str):
        raise DataError("plain string mixed with conversations")
    return _conversation_from_record(item, require_assistant=require_assistant)


def _parse_line(raw: bytes, *, require_assistant: bool) -> list[dict[str, str]]:
    try:
        record = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise DataError(f"not valid UTF-8 ({err.reason} at byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise DataError(f"invalid JSON: {err.msg} (column {err.colno})") from None
    return _conversation_from_record(record, require_assistant=require_assistant)


def _gather(
    items: Iterable[tuple[str, Any]], parse: Callable[[Any], Any], *, skip_invalid: bool
) -> list[Any]:
    """Parse ``(location, item)`` pairs: raise on the first bad one, or skip and warn."""
    good, bad = [], []
    for where, item in items:
        try:
            good.append(parse(item))
        except DataError as err:
            if not skip_invalid:
                raise DataError(f"{where}: {err}") from None
            bad.append(f"{where}: {err}")
    if bad:
        shown = "; ".join(bad[:_SHOWN]) + ("; ..." if len(bad) > _SHOWN else "")
        warnings.warn(f"skipped {len(bad)} invalid example(s): {shown}", DataWarning, stacklevel=4)
    return good


def _chat_dataset(conversations: list[list[dict[str, str]]], source: str) -> Dataset:
    if not conversations:
        raise DataError(f"{source}: no valid examples")
    return Dataset.from_dict({"messages": conversations})


# --------------------------------------------------------------------------- loading


def load_jsonl(
    path: str | os.PathLike, *, require_assistant: bool = False, skip_invalid: bool = False
) -> Dataset:
    """Load ``{"messages": [...]}`` lines into a Dataset with a ``messages`` column.

    Blank lines are ignored. A bad line raises :class:`DataError` naming the file and the
    1-based line number, unless ``skip_invalid`` (then a :class:`DataWarning` gives the count).
    """
    path = Path(path)
    # Read bytes so a bad encoding is reported with its line number too.
    with path.open("rb") as f:
        lines = [(f"{path}, line {n}", raw) for n, raw in enumerate(f, 1) if raw.strip()]
    if not lines:
        raise DataError(f"{path}: no examples (file is empty)")
    parse = partial(_parse_line, require_assistant=require_assistant)
    return _chat_dataset(_gather(lines, parse, skip_invalid=skip_invalid), str(path))


def as_dataset(
    data: ChatData, *, require_assistant: bool = False, skip_invalid: bool = False
) -> Dataset:
    """Normalise data to a Dataset with a ``messages`` column, or a ``text`` column.

    Accepts a JSONL path, a list of ``{"messages": [...]}`` dicts (or of message lists), a
    list of strings, or a Dataset with a ``messages`` or ``text`` column. Other columns
    and message keys besides ``role``/``content`` are dropped.
    """
    if isinstance(data, str | os.PathLike):
        return load_jsonl(data, require_assistant=require_assistant, skip_invalid=skip_invalid)
    if isinstance(data, Dataset):
        return _from_dataset(data, require_assistant=require_assistant, skip_invalid=skip_invalid)
    if isinstance(data, Mapping) or not isinstance(data, Iterable):
        raise TypeError(
            f"expected a JSONL path, a list or a datasets.Dataset, got {type(data).__name__}"
            " (for a DatasetDict pick a split, e.g. ds['train'])"
        )
    items = list(data)
    if not items:
        raise DataError("no examples (empty input)")
    if all(isinstance(x, str) for x in items):
        return Dataset.from_dict({"text": items})
    parse = partial(_conversation_from_item, require_assistant=require_assistant)
    located = ((f"example {i}", x) for i, x in enumerate(items))
    return _chat_dataset(_gather(located, parse, skip_invalid=skip_invalid), "input")


def _from_dataset(ds: Dataset, *, require_assistant: bool, skip_invalid: bool) -> Dataset:
    if len(ds) == 0:
        raise DataError("no examples (empty dataset)")
    located = lambda column: ((f"example {i}", x) for i, x in enumerate(ds[column]))  # noqa: E731
    if "messages" in ds.column_names:
        parse = partial(validate_messages, require_assistant=require_assistant)
        convs = _gather(located("messages"), parse, skip_invalid=skip_invalid)
        return _chat_dataset(convs, "dataset")
    if "text" in ds.column_names:
        texts = _gather(located("text"), _check_text, skip_invalid=skip_invalid)
        if not texts:
            raise DataError("dataset: no valid examples")
        return Dataset.from_dict({"text": texts})
    raise DataError(f"dataset needs a 'messages' or 'text' column, has {ds.column_names}")


def _check_text(text: Any) -> str:
    if not isinstance(text, str):
        raise DataError(f"text must be a string, got {type(text).__name__}")
    return text


# --------------------------------------------------------------------------- tokenisation


def chat_to_text(
    messages: Sequence[Mapping[str, str]], tokenizer: Any, add_generation_prompt: bool = True
) -> str:
    """Render a conversation with the chat template, e.g. as a generation prompt.

    The text already holds the template's special tokens: tokenise it with
    ``add_special_tokens=False`` (a TransformerLens tokenizer would otherwise add a BOS).
    """
    _require_template(tokenizer)
    return _render(tokenizer, validate_messages(list(messages)), add_generation_prompt)


def tokenize(
    data: ChatData,
    tokenizer: Any,
    *,
    max_length: int | None = None,
    truncation_side: Side = "right",
    mask: MaskMode | None = None,
    add_generation_prompt: bool = False,
    prepend_bos: bool | None = None,
) -> Dataset:
    """Tokenise chat data or plain texts into ``input_ids``, ``loss_mask``, ``n_tokens``.

    ``mask`` (default ``"assistant"`` for chat, ``"all"`` for texts): ``"assistant"`` trains
    every assistant turn's content plus its end-of-turn token, ``"last_assistant"`` only the
    final one, ``"all"``/``"none"`` every/no token. ``prepend_bos`` applies to plain texts
    only (``None`` follows ``tokenizer.add_bos_token``); chat templates place their own.
    Rows stay aligned with the input; truncation and all-zero masks raise a DataWarning.
    """
    _check_choice("mask", mask, (None, *_MASKS))
    _check_choice("truncation_side", truncation_side, _SIDES)
    if max_length is not None and max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    ds = as_dataset(data, require_assistant=mask in (None, *_ASSISTANT_MASKS))
    if "messages" in ds.column_names:
        encoded = _tokenize_chats(ds, tokenizer, mask or "assistant", add_generation_prompt)
        if prepend_bos is not None:
            raise ValueError("prepend_bos is for plain texts; the chat template places BOS")
    else:
        encoded = _tokenize_texts(ds, tokenizer, mask or "all", prepend_bos)
        if add_generation_prompt:
            raise ValueError("add_generation_prompt needs chat data, got plain texts")
    return _finish(encoded, max_length, truncation_side, check_empty=mask != "none")


def _check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {[c for c in choices if c]}, got {value!r}")


def _require_template(tokenizer: Any) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("tokenizer has no chat template; pass plain texts instead")


def _render(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """``text``'s token ids, with no special tokens added (a rendered chat carries its own)."""
    # Rendered chats already contain their special tokens, and TransformerLens tokenizers
    # set add_bos_token=True, so special tokens must never be added here.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


Encoded = tuple[list[int], list[int]]


def _tokenize_texts(ds: Dataset, tokenizer: Any, mode: str, prepend_bos: bool | None) -> list:
    if mode in _ASSISTANT_MASKS:
        raise DataError(f"mask={mode!r} needs chat data, got plain texts")
    if prepend_bos is None:
        prepend_bos = bool(getattr(tokenizer, "add_bos_token", False))
    if prepend_bos and tokenizer.bos_token_id is None:
        raise ValueError("prepend_bos=True but the tokenizer has no BOS token")
    encoded = []
    for text in ds["text"]:
        ids = encode_text(tokenizer, text)
        mask = [int(mode == "all")] * len(ids)
        if prepend_bos:  # BOS is context, not a target: it is never predicted
            ids, mask = [tokenizer.bos_token_id, *ids], [0, *mask]
        encoded.append((ids, mask))
    return encoded


def _tokenize_chats(ds: Dataset, tokenizer: Any, mode: str, add_generation_prompt: bool) -> list:
    _require_template(tokenizer)
    encoded = []
    for i, messages in enumerate(ds["messages"]):
        try:
            encoded.append(_encode_chat(messages, tokenizer, mode, add_generation_prompt))
        except DataError as err:
            raise DataError(f"example {i}: {err}") from None
    return encoded


def _encode_chat(
    messages: list[dict[str, str]], tokenizer: Any, mode: str, add_generation_prompt: bool
) -> Encoded:
    ids = encode_text(tokenizer, _render(tokenizer, messages, add_generation_prompt))
    if mode in ("all", "none"):
        return ids, [int(mode == "all")] * len(ids)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if mode == "last_assistant":
        turns = turns[-1:]
    mask = [0] * len(ids)
    for turn in turns:
        start, end = _assistant_span(tokenizer, messages, turn, ids)
        mask[start:end] = [1] * (end - start)
    return ids, mask


def _assistant_span(
    tokenizer: Any, messages: list[dict[str, str]], turn: int, full_ids: list[int]
) -> tuple[int, int]:
    """Token span ``[start, end)`` of assistant turn ``turn``'s content and end token.

    Found by rendering the conversation up to the turn's header (generation prompt) and up
    to the end of the turn, and tokenising both: no ``{% generation %}`` support needed.
    """
    if turn == 0:
        raise DataError("conversation starts with an assistant turn; its header is unknowable")
    before = _render(tokenizer, messages[:turn], False)
    prompt = _render(tokenizer, messages[:turn], True)
    upto = _render(tokenizer, messages[: turn + 1], False)
    if prompt == before or not upto.startswith(prompt):
        raise DataError(
            f"chat template is not prefix-stable at message {turn}: the conversation rendered "
            "through this assistant turn does not start with the generation prompt rendered "
            "before it, so the assistant tokens cannot be located"
        )
    prompt_ids, upto_ids = encode_text(tokenizer, prompt), encode_text(tokenizer, upto)
    if full_ids[: len(upto_ids)] != upto_ids:
        raise DataError(
            f"chat template is not prefix-stable at message {turn}: tokens of the conversation "
            "up to this turn are not a prefix of the full conversation's tokens"
        )
    # The header's last token may merge with the content's first (BPE across the boundary);
    # the span then starts at the merged token, the first one that carries content.
    start = _common_prefix_length(prompt_ids, upto_ids)
    return start, _end_of_turn(tokenizer, upto_ids, start)


def _common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _end_of_turn(tokenizer: Any, turn_ids: list[int], start: int) -> int:
    """End of the trained span: just after the turn's last special (end-of-turn) token."""
    special = set(tokenizer.all_special_ids)
    for j in range(len(turn_ids) - 1, start - 1, -1):
        if turn_ids[j] in special:
            return j + 1
    # No special end token: keep the content, drop the template's trailing separator.
    end = len(turn_ids)
    while end > start and not tokenizer.decode(turn_ids[end - 1 : end]).strip():
        end -= 1
    return end


def _truncate(ids: list[int], mask: list[int], max_length: int | None, side: str) -> Encoded:
    if max_length is None or len(ids) <= max_length:
        return ids, mask
    keep = slice(None, max_length) if side == "right" else slice(len(ids) - max_length, None)
    return ids[keep], mask[keep]


def _finish(encoded: list[Encoded], max_length: int | None, side: str, check_empty: bool):
    truncated, empty, columns = [], [], {"input_ids": [], "loss_mask": [], "n_tokens": []}
    for i, (ids, mask) in enumerate(encoded):
        ids_t, mask_t = _truncate(ids, mask, max_length, side)
        if len(ids_t) < len(ids):
            truncated.append(i)
        if check_empty and not any(mask_t):
            empty.append(i)
        columns["input_ids"].append(ids_t)
        columns["loss_mask"].append(mask_t)
        columns["n_tokens"].append(len(ids_t))
    if truncated:
        _warn(
            f"truncated {len(truncated)} of {len(encoded)} example(s) to "
            f"max_length={max_length} ({side} side)",
            truncated,
        )
    if empty:
        by_truncation = len(set(empty) & set(truncated))
        cause = f", {by_truncation} of them after truncation" if truncated else ""
        _warn(
            f"{len(empty)} example(s) have an all-zero loss_mask (nothing to train){cause}", empty
        )
    return Dataset.from_dict(columns)


def _warn(message: str, indices: list[int]) -> None:
    shown = ", ".join(map(str, indices[:_SHOWN])) + (", ..." if len(indices) > _SHOWN else "")
    warnings.warn(f"{message}; example indices: {shown}", DataWarning, stacklevel=4)


# --------------------------------------------------------------------------- prompt/answer


def tokenize_prompt_answer(
    data: Dataset | Sequence[Mapping[str, Any]],
    tokenizer: Any,
    *,
    max_length: int | None = None,
) -> Dataset:
    """Tokenise ``prompt`` + ``answer`` pairs; only the answer's tokens are targets.

    ``prompt`` is a string, or a list of chat messages (rendered with the chat template and
    its generation prompt); ``answer`` is a string appended as is (include a leading space
    if the tokenizer needs one). Tokens are found on the joined text, so a BPE merge across
    the boundary makes the merged token the first target. Truncation keeps the left part.
    """
    rows = list(data) if not isinstance(data, Dataset) else data.to_list()
    if not rows:
        raise DataError("no examples (empty prompt/answer data)")
    columns: dict[str, list] = {"input_ids": [], "loss_mask": [], "n_tokens": []}
    for i, row in enumerate(rows):
        prompt, answer = row.get("prompt"), row.get("answer")
        if isinstance(prompt, list):
            prompt = chat_to_text(prompt, tokenizer, add_generation_prompt=True)
        if not isinstance(prompt, str) or not isinstance(answer, str) or not answer:
            raise DataError(
                f"example {i}: 'prompt' must be a string or a list of messages and 'answer' a "
                f"non-empty string, got {type(prompt).__name__} / {type(answer).__name__}"
            )
        prompt_ids = encode_text(tokenizer, prompt)
        ids = encode_text(tokenizer, prompt + answer)
        start = _common_prefix_length(prompt_ids, ids)
        if start == 0:
            raise DataError(f"example {i}: the prompt is empty; nothing predicts the answer")
        mask = [0] * start + [1] * (len(ids) - start)
        if max_length is not None:
            ids, mask = ids[:max_length], mask[:max_length]
        columns["input_ids"].append(ids)
        columns["loss_mask"].append(mask)
        columns["n_tokens"].append(len(ids))
    return Dataset.from_dict(columns)


def prepare_data(data: Any, tokenizer: Any, *, max_length: int | None = None) -> Dataset:
    """Turn training data into rows of ``input_ids`` + ``loss_mask``.

    Accepts an already tokenised Dataset (``input_ids``, optional ``loss_mask``: all tokens
    when absent), prompt/answer data (a Dataset or list of dicts with string ``prompt`` and
    ``answer``: answer tokens only), or anything :func:`caft_tl.data.tokenize` accepts (chat
    data: assistant tokens only; plain texts: every token).
    """
    if isinstance(data, Dataset) and "input_ids" in data.column_names:
        if len(data) == 0:
            raise DataError("no examples (empty dataset)")
        ids = [list(r) for r in data["input_ids"]]
        if "loss_mask" in data.column_names:
            masks = [list(m) for m in data["loss_mask"]]
        else:
            masks = [[1] * len(r) for r in ids]
        if any(len(m) != len(r) for m, r in zip(masks, ids, strict=True)):
            raise DataError("loss_mask and input_ids differ in length in some rows")
        if max_length is not None:
            ids, masks = [r[:max_length] for r in ids], [m[:max_length] for m in masks]
        return Dataset.from_dict({"input_ids": ids, "loss_mask": masks})
    if _is_prompt_answer(data):
        return tokenize_prompt_answer(data, tokenizer, max_length=max_length)
    if tokenizer is None:
        raise ValueError("the model has no tokenizer: pass a tokenised Dataset (input_ids)")
    return tokenize(data, tokenizer, max_length=max_length)


def _is_prompt_answer(data: Any) -> bool:
    if isinstance(data, Dataset):
        return {"prompt", "answer"} <= set(data.column_names)
    if isinstance(data, list) and data and isinstance(data[0], Mapping):
        return {"prompt", "answer"} <= set(data[0])
    return False


# --------------------------------------------------------------------------- batching


def pad_id(tokenizer: Any) -> int:
    """The id to pad with: the tokenizer's pad token, else its eos, else 0. Any id works,
    since padding is tracked by the attention mask only."""
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None) if tokenizer is not None else None
        if value is not None:
            return int(value)
    return 0


def collate(
    examples: Sequence[Mapping[str, Any]], *, pad_token_id: int, padding_side: Side = "right"
) -> Batch:
    """Pad tokenised examples into long tensors ``[batch, pos]``.

    ``attention_mask`` is the only record of padding (pad id may be a real token id);
    padded positions get ``loss_mask`` 0 and ``position_ids`` count real tokens from 0.
    A missing ``loss_mask`` means every real token is a target.
    """
    _check_choice("padding_side", padding_side, _SIDES)
    if not examples:
        raise ValueError("collate needs at least one example")
    if pad_token_id is None:
        raise ValueError("pad_token_id is None; pass e.g. tokenizer.eos_token_id")
    length = max(len(e["input_ids"]) for e in examples)
    rows = [_pad_row(e, length, pad_token_id, padding_side) for e in examples]
    input_ids, attention_mask, loss_mask = (
        torch.tensor(list(column), dtype=torch.long).reshape(len(rows), length)
        for column in zip(*rows, strict=True)
    )
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "loss_mask": loss_mask,
        "position_ids": _position_ids(attention_mask),
    }


def _pad_row(
    example: Mapping[str, Any], length: int, pad_token_id: int, side: str
) -> tuple[list[int], list[int], list[int]]:
    ids = list(example["input_ids"])
    loss = example.get("loss_mask")
    loss = [1] * len(ids) if loss is None else list(loss)
    if len(loss) != len(ids):
        raise ValueError(f"loss_mask has {len(loss)} entries for {len(ids)} input_ids")
    n_pad = length - len(ids)

    def pad(values: list[int], fill: int) -> list[int]:
        return values + [fill] * n_pad if side == "right" else [fill] * n_pad + values

    return pad(ids, pad_token_id), pad([1] * len(ids), 0), pad(loss, 0)


def _position_ids(attention_mask: Int[Tensor, "batch pos"]) -> Int[Tensor, "batch pos"]:
    # Real tokens count from 0 whatever the padding side; pads get 0 (they are masked).
    return (attention_mask.cumsum(-1) - 1) * attention_mask


def batches(
    dataset: Dataset | Sequence[Mapping[str, Any]],
    batch_size: int,
    *,
    pad_token_id: int,
    padding_side: Side = "right",
    sort_by_length: bool = False,
) -> Iterator[Batch]:
    """Yield collated batches of a tokenised dataset, in order or longest first.

    Each batch's ``example_index`` maps its rows back to dataset indices, so results of a
    length-sorted pass can be put back in dataset order.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(dataset) == 0:
        raise DataError("no examples (empty dataset)")
    order = _batch_order(dataset, sort_by_length)
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        batch = collate(_rows(dataset, index), pad_token_id=pad_token_id, padding_side=padding_side)
        batch["example_index"] = torch.tensor(index, dtype=torch.long)
        yield batch


def mask_batches(
    data: Any,
    tokenizer: Any,
    batch_size: int = 8,
    *,
    max_length: int | None = None,
    skip_first: bool = False,
) -> Iterator[dict[str, Tensor]]:
    """``{"input_ids", "mask"}`` batches of any data :func:`prepare_data` takes, the mask
    over every real token (``skip_first``: without each example's first token, an attention
    sink whose activations are outliers), as mean-activation passes take them."""
    rows = prepare_data(data, tokenizer, max_length=max_length)
    pad = pad_id(tokenizer)
    for batch in batches(rows, batch_size, pad_token_id=pad, padding_side="right"):
        mask = batch["attention_mask"]  # this batch's own tensor: edited in place
        if skip_first:
            mask[:, 0] = 0
        yield {"input_ids": batch["input_ids"], "mask": mask}


def _batch_order(dataset: Dataset | Sequence[Mapping[str, Any]], by_length: bool) -> list[int]:
    if not by_length:
        return list(range(len(dataset)))
    if isinstance(dataset, Dataset) and "n_tokens" in dataset.column_names:
        lengths = list(dataset["n_tokens"])
    else:
        lengths = [len(e["input_ids"]) for e in dataset]
    # Longest first: memory errors show up on the first batch, not at the end of a run.
    return sorted(range(len(lengths)), key=lambda i: -lengths[i])


def _rows(dataset: Dataset | Sequence[Mapping[str, Any]], index: list[int]) -> list[dict]:
    if not isinstance(dataset, Dataset):
        return [dataset[i] for i in index]
    columns = [c for c in ("input_ids", "loss_mask") if c in dataset.column_names]
    sliced = dataset.select_columns(columns)[index]
    return [dict(zip(columns, row, strict=True)) for row in zip(*sliced.values(), strict=True)]
