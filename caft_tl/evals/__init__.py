"""Evaluations: multiple-choice accuracy (free-form generation and judges come later)."""

from caft_tl.evals.multiple_choice import (
    evaluate_splits,
    multiple_choice,
    option_token_ids,
    summarise,
)

__all__ = ["evaluate_splits", "multiple_choice", "option_token_ids", "summarise"]
