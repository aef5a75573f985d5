"""Gender pronoun task: grammar decides, the profession's stereotype is a spurious cue.

Each example is a sentence about a person named only by a profession ("the plumber"),
with one pronoun replaced by a blank ``_____``. The model picks the grammatical pronoun
from two options. The sentence alone fixes the pronoun's case: a subject position takes
the nominative ("he"/"she"), a verb's or preposition's object takes the object case
("him"/"her"). The wrong option differs in *both* gender and case (he -> her, she -> him,
him -> she, her -> he), so grammar always decides and gender never does.

The spurious cue is the profession's gender stereotype:

- ``"train"`` and ``"test"``: the correct pronoun's gender always *agrees* with the
  stereotype (a mechanic is "he"/"him", a nurse is "she"/"her"), so "pick the pronoun
  whose gender matches the profession" is as accurate as grammar;
- ``"ood"``: it always *disagrees* (a mechanic is "she"/"her", a nurse is "he"/"him"):
  a model that learned the stereotype instead of grammar fails here.

Templates are split once, independently of any seed: :data:`HELDOUT_TEMPLATE_IDS`
(every template whose index ends in 3, 6 or 9, about 30%) are used by both "test" and
"ood", the rest (:data:`TRAIN_TEMPLATE_IDS`) only by "train". Test and ood therefore
share sentences and differ only in which gender the grammar asks for, so the ID/OOD gap
measures reliance on the stereotype, not unfamiliar wording.

Defaults of :func:`gender_pronoun`: ``n=None`` gives 1000 rows for "train" and 200 for
"test" and "ood" (see :data:`DEFAULT_N`); rows alternate male- and female-stereotyped
professions, and the correct option is "A" in half the rows. :func:`gender_contrast`
gives matched female/male sentence pairs about everyday things (no professions, no task
format) for interpreting directions as "female vs male".

All templates, professions and contrast sentences were written for this project.
"""

from __future__ import annotations

import random
import re
from typing import Any

from datasets import Dataset

from caft_tl.tasks._mc import OPTION_TOKENS, answer_token, check_n, check_split, rng_for, to_dataset

TASK = "gender_pronoun"
BLANK = "_____"
INSTRUCTION = "Choose the option corresponding to the correct pronoun."
DEFAULT_N = {"train": 1000, "test": 200, "ood": 200}

MALE_PROFESSIONS: tuple[str, ...] = (
    "mechanic",
    "plumber",
    "carpenter",
    "electrician",
    "firefighter",
    "pilot",
    "surgeon",
    "engineer",
    "construction worker",
    "bricklayer",
    "truck driver",
    "welder",
    "lumberjack",
    "miner",
    "roofer",
    "soldier",
    "security guard",
    "butcher",
    "programmer",
    "sheriff",
)

FEMALE_PROFESSIONS: tuple[str, ...] = (
    "nurse",
    "receptionist",
    "secretary",
    "nanny",
    "hairdresser",
    "librarian",
    "housekeeper",
    "babysitter",
    "dental hygienist",
    "kindergarten teacher",
    "florist",
    "beautician",
    "manicurist",
    "flight attendant",
    "makeup artist",
    "preschool teacher",
    "dietitian",
    "ballet dancer",
    "wedding planner",
    "childcare worker",
)

# The correct pronoun for (gender, case), and the distractor that flips both.
PRONOUNS = {
    ("male", "nominative"): "he",
    ("female", "nominative"): "she",
    ("male", "object"): "him",
    ("female", "object"): "her",
}
DISTRACTORS = {"he": "her", "she": "him", "him": "she", "her": "he"}

