"""Double multiple choice: answer the intended question while a second one rides along.

After the "double multiple choice" task of the CAFT paper. Two questions from different
sub-tasks (:data:`SUBTASKS`) share one prompt, and each answer option pairs one answer per
question::

    Question: Which continent is Kenya in? | Is "The soup was cold and bland." positive or negative?
    A. Asia, positive
    B. Africa, negative
    Answer:

The model must answer the *intended* question, always shown first; the second one is the
*distractor*. The answer is the letter of the option holding the intended question's correct
answer (``" B"`` above).

Split design:

- ``"train"`` and ``"test"`` (in distribution): both questions' correct answers sit in the same
  option, so the distractor question is a spurious cue that predicts the answer perfectly;
- ``"ood"``: they disagree. The option with the intended correct answer holds the distractor's
  wrong answer and the other option the distractor's correct one, so a model that learned to
  follow the distractor picks the wrong letter.

Every sub-task is a fixed pool of :class:`Item` ``(question, correct, incorrect)`` written for
this project, split once, independently of any seed, into train items (~70%) and held-out
items (~30%, stratified by label). ``"train"`` uses train items only; ``"test"`` and ``"ood"``
use held-out items only, so no question text is shared between training and evaluation.

Defaults: ``n=None`` gives 1000 ``"train"`` rows and 200 ``"test"`` / ``"ood"`` rows, each row
a distinct (intended item, distractor item) pair, with the correct option first (A) in exactly
half of the rows. Everything is deterministic given ``seed``.

Answer formats (keyword ``answer_format`` of :func:`single_mc` and :func:`double_mc`, one of
:data:`ANSWER_FORMATS`):

- ``"letter"`` (default, the paper's format, shown above): options ``A.`` / ``B.``, the answer
  is the letter (``answer`` ``" B"``, ``options`` ``[" A", " B"]``);
- ``"word"``: the options are listed on one line and the answer is the intended question's
  answer word itself, so no letter has to be bound to an answer (example below).

The ``"word"`` format of the example above::

    Question: Which continent is Kenya in? | Is "The soup was cold and bland." positive or negative?
    Options: Asia (positive), Africa (negative)
    Answer:

with ``answer`` ``" Africa"`` and ``options`` ``[" Asia", " Africa"]`` (display order; the
distractor's answers are in parentheses). It exists because small models (the embedded 135M
one) cannot learn to bind answers to letters within a CPU budget, yet learn the task when the
answer is the word. The split design is the same: in ``"ood"`` the intended-incorrect word's
option holds the distractor's correct answer. Evaluation compares the logits of each option's
*first* token, so the two options always differ in their first word (the two Americas are
never paired, see ``_CONFUSABLE``).

Also here: :func:`single_mc` (one question, to check that the base model can do a sub-task),
:func:`pairs` (the 12 ordered sub-task pairs) and :func:`contrast_set` (plain sentences that
contrast a sub-task's concept, for hinted interpretation of directions).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from functools import cache
from typing import NamedTuple

from datasets import Dataset

from caft_tl.tasks._mc import OPTION_TOKENS, answer_token, check_n, check_split, rng_for, to_dataset

SUBTASKS = ("sentiment", "verbs", "pronouns", "continents")
PARTS = ("all", "train", "heldout")
DEFAULT_N = {"train": 1000, "test": 200, "ood": 200}
CONTRAST_SIDES = {
    "sentiment": ("positive", "negative"),
    "verbs": ("plural", "singular"),
    "pronouns": ("female", "male"),
    "continents": ("europe", "asia"),
}
# Held-out positions (index within a label group, modulo 10): 3 in 10, about 30%.
_HELDOUT_MOD = (2, 5, 8)


class Item(NamedTuple):
    """One sub-task question with its correct and incorrect (short) answers."""

    question: str
    correct: str
    incorrect: str


# --------------------------------------------------------------------------------------------
# Sentiment: is a short statement positive or negative?
# --------------------------------------------------------------------------------------------

# (subjects, positive predicates, negative predicates); every subject fits every predicate.
_SENTIMENT_TOPICS: tuple[tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]], ...] = (
    (
        ("The soup", "The pasta", "The pizza", "The bread", "The curry", "The dessert"),
        (
            "was delicious.",
            "tasted amazing.",
            "was fresh and full of flavor.",
            "was the best I have had in years.",
        ),
        (
            "was cold and bland.",
            "tasted awful.",
            "was stale and dry.",
            "was the worst I have had in years.",
        ),
    ),
    (
        (
            "The hotel room",
            "The apartment",
            "The campsite",
            "The guesthouse",
            "The cabin",
            "The beach resort",
        ),
        (
            "was clean and cozy.",
            "had a wonderful view.",
            "was quiet, comfortable, and well worth the price.",
            "felt like home, and we loved every minute there.",
        ),
        (
            "was dirty and cramped.",
            "smelled awful.",
            "was noisy and far too expensive.",
            "was so uncomfortable that we left early.",
        ),
    ),
    (
        ("The movie", "The novel", "The concert", "The play", "The new album", "The TV series"),
        (
            "was a joy from start to finish.",
            "was moving and beautifully made.",
            "kept me smiling the whole time.",
            "was brilliant, and I would happily enjoy it again.",
        ),
        (
            "was dull from start to finish.",
            "was a boring waste of time.",
            "left me annoyed and disappointed.",
            "was so bad that I gave up halfway.",
        ),
    ),
    (
        (
            "The new phone",
            "This laptop",
            "The vacuum cleaner",
            "The blender",
            "The kettle",
            "The coffee machine",
        ),
        (
            "works perfectly.",
            "is fast, reliable, and easy to use.",
            "was a great purchase.",
            "has made my life so much easier.",
        ),
        (
            "broke after two days.",
            "is slow and hard to use.",
            "was a total waste of money.",
            "stopped working within a week.",
        ),
    ),
    (
        (
            "The staff",
            "The tour guide",
            "The support team",
            "The front desk",
            "The receptionist",
            "The host",
        ),
        (
            "was friendly and helpful.",
            "was quick and professional.",
            "went above and beyond for us.",
            "made the whole experience a pleasure.",
        ),
        (
            "was rude and unhelpful.",
            "was slow and careless.",
            "ignored us for an hour.",
            "made the whole experience miserable.",
        ),
    ),
    (
        ("The trip", "The wedding", "The party", "The holiday", "The hike", "The festival"),
        (
            "was an absolute delight.",
            "went perfectly, and everyone had fun.",
            "was the highlight of my year.",
            "was relaxing and full of happy moments.",
        ),
        (
            "was a complete disaster.",
            "was ruined by constant arguments.",
            "was the low point of my year.",
            "was exhausting and full of problems.",
        ),
    ),
)


def _sentiment_statements() -> list[tuple[str, str]]:
    """(statement, label) for every subject x predicate of every topic."""
    out = []
    for subjects, positive, negative in _SENTIMENT_TOPICS:
        for label, predicates in (("positive", positive), ("negative", negative)):
            for subject in subjects:
                for predicate in predicates:
                    out.append((f"{subject} {predicate}", label))
    return out


def _sentiment_items() -> list[Item]:
    other = {"positive": "negative", "negative": "positive"}
    return [
        Item(f'Is "{statement}" positive or negative?', label, other[label])
        for statement, label in _sentiment_statements()
    ]


# --------------------------------------------------------------------------------------------
# Verbs: subject-verb agreement, sometimes with an attractor of the other number.
# --------------------------------------------------------------------------------------------

# (nouns as (singular, plural), predicates as (singular verb, plural verb, rest),
#  attractor phrases as (singular, plural)).
_VERB_GROUPS: tuple[
    tuple[
        tuple[tuple[str, str], ...],
        tuple[tuple[str, str, str], ...],
        tuple[tuple[str, str], ...],
    ],
    ...,
] = (
    (
        (
            ("dog", "dogs"),
            ("cat", "cats"),
            ("horse", "horses"),
            ("bird", "birds"),
            ("rabbit", "rabbits"),
            ("goat", "goats"),
        ),
        (
            ("is", "are", "hungry this morning"),
            ("was", "were", "asleep in the sun"),
            ("has", "have", "a favorite spot in the garden"),
            ("likes", "like", "fresh water"),
            ("looks", "look", "healthy and calm"),
        ),
        (
            ("near the fence", "near the fences"),
            ("from the farm", "from the farms"),
            ("behind the barn", "behind the barns"),
        ),
    ),
    (
        (
            ("child", "children"),
            ("student", "students"),
            ("neighbor", "neighbors"),
            ("player", "players"),
            ("visitor", "visitors"),
            ("tourist", "tourists"),
        ),
        (
            ("is", "are", "excited about the trip"),
            ("was", "were", "late this morning"),
            ("has", "have", "a question about the plan"),
            ("wants", "want", "to go home early"),
            ("enjoys", "enjoy", "the warm weather"),
        ),
        (
            ("next to the window", "next to the windows"),
            ("with the bag", "with the bags"),
            ("from the village", "from the villages"),
        ),
    ),
    (
        (
            ("box", "boxes"),
            ("lamp", "lamps"),
            ("chair", "chairs"),
            ("table", "tables"),
            ("book", "books"),
            ("mirror", "mirrors"),
        ),
        (
            ("is", "are", "too heavy to carry"),
            ("was", "were", "cheaper last year"),
            ("has", "have", "a small scratch on one side"),
            ("looks", "look", "brand new"),
            ("needs", "need", "a good cleaning"),
        ),
        (
            ("on the shelf", "on the shelves"),
            ("by the door", "by the doors"),
            ("in the corner", "in the corners"),
        ),
    ),
    (
        (
            ("tree", "trees"),
            ("flower", "flowers"),
            ("plant", "plants"),
            ("bush", "bushes"),
            ("vine", "vines"),
            ("rose", "roses"),
        ),
        (
            ("is", "are", "taller than last year"),
            ("was", "were", "covered in snow"),
            ("grows", "grow", "quickly in spring"),
            ("needs", "need", "more water"),
            ("has", "have", "bright green leaves"),
        ),
        (
            ("by the river", "by the rivers"),
            ("near the wall", "near the walls"),
            ("along the path", "along the paths"),
        ),
    ),
    (
        (
            ("car", "cars"),
            ("bus", "buses"),
            ("train", "trains"),
            ("bike", "bikes"),
            ("truck", "trucks"),
            ("boat", "boats"),
        ),
        (
            ("is", "are", "very old"),
            ("was", "were", "repaired last week"),
            ("needs", "need", "new paint"),
            ("makes", "make", "a strange noise"),
            ("has", "have", "a blue stripe on the side"),
        ),
        (
            ("near the station", "near the stations"),
            ("outside the store", "outside the stores"),
            ("behind the house", "behind the houses"),
        ),
    ),
)
SINGULAR_VERBS = frozenset(p[0] for group in _VERB_GROUPS for p in group[1])


def _verb_items() -> list[Item]:
    """Every noun x predicate in both numbers; an attractor in about a third of them."""
    out = []
    for nouns, predicates, attractors in _VERB_GROUPS:
        for i, noun_forms in enumerate(nouns):
            for j, (verb_sg, verb_pl, rest) in enumerate(predicates):
                for number in (0, 1):  # 0 singular, 1 plural
                    subject = f"The {noun_forms[number]}"
                    if (i + j) % 3 == 0:
                        # The attractor noun has the other number than the subject.
                        subject += " " + attractors[(i + j + number) % len(attractors)][1 - number]
                    correct, incorrect = (verb_sg, verb_pl) if number == 0 else (verb_pl, verb_sg)
                    out.append(
                        Item(f'Which verb fits: "{subject} ___ {rest}."', correct, incorrect)
                    )
    return out


# --------------------------------------------------------------------------------------------
# Pronouns: the pronoun that refers back to a clearly gendered first name.
# --------------------------------------------------------------------------------------------

FEMALE_NAMES = (
    "Emily", "Sarah", "Jessica", "Hannah", "Olivia", "Sophia", "Emma", "Grace", "Chloe",
    "Lucy", "Mary", "Anna", "Rachel", "Laura", "Megan", "Julia", "Rebecca", "Victoria",
    "Natalie", "Amy", "Katherine", "Elizabeth", "Charlotte", "Isabella", "Abigail", "Lily",
    "Ella", "Zoe", "Alice", "Helen", "Margaret", "Susan", "Linda", "Karen", "Nancy", "Diana",
    "Fiona", "Claire", "Melissa", "Stephanie", "Amanda", "Jennifer",
)  # fmt: skip
MALE_NAMES = (
    "James", "John", "Robert", "Michael", "William", "David", "Richard", "Thomas", "Daniel",
    "Matthew", "Andrew", "Joseph", "Charles", "Christopher", "Anthony", "Mark", "Steven",
    "Paul", "Kevin", "Brian", "George", "Edward", "Peter", "Henry", "Jack", "Oliver", "Harry",
    "Samuel", "Benjamin", "Ethan", "Noah", "Lucas", "Nathan", "Adam", "Ryan", "Patrick",
    "Frank", "Gregory", "Arthur", "Victor", "Jacob", "Luke",
)  # fmt: skip

# (sentence with {name} and a blank, pronoun kind); the blank refers back to the name.
_PRONOUN_TEMPLATES = (
    ("{name} brushed ___ teeth before bed.", "possessive"),
    ("{name} packed ___ bag for the trip.", "possessive"),
    ("{name} forgot ___ umbrella at home.", "possessive"),
    ("{name} lost ___ keys on the way to the station.", "possessive"),
    ("{name} washed ___ hands before dinner.", "possessive"),
    ("{name} woke up late, so ___ missed the bus.", "subject"),
    ("{name} was hungry, so ___ made a sandwich.", "subject"),
    ("{name} felt tired after the run, so ___ took a nap.", "subject"),
    ("When {name} heard the good news, ___ smiled.", "subject"),
    ("{name} finished the book, and then ___ went to sleep.", "subject"),
    ("{name} cut ___ while chopping onions.", "reflexive"),
    ("{name} looked at ___ in the mirror.", "reflexive"),
)
_PRONOUNS = {
    "possessive": {"female": "her", "male": "his"},
    "subject": {"female": "she", "male": "he"},
    "reflexive": {"female": "herself", "male": "himself"},
}
FEMALE_PRONOUNS = frozenset(p["female"] for p in _PRONOUNS.values())
_TEMPLATES_PER_NAME = 4


def _pronoun_items() -> list[Item]:
    """Each name with 4 templates (spread so every template is used by both genders alike)."""
    out = []
    for gender, other, names in (("female", "male", FEMALE_NAMES), ("male", "female", MALE_NAMES)):
        for i, name in enumerate(names):
            for j in range(_TEMPLATES_PER_NAME):
                template, kind = _PRONOUN_TEMPLATES[(i + 3 * j) % len(_PRONOUN_TEMPLATES)]
                sentence = template.format(name=name)
                out.append(
                    Item(
                        f'Which pronoun fits: "{sentence}"',
                        _PRONOUNS[kind][gender],
                        _PRONOUNS[kind][other],
                    )
                )
    return out


# --------------------------------------------------------------------------------------------
# Continents: which continent a well-known country or city is in.
# --------------------------------------------------------------------------------------------

CONTINENTS = ("Africa", "Asia", "Europe", "South America", "North America", "Oceania")
_COUNTRIES = {
    "Africa": (
        "Kenya", "Egypt", "Nigeria", "Ghana", "Ethiopia", "Morocco", "South Africa", "Tanzania",
        "Uganda", "Senegal", "Algeria", "Tunisia", "Zimbabwe", "Zambia", "Madagascar",
        "Cameroon", "Angola", "Mali", "Sudan", "Rwanda",
    ),
    "Asia": (
        "China", "Japan", "India", "Thailand", "Vietnam", "Indonesia", "Pakistan", "Bangladesh",
        "Nepal", "Mongolia", "South Korea", "the Philippines", "Malaysia", "Cambodia", "Laos",
        "Sri Lanka", "Saudi Arabia", "Iran", "Iraq", "Afghanistan",
    ),
    "Europe": (
        "France", "Germany", "Italy", "Spain", "Portugal", "Poland", "Sweden", "Norway",
        "Finland", "Denmark", "Greece", "Ireland", "the Netherlands", "Belgium", "Austria",
        "Switzerland", "Hungary", "Romania", "Ukraine", "Croatia",
    ),
    "South America": (
        "Brazil", "Argentina", "Chile", "Peru", "Colombia", "Venezuela", "Ecuador", "Bolivia",
        "Uruguay", "Paraguay", "Guyana", "Suriname",
    ),
    "North America": (
        "Canada", "the United States", "Mexico", "Cuba", "Jamaica", "Guatemala", "Honduras",
        "Costa Rica", "Panama", "Nicaragua", "El Salvador", "Haiti", "the Dominican Republic",
        "Belize", "the Bahamas",
    ),
    "Oceania": (
        "Australia", "New Zealand", "Fiji", "Papua New Guinea", "Samoa", "Tonga", "Vanuatu",
        "the Solomon Islands",
    ),
}  # fmt: skip
_CITIES = {
    "Africa": (
        "Nairobi", "Cairo", "Lagos", "Accra", "Addis Ababa", "Casablanca", "Cape Town", "Dakar",
    ),
    "Asia": (
        "Tokyo", "Beijing", "Mumbai", "Bangkok", "Seoul", "Hanoi", "Jakarta", "Manila", "Delhi",
    ),
    "Europe": ("Paris", "Berlin", "Rome", "Madrid", "Lisbon", "Vienna", "Oslo", "Stockholm"),
    "South America": (
        "Lima", "Buenos Aires", "Bogota", "Rio de Janeiro", "Sao Paulo", "Quito", "Caracas",
        "Montevideo",
    ),
    "North America": (
        "Toronto", "Chicago", "Vancouver", "Los Angeles", "Havana", "Montreal", "New York",
    ),
    "Oceania": ("Sydney", "Melbourne", "Auckland", "Wellington", "Brisbane"),
}  # fmt: skip
# Pairs never used as (correct, incorrect): Central America sits between the two Americas.
_CONFUSABLE = frozenset({frozenset({"North America", "South America"})})


def _wrong_continent(correct: str, index: int) -> str:
    others = [c for c in CONTINENTS if c != correct and frozenset({c, correct}) not in _CONFUSABLE]
    return others[index % len(others)]


def _continent_items() -> list[Item]:
    out = []
    for continent in CONTINENTS:
        places = list(_COUNTRIES[continent])
        places += [f"the city of {city}" for city in _CITIES[continent]]
        for place in places:
            wrong = _wrong_continent(continent, len(out))
            out.append(Item(f"Which continent is {place} in?", continent, wrong))
    return out


# --------------------------------------------------------------------------------------------
# Pools and their fixed partition.
# --------------------------------------------------------------------------------------------

_BUILDERS: dict[str, Callable[[], list[Item]]] = {
    "sentiment": _sentiment_items,
    "verbs": _verb_items,
    "pronouns": _pronoun_items,
    "continents": _continent_items,
}


def check_subtask(subtask: str) -> str:
    if subtask not in SUBTASKS:
        raise ValueError(f"subtask must be one of {SUBTASKS}, got {subtask!r}")
    return subtask


def label(subtask: str, item: Item) -> str:
    """The class an item belongs to (for balance and the stratified partition)."""
    check_subtask(subtask)
    if subtask == "verbs":
        return "singular" if item.correct in SINGULAR_VERBS else "plural"
    if subtask == "pronouns":
        return "female" if item.correct in FEMALE_PRONOUNS else "male"
    return item.correct


@cache
def _partitioned(subtask: str) -> tuple[tuple[Item, ...], tuple[Item, ...]]:
    """(train items, held-out items): within each label, positions 2, 5, 8 mod 10 are held out.

    Fixed, seed-independent, and stratified, so both parts keep the pool's label balance.
    """
    seen: dict[str, int] = {}
    train, heldout = [], []
    for item in _BUILDERS[subtask]():
        key = label(subtask, item)
        position = seen.get(key, 0)
        seen[key] = position + 1
        (heldout if position % 10 in _HELDOUT_MOD else train).append(item)
    return tuple(train), tuple(heldout)


def pool(subtask: str, part: str = "all") -> list[Item]:
    """A sub-task's items: ``"all"``, the ``"train"`` part or the ``"heldout"`` part."""
    check_subtask(subtask)
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")
    train, heldout = _partitioned(subtask)
    if part == "train":
        return list(train)
    if part == "heldout":
        return list(heldout)
    return list(train) + list(heldout)


