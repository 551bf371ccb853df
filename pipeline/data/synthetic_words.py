"""Deterministic preference pairs from a domain other than arithmetic: word tasks without numbers.

BNF's reasoning claim is about training on preference data of ANOTHER domain and measuring what happens
to reasoning (the local suite's arithmetic items). The project ships no such file and must run offline,
so it generates one, as it does the arithmetic pairs: ``data=synthetic_words`` (docs/data.md). Three
kinds, each a prompt with one correct and one wrong answer and no digit anywhere:

- ``reverse_word``: "Write the word "garden" backwards." chosen = the reversal, rejected = the reversal
  with two neighbouring letters swapped (one small edit, as Smaug's corrupted step).
- ``sort_words``: "Put these words in alphabetical order: pear, fig, apple, plum." chosen = the sorted
  list, rejected = the sorted list with two neighbours swapped.
- ``antonym``: "What is the opposite of "hot"?" chosen = the antonym, rejected = a different word of
  the list, in the same sentence.

Every pair is a pure function of the random stream it is given (``synthetic.generate`` passes its own).
"""

from __future__ import annotations

import random
from typing import Any

KINDS = ("reverse_word", "sort_words", "antonym")

WORDS = (
    "apple", "garden", "window", "river", "planet", "bottle", "candle", "forest", "silver", "market",
    "pencil", "rabbit", "castle", "orange", "winter", "summer", "yellow", "purple", "basket", "button",
    "camera", "dinner", "engine", "family", "guitar", "hammer", "island", "jacket", "kitten", "ladder",
    "mirror", "needle", "office", "pepper", "puzzle", "rocket", "saddle", "tunnel", "valley", "wallet",
    "anchor", "bridge", "cactus", "dragon", "feather", "glacier", "harbor", "igloo", "jungle", "kettle",
    "lantern", "meadow", "nectar", "oyster", "parrot", "quartz", "ribbon", "spider", "tomato", "umbrella",
    "velvet", "walrus", "blanket", "cabin", "desert", "falcon", "goblet", "helmet", "insect", "lemon",
    "magnet", "noodle", "orchid", "pillow", "raven", "shadow", "temple", "violin", "whistle", "zebra",
)

ANTONYMS = (
    ("hot", "cold"), ("big", "small"), ("early", "late"), ("happy", "sad"), ("light", "dark"),
    ("open", "closed"), ("fast", "slow"), ("full", "empty"), ("high", "low"), ("hard", "soft"),
    ("old", "young"), ("rich", "poor"), ("strong", "weak"), ("wet", "dry"), ("loud", "quiet"),
    ("long", "short"), ("clean", "dirty"), ("thick", "thin"), ("asleep", "awake"), ("sharp", "dull"),
    ("begin", "end"), ("buy", "sell"), ("push", "pull"), ("win", "lose"), ("arrive", "leave"),
    ("inside", "outside"), ("above", "below"), ("before", "after"), ("always", "never"), ("true", "false"),
)


def swap_neighbours(items: list[str], rng: random.Random) -> list[str]:
    """``items`` with two neighbours at a random position exchanged (they must differ)."""
    positions = [i for i in range(len(items) - 1) if items[i] != items[i + 1]]
    i = rng.choice(positions)
    swapped = list(items)
    swapped[i], swapped[i + 1] = swapped[i + 1], swapped[i]
    return swapped


def pairs_for(kind: str, rng: random.Random) -> list[dict[str, Any]]:
    """One preference pair of ``kind`` (a list, as the arithmetic kinds return)."""
    if kind == "reverse_word":
        word = rng.choice(WORDS)
        right = word[::-1]
        prompt = f'Write the word "{word}" backwards.'
        chosen, rejected = right, "".join(swap_neighbours(list(right), rng))
    elif kind == "sort_words":
        words = rng.sample(WORDS, rng.choice((4, 5, 6)))
        right = sorted(words)
        prompt = "Put these words in alphabetical order: " + ", ".join(words) + "."
        chosen, rejected = ", ".join(right), ", ".join(swap_neighbours(right, rng))
    elif kind == "antonym":
        word, opposite = rng.choice(ANTONYMS)[:: rng.choice((1, -1))]
        wrong = rng.choice([w for pair in ANTONYMS for w in pair if w not in (word, opposite)])
        prompt = f'What is the opposite of "{word}"?'
        chosen, rejected = f"The opposite of {word} is {opposite}.", f"The opposite of {word} is {wrong}."
    else:
        raise ValueError(f"unknown word kind {kind!r}")
    return [{"raw_prompt": prompt, "chosen": chosen, "rejected": rejected, "kind": kind}]