# Subject positions. The blank is always followed by a finite verb or modal, so
# "he"/"she" fit and "him"/"her" do not; never after "than", "as" or "and X".
_NOMINATIVE = (
    "The {profession} said that _____ would arrive before nine.",
    "When the {profession} got back, _____ made a cup of tea.",
    "The {profession} was tired because _____ had worked all night.",
    "After lunch, the {profession} told us that _____ needed a short break.",
    "The {profession} smiled when _____ saw the finished result.",
    "Although the {profession} was new, _____ quickly learned the routine.",
    "The {profession} called to say that _____ was stuck in traffic.",
    "Everyone agreed that the {profession} was right, even though _____ had spoken quietly.",
    "Before the {profession} left the building, _____ locked every door.",
    "The {profession} explained that _____ could not stay late on Friday.",
    "Once _____ had finished the paperwork, the {profession} went out for dinner.",
    "Because _____ was running late, the {profession} skipped breakfast.",
    "The {profession} hoped that _____ would get a promotion next year.",
    "If _____ leaves now, the {profession} will catch the last train.",
    "The {profession} admitted that _____ had forgotten the meeting.",
    "While _____ waited for the bus, the {profession} read the newspaper.",
    "The {profession} knew that _____ should have asked for help sooner.",
    "Last summer the {profession} moved to a new town, where _____ found a quiet apartment.",
    "The {profession} wondered whether _____ had left the stove on.",
    "The {profession} promised the customers that _____ would fix the problem by Monday.",
    "As soon as _____ heard the alarm, the {profession} jumped out of bed.",
    "The {profession} laughed so hard that _____ nearly dropped the coffee.",
    "Nobody expected the {profession} to win, but _____ took first prize.",
    "The {profession} checked the schedule twice because _____ did not want to miss anything.",
    "On weekends the {profession} goes hiking, and _____ always brings a camera.",
    "The {profession} forgot the umbrella, so _____ got soaked on the way back.",
    "The {profession} said _____ was happy with the new office.",
    "Even after a long shift, the {profession} insisted that _____ felt fine.",
    "The {profession} would have come to the party if _____ had been invited.",
    "During the storm, the {profession} stayed calm and _____ kept everyone informed.",
    "The {profession} paused at the door because _____ had heard a strange noise.",
    "Since _____ started the new job, the {profession} has barely had a day off.",
    "The {profession} asked whether _____ could borrow a pen.",
    "The {profession} believes that _____ will retire in a few years.",
    "After the {profession} finished the report, _____ sent it to the whole team.",
    "The {profession} looked at the clock and realised that _____ was already late.",
    "Until _____ moved to the city, the {profession} had never seen the sea.",
    "The {profession} decided that _____ would take the train instead of driving.",
    "The {profession} called the office to report that _____ was feeling ill.",
    "The {profession} was proud that _____ had finished the marathon.",
    "Every morning the {profession} walks to work, and _____ usually stops for coffee.",
    "The {profession} told the neighbours that _____ was going on holiday.",
    "When the power went out, the {profession} lit a candle so that _____ could keep reading.",
    "The {profession} was surprised to learn that _____ had won the raffle.",
    "The {profession} sighed because _____ had lost the keys again.",
    "Whenever _____ visits the market, the {profession} buys fresh bread.",
    "The {profession} wrote in the email that _____ would be away until Thursday.",
    "The {profession} missed the bus, but _____ still arrived on time.",
    "The {profession} felt nervous before the interview, yet _____ answered every question well.",
    "The {profession} said that _____ preferred working early in the morning.",
    "After the {profession} had eaten dinner, _____ went for a long walk.",
    "The {profession} could not remember where _____ had parked the car.",
    "The {profession} phoned the building office because _____ had noticed a leak.",
    "The {profession} thinks that _____ deserves a longer holiday this year.",
    "By the time _____ reached the station, the {profession} was soaking wet.",
    "The {profession} agreed to help, as long as _____ could leave by six.",
    "The {profession} replied that _____ had already signed the form.",
    "The {profession} waved at the children as _____ drove past the school.",
    "The {profession} was relieved when _____ finally found the missing file.",
    "The {profession} took a deep breath before _____ opened the envelope.",
    "In the end, the {profession} admitted that _____ had been wrong about the weather.",
    "The {profession} bought a new bike because _____ wanted to cycle to work.",
    "The {profession} told the committee that _____ disagreed with the plan.",
    "Whenever the {profession} travels, _____ packs far too many books.",
    "The {profession} is so organised that _____ never misses a deadline.",
    "The {profession} apologised because _____ had arrived an hour late.",
    "The {profession} was sure that _____ had seen that film before.",
    "If the {profession} had known about the delay, _____ would have stayed indoors.",
    "The {profession} mentioned that _____ was learning to play the piano.",
    "The {profession} stood up and announced that _____ was leaving the company.",
    "Although _____ was exhausted, the {profession} stayed until the job was done.",
    "The {profession} kept a notebook in the car in case _____ needed to write something down.",
    "After the {profession} retired, _____ spent more time in the garden.",
    "The {profession} said that _____ had grown up in a small village by the coast.",
    "Because the {profession} speaks three languages, _____ often helps the tourists.",
    "The {profession} noticed the mistake, and _____ corrected it immediately.",
    "The {profession} loves cooking, so _____ invites friends over every Sunday.",
    "As the {profession} walked into the room, _____ noticed that the lights were off.",
    "The {profession} asked the managers if _____ could work remotely on Mondays.",
    "The {profession} was worried that _____ might miss the plane.",
    "When the {profession} was young, _____ dreamed of travelling the world.",
    "The {profession} turned off the radio so that _____ could concentrate.",
    "The {profession} told us proudly that _____ had passed the exam.",
    "The {profession} hurried because _____ did not want to keep anyone waiting.",
    "The {profession} claims that _____ has never been late in ten years.",
    "The {profession} got up early, as _____ had a long drive ahead.",
    "The {profession} listened carefully, and then _____ asked a question.",
    "The {profession} was certain that _____ had locked the front door.",
    "On the first day, the {profession} was so nervous that _____ forgot the password.",
    "The {profession} has a dog, and _____ takes it for a walk every evening.",
    "The {profession} reminded everyone that _____ would be on leave next week.",
    "Unless _____ finds a parking space soon, the {profession} will be late.",
    "The {profession} changed the plan after _____ read the forecast.",
    "The {profession} was happy to help, but _____ needed the tools back by Friday.",
    "The {profession} said that _____ had never tasted anything so spicy.",
    "The {profession} went to the doctor because _____ had a terrible cough.",
    "Once the {profession} had saved enough money, _____ bought a small boat.",
    "The {profession} told the reporters that _____ had nothing more to add.",
    "The {profession} was glad that _____ had chosen the earlier train.",
    "Before _____ could answer, the {profession} was interrupted by a phone call.",
    "The {profession} realised halfway there that _____ had left the wallet at work.",
    "The {profession} said that _____ would think about the offer.",
    "The {profession} often jokes that _____ could sleep anywhere.",
    "After the {profession} heard the news, _____ called an old friend.",
    "The {profession} finished early, so _____ went to see a film.",
    "The {profession} explained to the visitors that _____ had only just arrived.",
    "The {profession} complained that _____ had been waiting for an hour.",
    "When _____ is not at work, the {profession} enjoys painting.",
    "The {profession} guessed that _____ would need a bigger suitcase.",
    "The {profession} hesitated, because _____ was not sure of the answer.",
    "The {profession} said that _____ was going to paint the kitchen blue.",
    "The {profession} stayed at the hotel where _____ had stayed as a child.",
    "The {profession} looked pleased, since _____ had solved the puzzle first.",
    "The {profession} checked the map because _____ had never been to that part of town.",
    "The {profession} hopes that _____ can visit the museum before it closes.",
    "The {profession} ran to the platform, but _____ was too late to catch the train.",
    "The {profession} whispered that _____ had a secret to share.",
    "Tired after the trip, the {profession} said _____ would go to bed early.",
)

