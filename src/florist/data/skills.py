"""The embedded skills set: short-answer instruction tasks florist generates itself (no download).

Each skill is a small generator ``(rng) -> Example`` whose response is a few tokens long and correct
by construction, so a model can be scored by exact match (``florist.eval.exact_match``). The skill's
name is the example's ``category``: split by category (``dirichlet_partition(..., label=category)``)
each client holds mostly one or two skills, and the global model is scored on all of them.

    from florist.data.skills import make_skills_dataset
    train, test = make_skills_dataset(n_train_per_skill=120, n_test_per_skill=30, seed=0)

The skills were chosen by measurement on SmolLM2-135M-Instruct: the base model answers none of them
exactly (it writes a sentence, "The capital city of Estonia is Tallinn."), and a LoRA on q_proj,v_proj
learns each within a few dozen mixed steps. Skills tried and dropped because they did not move in
60 such steps: reversing or hyphen-spelling a word, its last letter, the n-th word of a list,
counting list items; "which number is larger" moved only to chance (0.5); uppercasing cannot be
scored once ``normalize`` lowercases.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from florist.data.prompt import prompt
from florist.data.records import Example
from florist.errors import ConfigError

Skill = Callable[[random.Random], Example]
MAX_DRAWS_PER_EXAMPLE = 50

WORDS = (
    "apple", "river", "lamp", "cloud", "bread", "stone", "horse", "table", "chair", "garden",
    "window", "candle", "forest", "pencil", "bottle", "rabbit", "ladder", "basket", "mirror", "planet",
    "tiger", "lemon", "honey", "jacket", "pillow", "rocket", "castle", "bridge", "carpet", "dragon",
    "engine", "feather", "guitar", "hammer", "island", "kettle", "meadow", "needle", "orange", "parrot",
    "pepper", "silver", "spider", "sugar", "tomato", "violin", "wallet", "wizard", "yellow", "zebra",
    "anchor", "button", "cactus", "desert", "falcon", "ginger", "harbor", "insect", "jungle", "kitten",
    "marble", "number", "oyster", "pirate", "quartz", "ribbon", "saddle", "turtle", "valley", "walnut",
    "book", "door", "fish", "milk", "rain", "ship", "tree", "wolf", "bird", "cake",
    "coin", "desk", "frog", "gold", "hill", "king", "leaf", "moon", "nest", "road",
)  # fmt: skip

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "Russia": "Moscow", "Egypt": "Cairo", "Greece": "Athens",
    "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki", "Denmark": "Copenhagen",
    "Poland": "Warsaw", "Austria": "Vienna", "Hungary": "Budapest", "Ireland": "Dublin",
    "Belgium": "Brussels", "Netherlands": "Amsterdam", "Kenya": "Nairobi", "Peru": "Lima",
    "Chile": "Santiago", "Argentina": "Buenos Aires", "Cuba": "Havana", "Thailand": "Bangkok",
    "Vietnam": "Hanoi", "South Korea": "Seoul", "India": "New Delhi", "Iran": "Tehran", "Iraq": "Baghdad",
    "Turkey": "Ankara", "Canada": "Ottawa", "Australia": "Canberra", "Indonesia": "Jakarta",
    "Philippines": "Manila", "Romania": "Bucharest", "Bulgaria": "Sofia", "Serbia": "Belgrade",
    "Croatia": "Zagreb", "Switzerland": "Bern", "Saudi Arabia": "Riyadh", "Syria": "Damascus",
    "Lebanon": "Beirut", "Jordan": "Amman", "Afghanistan": "Kabul", "Pakistan": "Islamabad",
    "Nepal": "Kathmandu", "Bangladesh": "Dhaka", "Morocco": "Rabat", "Ghana": "Accra",
    "Venezuela": "Caracas", "Ecuador": "Quito", "Uruguay": "Montevideo", "Iceland": "Reykjavik",
    "Estonia": "Tallinn", "Latvia": "Riga", "Lithuania": "Vilnius", "Slovakia": "Bratislava",
    "Malaysia": "Kuala Lumpur", "Cambodia": "Phnom Penh", "New Zealand": "Wellington",
    "Uganda": "Kampala", "Senegal": "Dakar", "Algeria": "Algiers", "Tunisia": "Tunis",
    "Sudan": "Khartoum", "Qatar": "Doha", "United Kingdom": "London", "Mexico": "Mexico City",
}  # fmt: skip

# Pairs whose opposite is the usual one both ways (no "light" (dark? heavy?), "old" (young? new?)).
OPPOSITE_PAIRS = (
    ("hot", "cold"), ("happy", "sad"), ("open", "closed"), ("full", "empty"), ("rich", "poor"),
    ("strong", "weak"), ("wet", "dry"), ("clean", "dirty"), ("up", "down"), ("inside", "outside"),
    ("love", "hate"), ("push", "pull"), ("buy", "sell"), ("alive", "dead"), ("true", "false"),
    ("day", "night"), ("north", "south"), ("east", "west"), ("friend", "enemy"), ("question", "answer"),
    ("wide", "narrow"), ("deep", "shallow"), ("sweet", "sour"), ("cheap", "expensive"), ("polite", "rude"),
    ("safe", "dangerous"), ("above", "below"), ("before", "after"), ("always", "never"), ("asleep", "awake"),
    ("add", "subtract"), ("remember", "forget"), ("black", "white"), ("boy", "girl"), ("brother", "sister"),
    ("king", "queen"), ("man", "woman"), ("father", "mother"), ("son", "daughter"), ("husband", "wife"),
    ("uncle", "aunt"), ("entrance", "exit"), ("male", "female"), ("floor", "ceiling"), ("front", "back"),
    ("guilty", "innocent"), ("hero", "villain"), ("import", "export"), ("increase", "decrease"),
    ("inner", "outer"), ("input", "output"), ("laugh", "cry"), ("lend", "borrow"), ("maximum", "minimum"),
    ("most", "least"), ("multiply", "divide"), ("positive", "negative"), ("private", "public"),
    ("pass", "fail"), ("rough", "smooth"), ("rural", "urban"), ("send", "receive"), ("sunrise", "sunset"),
    ("top", "bottom"), ("visible", "invisible"), ("victory", "defeat"), ("vertical", "horizontal"),
    ("winter", "summer"), ("yes", "no"), ("ancient", "modern"), ("success", "failure"), ("even", "odd"),
    ("plus", "minus"), ("upstairs", "downstairs"), ("forward", "backward"), ("with", "without"),
    ("include", "exclude"), ("majority", "minority"), ("major", "minor"), ("permanent", "temporary"),
    ("natural", "artificial"), ("win", "lose"), ("early", "late"), ("high", "low"), ("left", "right"),
    ("loud", "quiet"),
)  # fmt: skip
OPPOSITES = {**dict(OPPOSITE_PAIRS), **{b: a for a, b in OPPOSITE_PAIRS}}

ONES = ("", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEENS = ("ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
         "eighteen", "nineteen")  # fmt: skip
TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")


def number_to_words(n: int) -> str:
    """English words of ``n`` in 1..99: ``47 -> "forty-seven"``, ``13 -> "thirteen"``, ``40 -> "forty"``."""
    if not 1 <= n <= 99:
        raise ValueError(f"number_to_words covers 1..99, got {n}")
    if n < 10:
        return ONES[n]
    if n < 20:
        return TEENS[n - 10]
    tens, ones = divmod(n, 10)
    return TENS[tens] + (f"-{ONES[ones]}" if ones else "")


def capital(rng: random.Random) -> Example:
    """Country -> its capital, from the fixed table ``CAPITALS`` (70 distinct prompts)."""
    country = rng.choice(sorted(CAPITALS))
    return Example("Name the capital city of the country.", CAPITALS[country], country, "capital")


def opposite(rng: random.Random) -> Example:
    """Word -> its opposite, from the fixed table ``OPPOSITES`` (both directions of each pair)."""
    word = rng.choice(sorted(OPPOSITES))
    return Example("Give the opposite of the word.", OPPOSITES[word], word, "opposite")


def first_letter(rng: random.Random) -> Example:
    """Word -> its first letter."""
    word = rng.choice(WORDS)
    return Example("What is the first letter of the word?", word[0], word, "first_letter")


def add(rng: random.Random) -> Example:
    """Two numbers from 1 to 49 -> their sum."""
    a, b = rng.randint(1, 49), rng.randint(1, 49)
    return Example("Add the two numbers.", str(a + b), f"{a} + {b}", "add")


def next_number(rng: random.Random) -> Example:
    """Four terms of an arithmetic sequence (start 1..30, step 2..9) -> the fifth."""
    start, step = rng.randint(1, 30), rng.randint(2, 9)
    terms = [start + step * i for i in range(5)]
    context = ", ".join(str(t) for t in terms[:4])
    return Example("What number comes next in the sequence?", str(terms[4]), context, "next_number")


def to_words(rng: random.Random) -> Example:
    """A number from 1 to 99 in digits -> in English words (``47 -> forty-seven``)."""
    n = rng.randint(1, 99)
    return Example("Write the number in words.", number_to_words(n), str(n), "to_words")


def sort_numbers(rng: random.Random) -> Example:
    """Three distinct numbers from 1 to 99 -> the same numbers in increasing order."""
    nums = rng.sample(range(1, 100), 3)
    return Example(
        "Sort the numbers from smallest to largest.",
        ", ".join(str(n) for n in sorted(nums)),
        ", ".join(str(n) for n in nums),
        "sort",
    )


SKILLS: dict[str, Skill] = {
    "capital": capital,
    "opposite": opposite,
    "first_letter": first_letter,
    "add": add,
    "next_number": next_number,
    "to_words": to_words,
    "sort": sort_numbers,
}


def resolve_skills(skills: Sequence[str] | None = None) -> list[str]:
    """The skill names to generate (all of ``SKILLS`` by default); an unknown name is a ``ConfigError``."""
    names = list(SKILLS) if skills is None else list(skills)
    unknown = [s for s in names if s not in SKILLS]
    if unknown:
        raise ConfigError(f"unknown skill(s) {unknown}; choose from {sorted(SKILLS)}")
    if not names or len(set(names)) != len(names):
        raise ConfigError(f"skills must be a non-empty list without repeats, got {names}")
    return names


def generate_skills(n_per_skill: int, seed: int, skills: Sequence[str] | None = None) -> list[Example]:
    """``n_per_skill`` examples of each skill, skill after skill (prompts may repeat).

    Each skill draws from its own ``random.Random(f"{seed}:{name}")``, so its examples depend on
    ``seed`` alone, not on which other skills are asked for.
    """
    if n_per_skill < 0:
        raise ConfigError(f"n_per_skill must be >= 0, got {n_per_skill}")
    out: list[Example] = []
    for name in resolve_skills(skills):
        rng = _rng(seed, name)
        out.extend(SKILLS[name](rng) for _ in range(n_per_skill))
    return out


def make_skills_dataset(
    n_train_per_skill: int, n_test_per_skill: int, seed: int, skills: Sequence[str] | None = None
) -> tuple[list[Example], list[Example]]:
    """Train and test examples per skill; test prompts are distinct and none appears in train.

    Test examples are drawn first (distinct prompts); train examples are then drawn from the same
    generator skipping every test prompt (train prompts may repeat when a skill has few prompts).
    """
    if n_train_per_skill < 0 or n_test_per_skill < 0:
        raise ConfigError(f"example counts must be >= 0, got {n_train_per_skill}, {n_test_per_skill}")
    train: list[Example] = []
    test: list[Example] = []
    for name in resolve_skills(skills):
        rng = _rng(seed, name)
        held = _distinct(name, rng, n_test_per_skill)
        test.extend(held)
        train.extend(_draw_avoiding(name, rng, n_train_per_skill, {prompt(ex) for ex in held}))
    return train, test


def _rng(seed: int, name: str) -> random.Random:
    return random.Random(f"{seed}:{name}")  # a str seed is hashed with SHA-512: stable across runs


def _distinct(name: str, rng: random.Random, n: int) -> list[Example]:
    seen: dict[str, Example] = {}
    for _ in range(n * MAX_DRAWS_PER_EXAMPLE):
        if len(seen) == n:
            break
        ex = SKILLS[name](rng)
        seen.setdefault(prompt(ex), ex)
    if len(seen) < n:
        raise ConfigError(f"skill {name!r} gave only {len(seen)} distinct prompts, fewer than the {n} asked")
    return list(seen.values())


def _draw_avoiding(name: str, rng: random.Random, n: int, avoid: set[str]) -> list[Example]:
    out: list[Example] = []
    for _ in range(n * MAX_DRAWS_PER_EXAMPLE):
        if len(out) == n:
            break
        ex = SKILLS[name](rng)
        if prompt(ex) not in avoid:
            out.append(ex)
    if len(out) < n:
        raise ConfigError(f"skill {name!r} has too few prompts left after the test split for {n} examples")
    return out
