"""Deterministic arithmetic word problems and the preference pairs Smaug built from them.

The embedded default must run offline and no package ships preference data, so it generates its own
(docs/data.md: the recipe, pair kinds and held-out items). A problem is 2-4 steps on small numbers
with a step-by-step solution ending in ``#### <answer>``, e.g.::

    Tom has 3 apples and buys 5 more, so he has 3 + 5 = 8 apples.
    He gives away 2, so he has 8 - 2 = 6 apples.
    #### 6

Pair kinds (one kind per problem, drawn with ``kind_mix`` weights):
- ``corrupt_step``: chosen = the solution, rejected = the same text with ONE intermediate
  result changed, final answer untouched (Smaug's MetaMath recipe: low edit distance).
- ``wrong_solution``: rejected = a different, wrong line of reasoning with a wrong answer
  (high edit distance).
- ``mc_distractor``: the question with lettered options; chosen = the correct option's
  text, rejected = each distractor's text, one pair per distractor (Smaug's ARC recipe).

Held-out evaluation items (``eval_items``), generated here too: items a 135M model answers clearly above
chance. The local lm-eval suite (``eval=local``) reads two files the pair stage writes from these:
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
import string
from dataclasses import dataclass, field
from typing import Any

from pipeline.data.synthetic_words import KINDS as WORD_KINDS
from pipeline.data.synthetic_words import pairs_for as word_pairs
from pipeline.errors import UserError

NAMES = ("Tom", "Anna", "Sam", "Lily", "Ben", "Mia", "Jack", "Emma", "Leo", "Zoe", "Max", "Nina")
PRONOUN = {"Tom": "He", "Sam": "He", "Ben": "He", "Jack": "He", "Leo": "He", "Max": "He"}
ITEMS = ("apples", "books", "coins", "pencils", "stickers", "marbles", "cookies", "cards", "shells", "stamps")
GAIN = ("buys", "finds", "gets", "is given")
LOSS = ("gives away", "eats", "loses", "sells")
# Arithmetic kinds, then the word tasks of pipeline/data/synthetic_words.py (weight 0 unless data=synthetic_words;
# a kind of weight 0 draws nothing from the stream, so adding kinds leaves the arithmetic pairs unchanged).
KINDS = ("corrupt_step", "wrong_solution", "mc_distractor") + WORD_KINDS
OPTION_LETTERS = string.ascii_uppercase


@dataclass
class Step:
    op: str        # "+", "-", "*"
    operand: int
    before: int
    after: int
    verb: str


@dataclass
class Problem:
    name: str
    item: str
    start: int
    steps: list[Step] = field(default_factory=list)

    @property
    def answer(self) -> int:
        return self.steps[-1].after

    @property
    def pronoun(self) -> str:
        return PRONOUN.get(self.name, "She")

    def question(self) -> str:
        parts = [f"{self.name} has {self.start} {self.item}."]
        for step in self.steps:
            parts.append(f"Then {self.pronoun.lower()} {action(step, self.item)}.")
        parts.append(f"How many {self.item} does {self.name} have now?")
        return " ".join(parts)


def action(step: Step, item: str) -> str:
    if step.op == "*":
        return "doubles them" if step.operand == 2 else "triples them"
    return f"{step.verb} {step.operand} {'more ' if step.op == '+' else ''}{item}"


def step_line(problem: Problem, index: int, results: list[int]) -> str:
    """One solution line; ``results`` may hold a corrupted value for this step."""
    step = problem.steps[index]
    before = step.before  # the true value: a corrupted result appears exactly once
    subject = problem.name if index == 0 else problem.pronoun
    verb = "double" if step.operand == 2 else "triple"
    doing = (f"{verb}s them" if step.op == "*" else f"{step.verb} {step.operand}{' more' if step.op == '+' else ''}")
    lead = f"{subject} has {before} {problem.item} and {doing}" if index == 0 else f"{subject} {doing}"
    return f"{lead}, so {problem.pronoun.lower()} has {before} {step.op} {step.operand} = {results[index]} {problem.item}."


def solution(problem: Problem, results: list[int] | None = None) -> str:
    results = results or [step.after for step in problem.steps]
    lines = [step_line(problem, i, results) for i in range(len(problem.steps))]
    return "\n".join(lines + [f"#### {problem.answer}"])


def make_problem(rng: random.Random, steps: tuple[int, int] = (2, 4)) -> Problem:
    """A problem of ``steps`` (inclusive range) steps: 2-4 for training, 1-2 for the held-out gen items."""
    problem = Problem(name=rng.choice(NAMES), item=rng.choice(ITEMS), start=rng.randint(2, 12))
    value = problem.start
    for _ in range(rng.randint(*steps)):
        choices = ["+"] * 3 + (["-"] * 3 if value > 3 else []) + (["*"] if value <= 10 else [])
        op = rng.choice(choices)
        if op == "+":
            operand = rng.randint(2, min(10, max(2, 20 - value)))  # >= 2: "1 more apples" reads badly
            step = Step("+", operand, value, value + operand, rng.choice(GAIN))
        elif op == "-":
            operand = rng.randint(2, value - 1)
            step = Step("-", operand, value, value - operand, rng.choice(LOSS))
        else:
            operand = 2 if value > 6 else rng.choice((2, 3))
            step = Step("*", operand, value, value * operand, "")
        problem.steps.append(step)
        value = step.after
    return problem


def corrupt_step(problem: Problem, rng: random.Random) -> str:
    """The solution with one intermediate result changed once (later lines keep the true value)."""
    index = rng.randrange(len(problem.steps) - 1)  # never the last step: the final answer stays
    results = [step.after for step in problem.steps]
    true = results[index]
    results[index] = rng.choice([v for v in range(max(0, true - 3), true + 4) if v != true])
    return solution(problem, results)


def wrong_answer(problem: Problem, rng: random.Random) -> tuple[str, int]:
    """A different wrong line of reasoning: add up every number in the question."""
    numbers = [problem.start] + [step.operand for step in problem.steps]
    total = sum(numbers)
    text = f"We add all the numbers: {' + '.join(map(str, numbers))} = {total}.\n#### {total}"
    if total != problem.answer:
        return text, total
    # The naive sum happened to be right: count the steps instead (a different wrong method).
    wrong = problem.answer + rng.choice((-2, -1, 1, 2))
    return f"{problem.name} ends with the first number plus the changes, which is {wrong}.\n#### {wrong}", wrong


def distractors(problem: Problem, rng: random.Random, count: int = 3) -> list[int]:
    pool = {problem.answer + d for d in (-3, -2, -1, 1, 2, 3, 5)} | {step.after for step in problem.steps[:-1]}
    pool |= {sum([problem.start] + [s.operand for s in problem.steps])}
    pool = sorted(v for v in pool if v >= 0 and v != problem.answer)
    return rng.sample(pool, count)


def mc_item(problem: Problem, rng: random.Random) -> tuple[str, list[str], int]:
    """(question, choices, answer index) with the options shuffled deterministically."""
    options = [problem.answer] + distractors(problem, rng)
    rng.shuffle(options)
    return problem.question(), [str(o) for o in options], options.index(problem.answer)


def mc_prompt(question: str, choices: list[str]) -> str:
    lines = [question] + [f"{OPTION_LETTERS[i]}. {c}" for i, c in enumerate(choices)]
    return "\n".join(lines + ["Answer:"])


def pairs_for(problem: Problem, kind: str, rng: random.Random) -> list[dict[str, Any]]:
    if kind in WORD_KINDS:  # another domain (data=synthetic_words): the problem only keeps the stream aligned
        return word_pairs(kind, rng)
    question, correct = problem.question(), solution(problem)
    if kind == "corrupt_step":
        return [{"raw_prompt": question, "chosen": correct, "rejected": corrupt_step(problem, rng), "kind": kind}]
    if kind == "wrong_solution":
        return [{"raw_prompt": question, "chosen": correct, "rejected": wrong_answer(problem, rng)[0], "kind": kind}]
    question, choices, answer = mc_item(problem, rng)
    prompt = mc_prompt(question, choices)
    return [{"raw_prompt": prompt, "chosen": choices[answer], "rejected": choice, "kind": kind}
            for i, choice in enumerate(choices) if i != answer]


def unique_problems(rng: random.Random, count: int, exclude: set[str]) -> list[Problem]:
    problems: list[Problem] = []
    for _ in range(count * 50):  # the space of questions is huge; the bound only guards a bad config
        if len(problems) == count:
            break
        problem = make_problem(rng)
        if problem.question() not in exclude:
            exclude.add(problem.question())
            problems.append(problem)
    return problems


# ---------------------------------------------------------------- held-out evaluation items

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


def generate(seed: int, num_problems: int, num_eval_items: int, kind_mix: dict[str, float],
             eval_choices: int = 4, eval_max_operand: int = 20) -> dict[str, list[dict[str, Any]]]:
    """Training pairs and held-out evaluation items (``eval_items``, from their own random stream), all a
    pure function of the arguments."""
    rng = random.Random(f"synthetic_math:{seed}")
    kinds = [k for k in KINDS if float(kind_mix.get(k, 0)) > 0]
    weights = [float(kind_mix[k]) for k in kinds]
    train = unique_problems(rng, num_problems, set())
    pairs = []
    for problem in train:
        pairs.extend(pairs_for(problem, rng.choices(kinds, weights)[0], rng))
    questions = [p.question() for p in train]
    held_out = eval_items(seed, num_eval_items, eval_choices, eval_max_operand, exclude=set(questions))
    return {"pairs": pairs, **held_out, "train_questions": questions}