# Object positions: after a transitive verb or a preposition whose subject is someone
# else (so no reflexive is needed), and never directly before a noun, where "her" could
# be read as a possessive.
_OBJECT = (
    "The customers liked the {profession} and thanked _____ warmly.",
    "We met the {profession} at the station and walked with _____ to the hotel.",
    "Everyone trusted the {profession}, so nobody questioned _____ about the delay.",
    "The {profession} was late, so we waited for _____ outside.",
    "I saw the {profession} yesterday and offered _____ a lift.",
    "The {profession} had a cold, so the team told _____ to rest.",
    "When the {profession} arrived, we greeted _____ at the door.",
    "The {profession} did a great job, and the clients praised _____ for it.",
    "Nobody had seen the {profession} all day, so we called _____ at lunchtime.",
    "The {profession} dropped a glove, and a stranger handed it back to _____.",
    "The neighbours invited the {profession} to dinner and asked _____ about the new job.",
    "I know the {profession} well, and I trust _____ completely.",
    "The {profession} looked lost, so we offered to help _____.",
    "The students admired the {profession} and listened to _____ carefully.",
    "The {profession} won the award, and the whole town congratulated _____.",
    "We could not find the {profession}, so we left a note for _____ on the desk.",
    "The {profession} was new in town, and the neighbours welcomed _____ with a cake.",
    "The {profession} had worked hard all year, so the company gave _____ a bonus.",
    "The {profession} was speaking too quietly, so we asked _____ to repeat the answer.",
    "The {profession} missed the meeting, so I sent the notes to _____ afterwards.",
    "The {profession} was very helpful, and we will always remember _____.",
    "After the {profession} fixed the problem, the owners paid _____ in cash.",
    "The {profession} seemed upset, so I sat down next to _____.",
    "The {profession} is always busy, but we rarely hear anyone complain about _____.",
    "The {profession} lives next door, and we often see _____ in the garden.",
    "Although the {profession} was tired, the crowd cheered for _____ loudly.",
    "The {profession} had the only key, so everyone waited for _____ at the gate.",
    "The {profession} was leaving, so the team threw a party for _____.",
    "The {profession} gave a great speech, and the audience applauded _____ for minutes.",
    "The {profession} forgot to bring lunch, so a colleague brought some soup for _____.",
    "We needed advice, so we phoned the {profession} and asked _____ for help.",
    "The {profession} was stuck at the airport, and nobody could reach _____ by phone.",
    "The {profession} had been very kind, so we bought some flowers for _____.",
    "The kids adore the {profession} and always run towards _____ after school.",
    "When the {profession} made a joke, everyone laughed with _____.",
    "The {profession} seemed confused, so I explained the rules to _____ again.",
    "I lent the {profession} an umbrella and told _____ to keep it.",
    "The {profession} will be here soon, so please save a seat for _____.",
    "The {profession} knows the area well, so the tourists followed _____ up the hill.",
    "The police stopped the {profession} and questioned _____ for an hour.",
    "The {profession} was ill, so we visited _____ in the hospital.",
    "The {profession} looked cold, so someone gave a blanket to _____.",
    "The {profession} spoke so fast that nobody could understand _____.",
    "We have not heard from the {profession} lately, so we will write to _____ tomorrow.",
    "The {profession} left early, and nobody saw _____ again that day.",
    "The {profession} had a birthday on Friday, so we surprised _____ with a cake.",
    "The {profession} was alone in the office, so I stayed and chatted with _____ for a while.",
    "The {profession} needed a ride, and a friend picked _____ up at noon.",
    "The {profession} was walking too fast, and we could barely keep up with _____.",
    "The {profession} seemed lonely, so the neighbours often dropped by to see _____.",
    "The {profession} made a small mistake, but the boss forgave _____ immediately.",
    "The {profession} answered every question, and the examiners were impressed by _____.",
    "The {profession} has a great sense of humour, and everyone enjoys working with _____.",
    "We passed the {profession} in the corridor and said hello to _____.",
    "I wanted to thank the {profession}, so I wrote a letter to _____.",
    "The {profession} was carrying heavy boxes, so two volunteers helped _____ upstairs.",
    "The {profession} asked for directions, and a passer-by pointed _____ towards the station.",
    "The {profession} was running late, so the taxi waited for _____ outside.",
    "Everyone at the party recognised the {profession} and wanted to talk to _____.",
    "The {profession} won the lottery, and reporters followed _____ everywhere.",
    "The {profession} slipped on the ice, and we helped _____ to the car.",
    "The {profession} sent a postcard, so we wrote back to _____ soon after.",
    "The {profession} is an old friend, and I have known _____ for years.",
    "The {profession} was asleep on the train, so the conductor woke _____ gently.",
    "The {profession} seemed unsure, so the group encouraged _____ to try again.",
    "The {profession} arrived with a heavy bag, and we carried it for _____.",
    "The {profession} had lost the way, so a local guided _____ to the main road.",
    "We could hear the {profession} upstairs, but we could not see _____.",
    "The {profession} won the chess game, and nobody in the club has beaten _____ since.",
    "The {profession} was not at the desk, so I left a message for _____.",
    "The {profession} had the flu, so the doctors told _____ to stay in bed.",
    "The {profession} is very popular, and the customers always ask for _____ by name.",
    "We found the {profession} in the park and sat beside _____ on the bench.",
    "The {profession} tells wonderful stories, and the children love listening to _____.",
    "The {profession} was moving house, so the neighbours helped _____ with the packing.",
    "The {profession} sounded worried on the phone, so I went over to check on _____.",
    "The {profession} was leaving for a year, and we all hugged _____ goodbye.",
    "The {profession} was too busy to cook, so a friend made dinner for _____.",
    "The {profession} came to the door, and the dog barked at _____.",
    "The {profession} plays the guitar beautifully, so we asked _____ to play a song.",
    "We owe the {profession} a favour, so we should invite _____ to the party.",
    "The {profession} looked thirsty, so I poured a glass of water for _____.",
    "The {profession} was nervous, but the team reassured _____ before the talk.",
    "The {profession} lost the ticket, but the staff let _____ in anyway.",
    "The {profession} was getting soaked, so we shared an umbrella with _____.",
    "The {profession} had been away for months, and the whole family missed _____ a lot.",
    "The {profession} was furious, so we left _____ alone for a while.",
    "The {profession} won the race, and the crowd lifted _____ into the air.",
    "The {profession} is very reliable, so the team often depends on _____.",
    "The {profession} had a great idea, and the committee supported _____ unanimously.",
    "The {profession} was waiting at the corner, and a passing bus almost splashed _____.",
    "The {profession} forgot the password, so the help desk reset it for _____.",
    "The {profession} seemed tired, so I made some coffee for _____.",
    "The {profession} told a funny story, and the guests begged _____ to tell another.",
    "The {profession} was nowhere to be found, so we searched for _____ all afternoon.",
    "The {profession} was standing in the rain, so a kind stranger stopped to pick _____ up.",
    "The {profession} looked familiar, but I could not place _____ at first.",
    "The {profession} volunteered to lead the trip, and we all agreed to follow _____.",
    "The {profession} went on holiday, so the neighbours watered the plants for _____.",
    "The {profession} has a lovely voice, and people stop to listen to _____ in the square.",
    "The {profession} was upset about the news, so we tried to cheer _____ up.",
    "The {profession} is in charge today, so please direct any questions to _____.",
    "The {profession} arrived before sunrise, and the staff let _____ through the gate.",
    "The {profession} lost the match, but the fans still cheered for _____.",
    "We saw the {profession} on television and almost did not recognise _____.",
    "The {profession} asked a good question, and the speaker thanked _____ for it.",
    "The {profession} was about to leave when the clients phoned _____ again.",
    "The {profession} did not have enough cash, so I lent some money to _____.",
    "The {profession} fell asleep on the sofa, and nobody wanted to disturb _____.",
    "The {profession} had never been to the city, so we showed _____ around.",
    "The {profession} was stuck in the lift, and the caretakers rescued _____ after an hour.",
    "The {profession} seemed eager to learn, so the older staff taught _____ patiently.",
    "The {profession} moved abroad last year, and we have not seen _____ since.",
    "The {profession} was in a hurry, so we let _____ go first.",
    "Everyone was looking for the {profession}, and I finally spotted _____ near the exit.",
    "The {profession} had worked there for decades, and the company honoured _____ with a party.",
    "When we called _____, the {profession} was already on the way.",
    "Although we warned _____ about the ice, the {profession} drove to work anyway.",
    "Nobody told _____ about the change, so the {profession} went to the wrong room.",
    "After we thanked _____, the {profession} smiled and left.",
)