def _pool_for_split(subtask: str, split: str) -> list[Item]:
    """Train items for ``"train"``; held-out items for ``"test"`` and ``"ood"``."""
    return pool(subtask, "train" if check_split(split) == "train" else "heldout")


def _balanced_a_first(n: int, rng: random.Random) -> list[bool]:
    """Whether the correct option is A, for ``n`` rows: exactly ``n - n // 2`` True, shuffled."""
    flags = [True] * (n - n // 2) + [False] * (n // 2)
    rng.shuffle(flags)
    return flags


ANSWER_FORMATS = ("letter", "word")
INTENDED_POSITIONS = ("first", "second")

# An option: (intended answer,) for single_mc, (intended answer, distractor answer) for double_mc.
_Option = tuple[str, ...]


def _check_answer_format(answer_format: str) -> str:
    if answer_format not in ANSWER_FORMATS:
        raise ValueError(f"answer_format must be one of {ANSWER_FORMATS}, got {answer_format!r}")
    return answer_format


def _check_position(intended_position: str) -> str:
    if intended_position not in INTENDED_POSITIONS:
        raise ValueError(
            f"intended_position must be one of {INTENDED_POSITIONS}, got {intended_position!r}"
        )
    return intended_position


def _prompt(question: str, first: _Option, second: _Option, answer_format: str) -> str:
    """``Question: ...`` then the two options in ``answer_format``, then ``Answer:``."""
    if answer_format == "word":
        shown = [o[0] if len(o) == 1 else f"{o[0]} ({o[1]})" for o in (first, second)]
        options = f"Options: {shown[0]}, {shown[1]}"
    else:
        options = f"A. {', '.join(first)}\nB. {', '.join(second)}"
    return f"Question: {question}\n{options}\nAnswer:"


def _answer(first: _Option, second: _Option, correct_first: bool, answer_format: str) -> dict:
    """``answer`` and ``options`` columns; option 0 is the one shown first."""
    if answer_format == "word":  # answer with the word itself: no letter to bind
        options = [f" {first[0]}", f" {second[0]}"]
        return {"answer": options[0 if correct_first else 1], "options": options}
    return {"answer": answer_token(0 if correct_first else 1), "options": list(OPTION_TOKENS)}


# --------------------------------------------------------------------------------------------
# Public task builders.
# --------------------------------------------------------------------------------------------


def pairs() -> list[tuple[str, str]]:
    """Every ordered pair ``(intended, distractor)`` of distinct sub-tasks (12)."""
    return [(a, b) for a in SUBTASKS for b in SUBTASKS if a != b]


def single_mc(
    subtask: str,
    split: str = "test",
    n: int | None = None,
    seed: int = 0,
    *,
    answer_format: str = "letter",
) -> Dataset:
    """One question with two options, to check that a model can do a sub-task on its own.

    ``split`` ``"train"`` uses the train items, ``"test"`` and ``"ood"`` the held-out ones;
    ``n=None`` gives all of them. The correct option is shown first in half of the rows.

    ``answer_format="letter"`` lists the options as ``A.`` / ``B.`` lines and the answer is
    the letter (``options`` ``[" A", " B"]``); ``"word"`` lists them as
    ``Options: positive, negative`` and the answer is the correct word itself (``options``
    ``[" positive", " negative"]`` in display order), for small models that cannot bind
    answers to letters. Raises ValueError for any other format.
    """
    check_subtask(subtask)
    _check_answer_format(answer_format)
    items = _pool_for_split(subtask, split)
    n = check_n(n, len(items), f"single_mc({subtask!r}, {split!r})")
    rng = rng_for("single_mc", subtask, split, seed)
    chosen = rng.sample(items, n)
    rows = []
    for item, a_first in zip(chosen, _balanced_a_first(n, rng), strict=True):
        options = ((item.correct,), (item.incorrect,))
        first, second = options if a_first else options[::-1]
        rows.append(
            {
                "prompt": _prompt(item.question, first, second, answer_format),
                **_answer(first, second, a_first, answer_format),
                "task": subtask,
                "split": split,
                "question": item.question,
                "correct": item.correct,
                "incorrect": item.incorrect,
            }
        )
    return to_dataset(rows)


def double_mc(
    intended: str,
    distractor: str,
    split: str,
    n: int | None = None,
    seed: int = 0,
    *,
    answer_format: str = "letter",
    intended_position: str = "first",
) -> Dataset:
    """Two questions in one prompt; the answer is the option with the intended correct answer.

    In ``"train"`` / ``"test"`` the distractor's correct answer is in the same option (rows
    ``agrees``); in ``"ood"`` it is in the other one. ``n=None`` gives 1000 train rows or 200
    test / ood rows; each row is a distinct (intended item, distractor item) pair. The correct
    option is shown first in half of the rows.

    ``answer_format="letter"`` shows ``A. Africa, negative`` / ``B. Asia, positive`` and the
    answer is the letter; ``"word"`` shows ``Options: Africa (negative), Asia (positive)``
    and the answer is the intended answer word of the chosen option (``" Africa"``, options
    ``[" Africa", " Asia"]``), for small models that cannot bind answers to letters. Either
    way ``distractor_answer`` is the option (letter or word) that holds the distractor's
    correct answer, and ``agrees`` is ``answer == distractor_answer``. Raises ValueError for
    any other format.

    ``intended_position="second"`` shows the distractor's question first (``Question:
    distractor | intended``), as the paper's runs whose intended question is the second one.
    In the letter format each option then lists the answers in question order (distractor's
    first); in the word format the option still names the intended answer, with the
    distractor's in parentheses, so only the questions' order changes. Rows are otherwise the
    same items, options and answers as with ``"first"``.
    """
    check_subtask(intended)
    check_subtask(distractor)
    if intended == distractor:
        raise ValueError(
            f"intended and distractor must be different sub-tasks of {SUBTASKS}, "
            f"got {intended!r} twice"
        )
    check_split(split)
    _check_answer_format(answer_format)
    _check_position(intended_position)
    items_i = _pool_for_split(intended, split)
    items_d = _pool_for_split(distractor, split)
    available = len(items_i) * len(items_d)
    n = check_n(DEFAULT_N[split] if n is None else n, available, f"double_mc {split} pairs")
    rng = rng_for("double_mc", intended, distractor, split, seed)
    # A sample of distinct pair indices, decoded as (intended item, distractor item).
    chosen = rng.sample(range(available), n)
    rows = []
    for index, a_first in zip(chosen, _balanced_a_first(n, rng), strict=True):
        item_i, item_d = items_i[index // len(items_d)], items_d[index % len(items_d)]
        rows.append(
            double_mc_row(
                (intended, item_i), (distractor, item_d), split, a_first,
                answer_format=answer_format, intended_position=intended_position,
            )
        )  # fmt: skip
    return to_dataset(rows)


def double_mc_row(
    intended: tuple[str, Item],
    distractor: tuple[str, Item],
    split: str,
    correct_first: bool,
    *,
    answer_format: str = "letter",
    intended_position: str = "first",
) -> dict:
    """One double multiple-choice row from a (sub-task name, :class:`Item`) per question.

    The distractor's correct answer shares the correct option unless ``split`` is "ood";
    ``correct_first`` puts the correct option first. The columns are those of
    :func:`double_mc`, which builds its rows with this; so does the loader of the CAFT
    paper's sub-task CSVs (:func:`caft_tl.tasks.load_reference_double_mc`).
    """
    (name_i, item_i), (name_d, item_d) = intended, distractor
    _check_answer_format(answer_format)
    _check_position(intended_position)
    agree = check_split(split) != "ood"
    right = (item_i.correct, item_d.correct if agree else item_d.incorrect)
    wrong = (item_i.incorrect, item_d.incorrect if agree else item_d.correct)
    first, second = (right, wrong) if correct_first else (wrong, right)
    answer = _answer(first, second, correct_first, answer_format)
    # The option holding the distractor's correct answer: the answer's one iff they agree.
    distractor_answer = answer["options"][0 if correct_first == agree else 1]
    questions, shown = (item_i.question, item_d.question), [first, second]
    if intended_position == "second":
        questions = questions[::-1]
        if answer_format == "letter":  # answers listed in question order
            shown = [o[::-1] for o in shown]
    return {
        "prompt": _prompt(" | ".join(questions), *shown, answer_format),
        **answer,
        "task": f"{name_i}|{name_d}",
        "split": split,
        "intended": name_i,
        "distractor": name_d,
        "question_intended": item_i.question,
        "question_distractor": item_d.question,
        "correct_intended": item_i.correct,
        "correct_distractor": item_d.correct,
        "distractor_answer": distractor_answer,
        "agrees": answer["answer"] == distractor_answer,
        "intended_position": intended_position,
    }


# --------------------------------------------------------------------------------------------
# Contrast sets: plain sentences (not task items) on each side of a sub-task's concept.
# --------------------------------------------------------------------------------------------

_SENTIMENT_CONTRAST_SUBJECTS = (
    "our weekend in the mountains", "the new cafe on the corner", "this winter coat",
    "the school concert", "my morning run", "the train ride home", "the museum visit",
    "the birthday dinner", "the garden this year", "the new board game",
    "the library renovation", "the neighborhood picnic",
)  # fmt: skip
_SENTIMENT_CONTRAST_FRAMES = {
    "positive": (
        "{S} made me really happy.",
        "I loved {s}.",
        "{S} was a wonderful surprise.",
        "Honestly, {s} was fantastic.",
        "{S} left everyone in a great mood.",
    ),
    "negative": (
        "{S} made me really unhappy.",
        "I hated {s}.",
        "{S} was a horrible letdown.",
        "Honestly, {s} was terrible.",
        "{S} left everyone in a bad mood.",
    ),
}

_VERB_CONTRAST_NOUNS = (
    ("key", "keys"), ("cup", "cups"), ("painting", "paintings"), ("basket", "baskets"),
    ("bottle", "bottles"), ("blanket", "blankets"), ("clock", "clocks"), ("candle", "candles"),
    ("jacket", "jackets"), ("pillow", "pillows"), ("backpack", "backpacks"),
    ("umbrella", "umbrellas"),
)  # fmt: skip
_VERB_CONTRAST_FRAMES = (
    ("sits", "sit", "near the window"),
    ("was", "were", "here yesterday"),
    ("seems", "seem", "a little dusty"),
    ("is", "are", "ready to use"),
    ("belongs", "belong", "to my aunt"),
)

_PRONOUN_CONTRAST_SUBJECTS = {
    "female": ("She", "My sister", "Our grandmother", "The woman next door", "The little girl"),
    "male": ("He", "My brother", "Our grandfather", "The man next door", "The little boy"),
}
_PRONOUN_CONTRAST_POSSESSIVE = {"female": "her", "male": "his"}
_PRONOUN_CONTRAST_ACTIVITIES = (
    "walked to the market early",
    "fixed {p} old bicycle",
    "read a long novel last week",
    "called {p} best friend after dinner",
    "planted tomatoes in the garden",
    "lost {p} wallet on the bus",
    "baked bread for the whole family",
    "painted {p} bedroom blue",
    "sang loudly in the car",
    "forgot {p} umbrella again",
    "watched the stars from the roof",
    "cleaned {p} shoes before the party",
)

_CONTINENT_CONTRAST_CITIES = {
    "europe": (
        "Paris", "Rome", "Vienna", "Prague", "Lisbon", "Amsterdam", "Barcelona", "Copenhagen",
        "Dublin", "Athens", "Budapest", "Munich",
    ),
    "asia": (
        "Tokyo", "Bangkok", "Seoul", "Hanoi", "Beijing", "Mumbai", "Kyoto", "Shanghai",
        "Jakarta", "Kathmandu", "Manila", "Singapore",
    ),
}  # fmt: skip
_CONTINENT_CONTRAST_FRAMES = (
    "Last summer we spent a week in {c}.",
    "The old streets of {c} were busy with visitors.",
    "My cousin sent me a postcard from {c}.",
    "We tried the local food at a small market in {c}.",
    "The train to {c} left early in the morning.",
)
_CONTINENT_CONTRAST_EXTRA = {
    "europe": (
        "The Alps are covered in snow for much of the year.",
        "The Eiffel Tower lights up every evening.",
        "Gondolas glide along the canals of Venice.",
        "The Danube flows past castles and vineyards.",
        "Tulip fields bloom across the Dutch countryside in April.",
        "The fjords of Norway are deep and narrow.",
        "Bagpipes played outside the castle in Edinburgh.",
        "The Acropolis stands on a rocky hill above the city.",
    ),
    "asia": (
        "Mount Everest rises high above the Himalayas.",
        "Cherry blossoms fill the parks of Japan in spring.",
        "The Great Wall winds across the hills of northern China.",
        "Rice terraces cover the green hills of Bali.",
        "Long boats carry fruit along the Mekong River.",
        "The Taj Mahal glows pink at sunrise.",
        "Street stalls in Taipei sell dumplings late into the night.",
        "Tea plantations stretch across the hills of Sri Lanka.",
    ),
}


def _capitalize(text: str) -> str:
    return text[:1].upper() + text[1:]


def _sentiment_contrast() -> dict[str, list[str]]:
    return {
        side: [
            frame.format(S=_capitalize(subject), s=subject)
            for subject in _SENTIMENT_CONTRAST_SUBJECTS
            for frame in frames
        ]
        for side, frames in _SENTIMENT_CONTRAST_FRAMES.items()
    }


def _verb_contrast() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {"plural": [], "singular": []}
    for nouns in _VERB_CONTRAST_NOUNS:
        for verb_sg, verb_pl, rest in _VERB_CONTRAST_FRAMES:
            out["singular"].append(f"The {nouns[0]} {verb_sg} {rest}.")
            out["plural"].append(f"The {nouns[1]} {verb_pl} {rest}.")
    return out


def _pronoun_contrast() -> dict[str, list[str]]:
    return {
        side: [
            f"{subject} {activity.format(p=_PRONOUN_CONTRAST_POSSESSIVE[side])}."
            for subject in subjects
            for activity in _PRONOUN_CONTRAST_ACTIVITIES
        ]
        for side, subjects in _PRONOUN_CONTRAST_SUBJECTS.items()
    }


def _continent_contrast() -> dict[str, list[str]]:
    return {
        side: [frame.format(c=city) for city in cities for frame in _CONTINENT_CONTRAST_FRAMES]
        + list(_CONTINENT_CONTRAST_EXTRA[side])
        for side, cities in _CONTINENT_CONTRAST_CITIES.items()
    }


_CONTRAST_BUILDERS: dict[str, Callable[[], dict[str, list[str]]]] = {
    "sentiment": _sentiment_contrast,
    "verbs": _verb_contrast,
    "pronouns": _pronoun_contrast,
    "continents": _continent_contrast,
}


def contrast_set(subtask: str, n: int | None = None, seed: int = 0) -> dict[str, list[str]]:
    """Two sets of short plain sentences on either side of a sub-task's concept.

    sentiment: ``positive`` / ``negative``; verbs: ``plural`` / ``singular``; pronouns:
    ``female`` / ``male``; continents: ``europe`` / ``asia``. The sentences are not in the
    task's prompt format and are never task items. Both sides are built as parallel lists
    (for sentiment, verbs and pronouns, minimal pairs: the i-th sentences differ only in the
    concept) and shuffled by ``seed`` with the same permutation, so they stay aligned; ``n``
    takes the first ``n`` sentences of each side.
    """
    check_subtask(subtask)
    sets = _CONTRAST_BUILDERS[subtask]()
    out = {}
    for side in CONTRAST_SIDES[subtask]:
        sentences = list(sets[side])
        rng_for("contrast_set", subtask, seed).shuffle(sentences)
        k = check_n(n, len(sentences), f"contrast_set({subtask!r})[{side!r}]")
        out[side] = sentences[:k]
    return out
