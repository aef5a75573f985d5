"""Evaluations.

- multiple choice: accuracy from option log-probabilities (:func:`multiple_choice`);
- free-form: question sets (:func:`question_set`, :func:`load_questions`), batched sampling
  under an optional intervention (:func:`sample`), judges that score 0-100 from number
  probabilities (:class:`HTTPJudge`, :class:`LocalJudge`), and misalignment rates with
  ranges over seeds (:func:`evaluate_freeform`, :func:`aggregate`);
- over seeds: bootstrap intervals and paired differences against a baseline
  (:func:`bootstrap_ci`, :func:`seed_comparison`).
"""

from caft_tl.evals.freeform import (
    DENOMINATORS,
    FreeformEval,
    FreeformSummary,
    aggregate,
    evaluate_freeform,
    freeform_figure,
)
from caft_tl.evals.judges import (
    RUBRICS,
    HTTPJudge,
    Judge,
    JudgeError,
    Judgement,
    LocalJudge,
    Rubric,
    judge_samples,
    score_from_logprobs,
    score_from_probs,
)
from caft_tl.evals.multiple_choice import (
    evaluate_splits,
    multiple_choice,
    option_token_ids,
    summarise,
)
from caft_tl.evals.questions import (
    Question,
    expand,
    load_questions,
    question_set,
    questions,
    save_questions,
)
from caft_tl.evals.sampling import Generation, SamplingConfig, generate, sample
from caft_tl.evals.stats import bootstrap_ci, seed_comparison

__all__ = [
    "DENOMINATORS",
    "RUBRICS",
    "FreeformEval",
    "FreeformSummary",
    "Generation",
    "HTTPJudge",
    "Judge",
    "JudgeError",
    "Judgement",
    "LocalJudge",
    "Question",
    "Rubric",
    "SamplingConfig",
    "aggregate",
    "bootstrap_ci",
    "evaluate_freeform",
    "evaluate_splits",
    "expand",
    "freeform_figure",
    "generate",
    "judge_samples",
    "load_questions",
    "multiple_choice",
    "option_token_ids",
    "question_set",
    "questions",
    "sample",
    "save_questions",
    "score_from_logprobs",
    "score_from_probs",
    "seed_comparison",
    "summarise",
]