TEMPLATES: tuple[tuple[str, str], ...] = tuple(("nominative", t) for t in _NOMINATIVE) + tuple(
    ("object", t) for t in _OBJECT
)

# A fixed rule on the template index, never the seed, so that no seed can leak a
# held-out sentence into training.
_HELDOUT_LAST_DIGITS = (3, 6, 9)
HELDOUT_TEMPLATE_IDS: tuple[int, ...] = tuple(
    i for i in range(len(TEMPLATES)) if i % 10 in _HELDOUT_LAST_DIGITS
)
TRAIN_TEMPLATE_IDS: tuple[int, ...] = tuple(
    i for i in range(len(TEMPLATES)) if i % 10 not in _HELDOUT_LAST_DIGITS
)


def template_ids(split: str) -> tuple[int, ...]:
    """Indices into :data:`TEMPLATES` that ``split`` draws from (test and ood share theirs)."""
    return TRAIN_TEMPLATE_IDS if check_split(split) == "train" else HELDOUT_TEMPLATE_IDS


_Combo = tuple[int, str, str]  # (template_id, profession, stereotype)


def _pronoun_gender(split: str, stereotype: str) -> str:
    if split == "ood":
        return "female" if stereotype == "male" else "male"
    return stereotype


def _interleave(first: list[_Combo], second: list[_Combo]) -> list[_Combo]:
    """Alternate the two lists (then the leftover tail) so every prefix is near balanced."""
    out = []
    for a, b in zip(first, second, strict=False):
        out += [a, b]
    longest = first if len(first) > len(second) else second
    return out + longest[min(len(first), len(second)) :]


