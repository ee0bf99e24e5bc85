"""The embedded corpus: English text generated from this module's own templates, the same on every Python.

Nothing is read from outside the repository, so the quickstart's data (and every figure and golden
trace made from it) depends only on this file. A seeded generator (splitmix64, not `random`, whose
algorithms are not promised to stay the same) fills templates of four kinds, all written for this project:

- facts: capitals of countries, colours of things, sounds of animals, what people in some jobs do;
- arithmetic: sums and differences of small numbers, in words and in symbols ("7 plus 5 is 12.");
- sequences: counting, days of the week, months, the alphabet;
- stories: a few sentences about a person, a thing, a place and a feeling, with pronouns that agree.

Pretraining documents mix them in paragraphs; SFT pairs ask one question each ("What is 12+7?" -> "19.").
The structure is simple and repetitive on purpose: a model of two million parameters trained for a few
minutes on 2 CPU cores picks up enough of it to produce recognisable sentences.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")

SEED = 20261201
NUM_DOCUMENTS = 3000
NUM_SFT_PAIRS = 6000

CAPITALS = (
    ("France", "Paris"),
    ("Italy", "Rome"),
    ("Spain", "Madrid"),
    ("Germany", "Berlin"),
    ("Portugal", "Lisbon"),
    ("Greece", "Athens"),
    ("Egypt", "Cairo"),
    ("Japan", "Tokyo"),
    ("China", "Beijing"),
    ("India", "New Delhi"),
    ("Russia", "Moscow"),
    ("Canada", "Ottawa"),
    ("Mexico", "Mexico City"),
    ("Peru", "Lima"),
    ("Kenya", "Nairobi"),
    ("Norway", "Oslo"),
    ("Sweden", "Stockholm"),
    ("Poland", "Warsaw"),
    ("Austria", "Vienna"),
    ("Ireland", "Dublin"),
)
COLOURS = (
    ("the sky", "blue"),
    ("grass", "green"),
    ("snow", "white"),
    ("coal", "black"),
    ("a banana", "yellow"),
    ("a tomato", "red"),
    ("an orange", "orange"),
    ("a plum", "purple"),
    ("the sea", "blue"),
    ("a lemon", "yellow"),
    ("milk", "white"),
    ("a leaf", "green"),
)
SOUNDS = (
    ("dog", "barks"),
    ("cat", "meows"),
    ("cow", "moos"),
    ("duck", "quacks"),
    ("lion", "roars"),
    ("sheep", "bleats"),
    ("horse", "neighs"),
    ("owl", "hoots"),
    ("bee", "buzzes"),
    ("frog", "croaks"),
)
JOBS = (
    ("baker", "bakes bread"),
    ("farmer", "grows food"),
    ("teacher", "teaches children"),
    ("doctor", "helps sick people"),
    ("pilot", "flies planes"),
    ("painter", "paints pictures"),
    ("driver", "drives a bus"),
    ("cook", "makes dinner"),
    ("writer", "writes books"),
    ("singer", "sings songs"),
)
NUMBER_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty"
).split()
DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
MONTHS = "January February March April May June July August September October November December".split()
PEOPLE = (
    ("Anna", "she", "her"),
    ("Tom", "he", "his"),
    ("Maria", "she", "her"),
    ("Ben", "he", "his"),
    ("Lucy", "she", "her"),
    ("Sam", "he", "his"),
    ("Emma", "she", "her"),
    ("Jack", "he", "his"),
)
THINGS = ("ball", "kite", "book", "hat", "box", "cup", "bike", "boat", "drum", "lamp")
THING_COLOURS = ("red", "blue", "green", "yellow", "white", "black", "small", "big")
PLACES = ("the park", "the beach", "the market", "the garden", "school", "the river", "the forest")
FEELINGS = ("happy", "glad", "tired", "proud", "surprised", "calm")
FRIENDS = ("a friend", "the teacher", "a little dog", "the neighbour", "a brother", "a sister")


class Rng:
    """splitmix64: a tiny generator whose sequence depends only on the seed, never on the Python version."""

    def __init__(self, seed: int) -> None:
        self.state = seed & 0xFFFFFFFFFFFFFFFF

    def next(self) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        return z ^ (z >> 31)

    def below(self, n: int) -> int:
        """An integer in [0, n) (the modulo bias is below 2^-50 for the sizes used here)."""
        return self.next() % n

    def pick(self, items: Sequence[T]) -> T:
        return items[self.below(len(items))]


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def fact(rng: Rng) -> str:
    kind = rng.below(4)
    if kind == 0:
        country, city = rng.pick(CAPITALS)
        return f"The capital of {country} is {city}."
    if kind == 1:
        thing, colour = rng.pick(COLOURS)
        return f"{_cap(thing)} is {colour}."
    if kind == 2:
        animal, sound = rng.pick(SOUNDS)
        return f"The {animal} {sound}."
    job, work = rng.pick(JOBS)
    return f"A {job} {work}."


def arithmetic(rng: Rng) -> str:
    a, b = rng.below(11), rng.below(11)
    kind = rng.below(4)
    if kind == 0:
        return f"{NUMBER_WORDS[a]} plus {NUMBER_WORDS[b]} is {NUMBER_WORDS[a + b]}.".capitalize()
    if kind == 1:
        return f"{a} + {b} = {a + b}."
    big, small = max(a, b), min(a, b)
    if kind == 2:
        return f"{big} - {small} = {big - small}."
    return f"{NUMBER_WORDS[big]} minus {NUMBER_WORDS[small]} is {NUMBER_WORDS[big - small]}.".capitalize()


def sequence(rng: Rng) -> str:
    kind = rng.below(4)
    if kind == 0:
        start = rng.below(10)
        return _cap(", ".join(NUMBER_WORDS[start : start + 6]) + ".")
    if kind == 1:
        start = rng.below(3)
        return f"The days of the week are {', '.join(DAYS[start:] + DAYS[:start])}."
    if kind == 2:
        start = rng.below(6)
        return f"After {MONTHS[start]} comes {MONTHS[start + 1]}, then {MONTHS[start + 2]}."
    start = rng.below(20)
    return "The letters " + " ".join("abcdefghijklmnopqrstuvwxyz"[start : start + 6]) + " follow each other."


def story(rng: Rng) -> str:
    name, subject, possessive = rng.pick(PEOPLE)
    thing = rng.pick(THINGS)
    colour = rng.pick(THING_COLOURS)
    place = rng.pick(PLACES)
    friend = rng.pick(FRIENDS)
    feeling = rng.pick(FEELINGS)
    day = rng.pick(DAYS)
    return " ".join(
        [
            f"On {day}, {name} went to {place}.",
            f"{_cap(subject)} took {possessive} {colour} {thing}.",
            f"At {place}, {subject} met {friend}.",
            f"They played with the {thing} all afternoon.",
            f"In the evening {name} went home and felt {feeling}.",
        ]
    )


def paragraph(rng: Rng) -> str:
    """One document: a story, or four to seven sentences of one of the other kinds."""
    kind = rng.below(4)
    if kind == 0:
        return story(rng)
    make: Callable[[Rng], str] = (fact, arithmetic, sequence)[kind - 1]
    return " ".join(make(rng) for _ in range(4 + rng.below(4)))


def documents(num: int = NUM_DOCUMENTS, seed: int = SEED) -> list[str]:
    """`num` pretraining documents, each one to three paragraphs; the same list for the same arguments."""
    rng = Rng(seed)
    return ["\n\n".join(paragraph(rng) for _ in range(1 + rng.below(3))) for _ in range(num)]


def question(rng: Rng) -> tuple[str, str]:
    """One SFT (prompt, response) pair."""
    kind = rng.below(6)
    if kind == 0:
        country, city = rng.pick(CAPITALS)
        return f"What is the capital of {country}?", f"The capital of {country} is {city}."
    if kind == 1:
        thing, colour = rng.pick(COLOURS)
        return f"What colour is {thing}?", f"{_cap(thing)} is {colour}."
    if kind == 2:
        animal, sound = rng.pick(SOUNDS)
        return f"What does a {animal} do?", f"The {animal} {sound}."
    if kind == 3:
        job, work = rng.pick(JOBS)
        return f"What does a {job} do?", f"A {job} {work}."
    a, b = rng.below(11), rng.below(11)
    if kind == 4:
        return f"What is {a}+{b}?", f"{a + b}."
    big, small = max(a, b), min(a, b)
    return f"What is {big}-{small}?", f"{big - small}."


def sft_pairs(num: int = NUM_SFT_PAIRS, seed: int = SEED) -> list[dict[str, str]]:
    """`num` prompt/response pairs ({"prompt": ..., "response": ...}); the same list for the same arguments."""
    rng = Rng(seed + 1)
    return [dict(zip(("prompt", "response"), question(rng), strict=True)) for _ in range(num)]
