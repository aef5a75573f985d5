"""Chat and plain-text data for training and analysis: load, validate, tokenise, batch."""

from caft_tl.data.chat import (
    ROLES,
    Batch,
    DataError,
    DataWarning,
    as_dataset,
    batches,
    chat_to_text,
    collate,
    encode_text,
    load_jsonl,
    mask_batches,
    pad_id,
    prepare_data,
    tokenize,
    tokenize_prompt_answer,
    validate_messages,
)

__all__ = [
    "ROLES",
    "Batch",
    "DataError",
    "DataWarning",
    "as_dataset",
    "batches",
    "chat_to_text",
    "collate",
    "encode_text",
    "load_jsonl",
    "mask_batches",
    "pad_id",
    "prepare_data",
    "tokenize",
    "tokenize_prompt_answer",
    "validate_messages",
]