def _correct_first_flags(k: int, round_up: bool, rng: random.Random) -> list[bool]:
    """``k`` flags, half True (rounded up or down), in random order."""
    n_true = k - k // 2 if round_up else k // 2
    flags = [True] * n_true + [False] * (k - n_true)
    rng.shuffle(flags)
    return flags


def _prompt(sentence: str, option_a: str, option_b: str, answer_format: str) -> str:
    if answer_format == "pronoun":
        lines = [INSTRUCTION, f"Question: {sentence}", f"Options: {option_a}, {option_b}"]
    else:
        lines = [INSTRUCTION, f"Question: {sentence}", f"A) {option_a}", f"B) {option_b}"]
    return "\n".join([*lines, "Answer:"])


def _row(
    split: str,
    template_id: int,
    profession: str,
    stereotype: str,
    correct_first: bool,
    answer_format: str,
) -> dict[str, Any]:
    case, text = TEMPLATES[template_id]
    sentence = text.replace("{profession}", profession)
    row = pronoun_row(split, sentence, case, stereotype, correct_first, answer_format)
    row.update(profession=profession, template_id=template_id)
    return {k: row[k] for k in _COLUMNS}


_COLUMNS = (
    "prompt", "answer", "options", "task", "split", "sentence", "profession", "stereotype",
    "pronoun", "distractor", "gender", "case", "template_id", "agrees",
)  # fmt: skip


