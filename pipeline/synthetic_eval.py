"""Held-out evaluation items of the synthetic data: items a 135M model answers clearly above chance.

The local lm-eval suite (``eval=local``) reads two files the pair stage writes from these:
- ``eval_mc`` (ARC-shaped multiple choice): one-step arithmetic, ``What is 7 + 5?`` (answers >= 3),
  with ``choices`` distinct numeric options; the distractors lie within 4 of the answer (the magnitude
  alone does not give it away). Two things are balanced, each block of ``choices`` consecutive items
  taking every value once in a seeded order: the gold POSITION (a model that always picks one position
  scores chance) and the answer's RANK among the options (so does one that picks the smallest, the
  largest or the middle number).
- ``eval_gen`` (GSM8K-shaped generation): one- or two-step word problems of the training generator's
  template with a step-by-step solution ending in ``#### <answer>``; never a training question.

Both come from their own random stream (``synthetic_math:eval:<seed>``), so the number or recipe of the
evaluation items never changes the training pairs. docs/data.md describes the recipe.
"""

from __future__ import annotations

import random
from typing import Any

from pipeline.errors import UserError

WINDOW = 4  # distractors lie in [answer - WINDOW, answer + WINDOW], never negative
MIN_OPERAND = 2
MIN_ANSWER = 3  # leaves 3 non-negative numbers below every answer: any rank is possible with 4 options
MAX_CHOICES = MIN_ANSWER + 1
GEN_STEPS = (1, 2)


def arithmetic_questions(max_operand: int) -> list[tuple[str, int]]:
    """Every distinct one-step question on operands in [2, max_operand]: sums, and differences >= 3."""
    numbers = range(MIN_OPERAND, max_operand + 1)
    sums = [(f"What is {a} + {b}?", a + b) for a in numbers for b in numbers]
    differences = [(f"What is {a} - {b}?", a - b) for a in numbers for b in numbers if a - b >= MIN_ANSWER]
    return sums + differences


def balanced(rng: random.Random, count: int, choices: int) -> list[int]:
    """``count`` values in [0, choices): each block of ``choices`` is a seeded permutation of them."""
    positions: list[int] = []
    while len(positions) < count:
        positions.extend(rng.sample(range(choices), choices))
    return positions[:count]


def check_settings(count: int, choices: int, max_operand: int) -> None:
    """One-line errors for settings the generator cannot meet (also run before any model loads)."""
    if not 2 <= choices <= MAX_CHOICES:
        raise UserError(f"data.eval_choices={choices}: expected 2 to {MAX_CHOICES} options")
    if max_operand < MIN_OPERAND:
        raise UserError(f"data.eval_max_operand={max_operand}: expected a whole number >= {MIN_OPERAND}")
    pool = len(arithmetic_questions(max_operand))
    if count > pool:
        raise UserError(f"data.num_eval_items={count}: only {pool} distinct questions with "
                        f"data.eval_max_operand={max_operand}; raise it or lower num_eval_items")


def mc_items(rng: random.Random, count: int, choices: int, max_operand: int) -> list[dict[str, Any]]:
    pool = arithmetic_questions(max_operand)
    items = []
    rows = zip(rng.sample(pool, count), balanced(rng, count, choices), balanced(rng, count, choices))
    for number, ((question, answer), gold, rank) in enumerate(rows):
        wrong = (rng.sample(range(max(0, answer - WINDOW), answer), rank)  # `rank` options below the answer
                 + rng.sample(range(answer + 1, answer + WINDOW + 1), choices - 1 - rank))
        rng.shuffle(wrong)
        options = wrong[:gold] + [answer] + wrong[gold:]
        items.append({"id": f"mc-{number:05d}", "question": question, "choices": [str(o) for o in options],
                      "answer": gold})
    return items


def gen_items(rng: random.Random, count: int, exclude: set[str]) -> list[dict[str, Any]]:
    from pipeline.synthetic import make_problem, solution  # the training generator's template
    items, seen = [], set(exclude)
    for _ in range(count * 50):  # a bound on redraws of known questions; only a tiny space exhausts it
        if len(items) == count:
            break
        problem = make_problem(rng, GEN_STEPS)
        if problem.question() in seen:
            continue
        seen.add(problem.question())
        items.append({"id": f"gen-{len(items):05d}", "question": problem.question(),
                      "solution": solution(problem), "answer": str(problem.answer)})
    return items


def eval_items(seed: int, count: int, choices: int, max_operand: int, exclude: set[str]) -> dict[str, list[dict[str, Any]]]:
    """``count`` multiple-choice and ``count`` generation items, a pure function of the arguments."""
    check_settings(count, choices, max_operand)
    rng = random.Random(f"synthetic_math:eval:{seed}")
    return {"eval_mc": mc_items(rng, count, choices, max_operand), "eval_gen": gen_items(rng, count, exclude)}
