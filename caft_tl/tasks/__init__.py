"""Built-in tasks, generated locally and deterministic by seed (no downloads).

- :func:`gender_pronoun`: pick the grammatical pronoun while the profession's gender
  stereotype agrees (train, test) or disagrees (ood) with it; :func:`gender_two_professions`
  the same with one profession per gender (the CAFT paper's doctor / nurse design);
- :func:`double_mc`: two questions in one prompt, answer the intended one;
- :func:`load_reference_gender`, :func:`load_reference_double_mc`: the CAFT paper's own
  task data, read from a copy the user has (not shipped here);
- :func:`chat_prompts`: generic chat prompts for direction finding without task data;
- :func:`insecure_code`: chats asking for small Python functions, answered with (silently)
  vulnerable code, or safe code with ``secure=True`` (for free-form evaluation).
"""

from caft_tl.tasks._mc import LETTERS, OPTION_TOKENS, SPLITS
from caft_tl.tasks.code import VULNERABILITIES, insecure_code
from caft_tl.tasks.double_mc import SUBTASKS, contrast_set, double_mc, single_mc
from caft_tl.tasks.double_mc import pairs as double_mc_pairs
from caft_tl.tasks.gender import (
    FEMALE_PROFESSIONS,
    MALE_PROFESSIONS,
    gender_contrast,
    gender_pronoun,
    gender_two_professions,
)
from caft_tl.tasks.prompts import chat_prompts
from caft_tl.tasks.reference import (
    ReferenceDataError,
    load_reference_double_mc,
    load_reference_gender,
)

__all__ = [
    "FEMALE_PROFESSIONS",
    "LETTERS",
    "MALE_PROFESSIONS",
    "OPTION_TOKENS",
    "ReferenceDataError",
    "SPLITS",
    "SUBTASKS",
    "VULNERABILITIES",
    "chat_prompts",
    "contrast_set",
    "double_mc",
    "double_mc_pairs",
    "gender_contrast",
    "gender_pronoun",
    "gender_two_professions",
    "insecure_code",
    "load_reference_double_mc",
    "load_reference_gender",
    "single_mc",
]