def pronoun_row(
    split: str,
    sentence: str,
    case: str,
    stereotype: str,
    correct_first: bool,
    answer_format: str = "letter",
) -> dict[str, Any]:
    """One pronoun question: ``sentence`` holds the blank :data:`BLANK`, ``case`` is
    "nominative" or "object", ``stereotype`` the gender its profession suggests ("male" or
    "female"); the pronoun's gender agrees with it except in ``split`` "ood". Shared by the
    built-in gender tasks and the loader of the CAFT paper's gender CSV."""
    if (stereotype, case) not in {(g, c) for g, c in PRONOUNS}:
        raise ValueError(f"unknown stereotype/case {stereotype!r}/{case!r}")
    sentence = sentence[0].upper() + sentence[1:]
    gender = _pronoun_gender(check_split(split), stereotype)
    pronoun = PRONOUNS[(gender, case)]
    distractor = DISTRACTORS[pronoun]
    options = (pronoun, distractor) if correct_first else (distractor, pronoun)
    return {
        "prompt": _prompt(sentence, *options, answer_format),
        **_answer(options, correct_first, answer_format),
        "task": TASK,
        "split": split,
        "sentence": sentence,
        "stereotype": stereotype,
        "pronoun": pronoun,
        "distractor": distractor,
        "gender": gender,
        "case": case,
        "agrees": gender == stereotype,
    }


def _answer(options: tuple[str, str], correct_first: bool, answer_format: str) -> dict:
    if answer_format == "pronoun":  # answer with the word itself: no letter to bind
        return {
            "answer": f" {options[0 if correct_first else 1]}",
            "options": [f" {o}" for o in options],
        }
    return {"answer": answer_token(0 if correct_first else 1), "options": list(OPTION_TOKENS)}


ANSWER_FORMATS = ("letter", "pronoun")


def gender_pronoun(
    split: str, n: int | None = None, seed: int = 0, *, answer_format: str = "letter"
) -> Dataset:
    """``n`` pronoun questions from ``split`` ("train", "test" or "ood").

    Every (template, profession) pair of the split's templates is a candidate; male- and
    female-stereotyped candidates are shuffled separately and alternated, and the first
    ``n`` are kept (default: :data:`DEFAULT_N`, 1000 for train, 200 for test and ood).
    The correct option is "A" in half the rows of each stereotype. Row i of "test" and of
    "ood" (same seed and n) is the same sentence with the other gender. Raises ValueError for
    an unknown split or an ``n`` above the number of candidates.

    ``answer_format="letter"`` (the reference's format) lists the pronouns as ``A)`` /
    ``B)`` and the answer is the letter; ``"pronoun"`` lists them as ``Options: she, him``
    and the answer is the pronoun itself (options ``[" she", " him"]``): a small model that
    cannot yet bind answers to letters can still be trained and evaluated on the grammar.
    """
    ids = template_ids(split)
    # test and ood share their draws: row i of both is the same sentence, profession and
    # letter order, only the pronoun's gender flips, so ID vs OOD accuracy is a paired
    # comparison.
    rng = rng_for(TASK, "train" if split == "train" else "held-out", seed)
    streams = []
    for stereotype, professions in (("male", MALE_PROFESSIONS), ("female", FEMALE_PROFESSIONS)):
        combos = [(t, p, stereotype) for t in ids for p in professions]
        rng.shuffle(combos)
        streams.append(combos)
    if rng.random() < 0.5:  # which stereotype leads (gets the extra row when n is odd)
        streams.reverse()
    available = sum(map(len, streams))
    n = check_n(DEFAULT_N[split] if n is None else n, available, f"gender_pronoun {split!r}")
    chosen = _interleave(*streams)[:n]
    # Balance the answer letter within each stereotype, so that the letter carries no
    # gender signal; rounding up for one and down for the other keeps the total at n/2.
    flags = {
        s: iter(_correct_first_flags(sum(c[2] == s for c in chosen), s == "male", rng))
        for s in ("male", "female")
    }
    if answer_format not in ANSWER_FORMATS:
        raise ValueError(f"answer_format must be one of {ANSWER_FORMATS}, got {answer_format!r}")
    rows = [_row(split, t, p, s, next(flags[s]), answer_format) for t, p, s in chosen]
    return to_dataset(rows)


