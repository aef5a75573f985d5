"""Evaluations: multiple-choice accuracy (free-form generation and judges come later)."""

from caft_tl.evals.multiple_choice import multiple_choice, option_token_ids, summarise

__all__ = ["multiple_choice", "option_token_ids", "summarise"]