# Matched pairs: "[female|male]" marks every gendered word; everything else is shared.
_CONTRAST = (
    "[She|He] went to the market to buy fresh apples.",
    "[Her|His] favourite colour has always been green.",
    "The [woman|man] waited patiently at the bus stop.",
    "My [mother|father] makes the best pancakes on Sundays.",
    "The little [girl|boy] laughed at the puppy.",
    "The [queen|king] waved to the crowd from the balcony.",
    "[Emma|James] loves reading mystery novels before bed.",
    "I gave [her|him] a book for [her|his] birthday.",
    "[She|He] is learning to swim this summer.",
    "My [sister|brother] lives in a small flat near the river.",
    "The old [lady|gentleman] fed the pigeons in the park.",
    "[She|He] walked [her|his] dog around the lake.",
    "My [aunt|uncle] grows tomatoes in the back garden.",
    "The [bride|groom] arrived at the ceremony early.",
    "[Sarah|David] painted the fence on Saturday.",
    "My [grandmother|grandfather] tells the funniest stories.",
    "[She|He] forgot [her|his] keys at the café.",
    "The [girls|boys] played football until dark.",
    "[Mrs|Mr] Smith lives at the end of the street.",
    "My [wife|husband] and I went hiking in the mountains.",
    "The [princess|prince] rode through the forest.",
    "[She|He] said [she|he] would call back later.",
    "The [women|men] sang together by the fire.",
    "[Anna|Tom] baked bread for the neighbours.",
    "My [niece|nephew] is visiting us next week.",
    "[She|He] enjoys long walks on the beach.",
    "[Her|His] handwriting is very neat.",
    "The [mother|father] held the baby gently.",
    "[Lucy|Peter] won the spelling contest at school.",
    "[She|He] bought a new coat for the winter.",
    "My [girlfriend|boyfriend] cooked dinner last night.",
    "[She|He] has a cat named Pepper.",
    "The [lady|gentleman] in the blue hat smiled at us.",
    "[Maria|Michael] plays the violin every evening.",
    "[She|He] is taller than [her|his] [sister|brother].",
    "My [mum|dad] always sings in the car.",
    "[She|He] drank a glass of orange juice.",
    "The [girl|boy] built a sandcastle on the shore.",
    "[Olivia|Daniel] moved to a new house last month.",
    "[She|He] planted roses along the garden path.",
    "The [duchess|duke] opened the new bridge.",
    "[She|He] watched the sunset from the hill.",
    "[Her|His] [grandmother|grandfather] lives on a farm.",
    "[She|He] spilled coffee on [her|his] shirt.",
    "[Grace|John] is saving money for a trip to Spain.",
    "The [woman|man] next door has three cats.",
    "My [stepmother|stepfather] loves jazz music.",
    "[She|He] learned to ride a bike at six.",
    "[She|He] fell asleep on the train.",
    "The [schoolgirl|schoolboy] forgot [her|his] homework.",
    "[Hannah|Mark] ran five miles this morning.",
    "[She|He] likes [her|his] tea with milk.",
    "The [widow|widower] lives alone in a cottage.",
    "[She|He] wrote a long letter to an old friend.",
    "My [daughter|son] is learning to read.",
    "[She|He] cut [her|his] hair very short.",
    "[Laura|Paul] took the children to the zoo.",
    "The [girls|boys] shared a pizza after the match.",
    "[She|He] is afraid of spiders.",
    "[Her|His] phone rang during the film.",
    "The [queen|king] wore a golden crown.",
    "[She|He] smiled at [her|his] reflection.",
    "[Rachel|Robert] visits the museum every Tuesday.",
    "My [sister|brother] borrowed my bike.",
    "[She|He] made a sandwich for lunch.",
    "The [woman|man] at the door asked for directions.",
    "[She|He] loves the smell of rain.",
    "[Mrs|Mr] Brown waters the garden every morning.",
    "[She|He] lost [her|his] glasses again.",
    "The [mother|father] read a story to the kids.",
    "[Emma|James] is the youngest of four children.",
    "[She|He] dances whenever music plays.",
    "My [aunt|uncle] drove us to the airport.",
    "[She|He] packed [her|his] suitcase the night before.",
    "The [girl|boy] climbed the tallest tree in the park.",
    "[Sarah|David] speaks French fluently.",
    "[She|He] kept the old photos in a box.",
    "[Her|His] laugh is very loud.",
    "The [ladies|gentlemen] had tea in the garden.",
    "[She|He] took the dog for a walk after dinner.",
    "My [grandmother|grandfather] collects old stamps.",
    "[She|He] waited for [her|his] friend outside the cinema.",
    "[Anna|Tom] has a garden full of sunflowers.",
    "[She|He] opened the window to let in some air.",
    "The [empress|emperor] ruled for forty years.",
    "[She|He] always wears a red scarf.",
    "My [niece|nephew] drew a picture of a horse.",
    "[She|He] got lost in the old town.",
    "[Lucy|Peter] ate all the cherries.",
    "The [woman|man] carried the shopping up the stairs.",
    "[She|He] was born in a small village.",
    "[Her|His] garden is full of birds.",
    "[She|He] hummed a song while washing the dishes.",
    "My [mum|dad] called to ask about the weekend.",
    "[Maria|Michael] enjoys running in the rain.",
    "[She|He] found a coin on the pavement.",
    "The [girl|boy] fed carrots to the rabbit.",
    "[She|He] spent the afternoon at the beach with [her|his] [sister|brother].",
    "[Olivia|Daniel] has a loud, cheerful laugh.",
    "[She|He] finished the puzzle in an hour.",
    "The [heroine|hero] of the story saved the village.",
    "[She|He] threw the ball for the dog.",
    "My [wife|husband] prefers tea to coffee.",
    "[Grace|John] planted an apple tree last spring.",
    "[She|He] woke up early to watch the sunrise.",
    "The [women|men] laughed at the old joke.",
    "[She|He] wrapped the present carefully.",
    "[Hannah|Mark] visited [her|his] [grandmother|grandfather] on Sunday.",
    "[She|He] is the eldest [daughter|son] in the family.",
    "[Laura|Paul] crossed the street to say hello.",
    "[She|He] wore [her|his] new boots to the party.",
    "[Rachel|Robert] told us a story about a dragon.",
)

_SLOT = re.compile(r"\[([^\[\]|]+)\|([^\[\]|]+)\]")


def _contrast_pair(text: str) -> tuple[str, str]:
    return _SLOT.sub(r"\1", text), _SLOT.sub(r"\2", text)


def gender_contrast(n: int | None = None, seed: int = 0) -> dict[str, list[str]]:
    """Matched sentence pairs that differ only in gendered words, for hinted interpretation.

    Returns ``{"female": [...], "male": [...]}``, parallel lists (index ``i`` is one pair),
    shuffled by ``seed``; ``n`` keeps the first ``n`` pairs (None: all of them). No task
    format, template or profession appears in them: they describe gender, not the task.
    """
    pairs = [_contrast_pair(t) for t in _CONTRAST]
    rng_for("gender_contrast", seed).shuffle(pairs)
    pairs = pairs[: check_n(n, len(pairs), "gender_contrast")]
    return {"female": [f for f, _ in pairs], "male": [m for _, m in pairs]}


# The two-profession design of the CAFT paper's gender task (doctor / nurse), on this
# project's templates. A wider held-out share than gender_pronoun's (4 in 10 templates
# instead of 3) so that test and ood reach 190 distinct sentences with two professions.
_PAIR_HELDOUT_LAST_DIGITS = (0, 3, 6, 9)
PAIR_DEFAULT_PROFESSIONS = ("doctor", "nurse")


def _pair_template_ids(split: str) -> tuple[int, ...]:
    held_out = check_split(split) != "train"
    return tuple(
        i for i in range(len(TEMPLATES)) if (i % 10 in _PAIR_HELDOUT_LAST_DIGITS) == held_out
    )


def gender_two_professions(
    split: str,
    n: int | None = None,
    seed: int = 0,
    *,
    male: str = PAIR_DEFAULT_PROFESSIONS[0],
    female: str = PAIR_DEFAULT_PROFESSIONS[1],
    answer_format: str = "pronoun",
) -> Dataset:
    """The gender task with two professions only, as the CAFT paper builds it.

    One male-stereotyped profession (``male``, default "doctor") and one female-stereotyped
    one (``female``, default "nurse") fill every template of the split, so the spurious cue
    is a single word that predicts the pronoun's gender perfectly in "train" and "test" and
    never in "ood" (the grammar still decides, as in :func:`gender_pronoun`). Templates whose
    index ends in 0, 3, 6 or 9 (95 of 238) are held out for "test" and "ood"; the others
    (143) are "train". ``n=None`` gives every (template, profession) pair: 286 "train" rows
    and 190 "test" / "ood" rows; row i of "test" and "ood" is the same sentence with the
    other gender. The correct option comes first in half the rows of each profession.

    The paper used 784 templates of its own with the same two professions; its data load
    with :func:`caft_tl.tasks.load_reference_gender`.
    """
    if not (isinstance(male, str) and isinstance(female, str) and male and female):
        raise ValueError(f"male and female must be non-empty strings, got {male!r}, {female!r}")
    if male == female:
        raise ValueError(f"male and female must differ, got {male!r} twice")
    if answer_format not in ANSWER_FORMATS:
        raise ValueError(f"answer_format must be one of {ANSWER_FORMATS}, got {answer_format!r}")
    ids = _pair_template_ids(split)
    rng = rng_for(TASK, "two-professions", "train" if split == "train" else "held-out", seed)
    streams = []
    for stereotype, profession in (("male", male), ("female", female)):
        combos = [(t, profession, stereotype) for t in ids]
        rng.shuffle(combos)
        streams.append(combos)
    available = sum(map(len, streams))
    n = check_n(len(ids) * 2 if n is None else n, available, f"gender_two_professions {split!r}")
    chosen = _interleave(*streams)[:n]
    flags = {
        s: iter(_correct_first_flags(sum(c[2] == s for c in chosen), s == "male", rng))
        for s in ("male", "female")
    }
    rows = [_row(split, t, p, s, next(flags[s]), answer_format) for t, p, s in chosen]
    return to_dataset(rows)
