"""The synthetic arithmetic generator: correct, deterministic, the three pair kinds, disjoint eval items."""

from __future__ import annotations

import re

import pytest

from pipeline.data.distance import pairwise_distances
from pipeline.errors import UserError
from pipeline.data.synthetic import generate

MIX = {"corrupt_step": 0.45, "wrong_solution": 0.3, "mc_distractor": 0.25}
EQUATION = re.compile(r"(\d+) ([-+*]) (\d+) = (\d+)")
MC_QUESTION = re.compile(r"What is (\d+) ([-+]) (\d+)\?")
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


@pytest.fixture(scope="module")
def data():
    return generate(0, 400, 100, MIX)


def by_kind(data, kind):
    return [p for p in data["pairs"] if p["kind"] == kind]


def final_answer(text):
    return text.rsplit("#### ", 1)[1].strip()


def test_default_size_and_mix(data):
    assert 500 <= len(data["pairs"]) <= 700
    counts = {k: len(by_kind(data, k)) for k in MIX}
    assert all(n > 50 for n in counts.values()), counts
    assert len(data["eval_mc"]) == len(data["eval_gen"]) == 100


def test_deterministic_and_seed_dependent(data):
    assert generate(0, 400, 100, MIX) == data
    assert generate(1, 400, 100, MIX)["pairs"] != data["pairs"]


def test_chosen_solutions_are_correct_arithmetic(data):
    for pair in by_kind(data, "corrupt_step") + by_kind(data, "wrong_solution"):
        lines = pair["chosen"].splitlines()
        assert 2 <= len(lines) - 1 <= 4 and lines[-1].startswith("#### ")
        results = []
        for line in lines[:-1]:
            a, op, b, c = EQUATION.search(line).groups()
            assert OPS[op](int(a), int(b)) == int(c), line
            assert int(c) <= 40
            results.append(c)
        assert final_answer(pair["chosen"]) == results[-1]


def test_corrupt_step_changes_one_intermediate_result_only(data):
    for pair in by_kind(data, "corrupt_step"):
        chosen, rejected = pair["chosen"].splitlines(), pair["rejected"].splitlines()
        differing = [i for i, (c, r) in enumerate(zip(chosen, rejected)) if c != r]
        assert len(differing) == 1 and differing[0] < len(chosen) - 2  # not the last step, not the answer
        assert final_answer(pair["chosen"]) == final_answer(pair["rejected"])
        a, op, b, c = EQUATION.search(rejected[differing[0]]).groups()
        assert OPS[op](int(a), int(b)) != int(c)  # the corrupted result is wrong
    _, ned = pairwise_distances([p["chosen"] for p in by_kind(data, "corrupt_step")],
                                [p["rejected"] for p in by_kind(data, "corrupt_step")])
    assert ned.max() < 0.05


def test_wrong_solution_has_a_wrong_answer_and_high_distance(data):
    pairs = by_kind(data, "wrong_solution")
    assert all(final_answer(p["chosen"]) != final_answer(p["rejected"]) for p in pairs)
    _, ned = pairwise_distances([p["chosen"] for p in pairs], [p["rejected"] for p in pairs])
    assert ned.min() > 0.4


def test_mc_distractor_pairs_follow_the_arc_recipe(data):
    pairs = by_kind(data, "mc_distractor")
    prompts = {}
    for pair in pairs:
        prompts.setdefault(pair["raw_prompt"], []).append(pair)
        assert re.search(r"\nA\. .+\nB\. .+\nC\. .+\nD\. .+\nAnswer:$", pair["raw_prompt"])
        assert pair["chosen"] != pair["rejected"]
    assert all(len(group) == 3 for group in prompts.values())  # one pair per distractor


def test_eval_items_are_well_formed_and_disjoint_from_training_problems(data):
    train_questions = set(data["train_questions"])
    for mc, gen in zip(data["eval_mc"], data["eval_gen"]):
        assert set(mc) == {"id", "question", "choices", "answer"} and set(gen) == {"id", "question", "solution", "answer"}
        assert mc["question"] not in train_questions and gen["question"] not in train_questions
        assert gen["answer"] == final_answer(gen["solution"])
        assert 1 <= len(gen["solution"].splitlines()) - 1 <= 2  # one- or two-step word problems
        for line in gen["solution"].splitlines()[:-1]:
            a, op, b, c = EQUATION.search(line).groups()
            assert OPS[op](int(a), int(b)) == int(c), line
    training_texts = "\n".join(p["raw_prompt"] for p in data["pairs"])
    assert not any(gen["question"] in training_texts for gen in data["eval_gen"])
    assert len({m["id"] for m in data["eval_mc"]}) == len({g["question"] for g in data["eval_gen"]}) == 100
    assert len({m["question"] for m in data["eval_mc"]}) == 100


@pytest.mark.parametrize("choices", [2, 3, 4])
def test_mc_items_have_one_correct_choice_distinct_near_distractors_and_balanced_gold(choices):
    items = generate(0, 10, 300, MIX, eval_choices=choices)["eval_mc"]
    for item in items:
        a, op, b = MC_QUESTION.fullmatch(item["question"]).groups()
        truth = OPS[op](int(a), int(b))
        values = [int(c) for c in item["choices"]]
        assert len(values) == choices and len(set(values)) == choices  # distractors distinct
        assert [i for i, v in enumerate(values) if v == truth] == [item["answer"]]  # exactly one correct
        assert all(0 <= v and abs(v - truth) <= 4 for v in values)  # near the answer, never negative
    # A model that always picks one position, or the smallest / largest / middle number, scores chance:
    # every block of `choices` items puts the answer once at each position and once at each rank.
    gold = [item["answer"] for item in items]
    ranks = [sorted(map(int, i["choices"])).index(int(i["choices"][i["answer"]])) for i in items]
    for values in (gold, ranks):
        for start in range(0, len(values) - choices + 1, choices):
            assert sorted(values[start:start + choices]) == list(range(choices))
    assert len(set(gold[:24])) == choices and gold[:choices] * (24 // choices) != gold[:24]  # seeded, not cyclic


def test_eval_items_do_not_change_the_training_pairs():
    base = generate(0, 60, 20, MIX)
    other = generate(0, 60, 300, MIX, eval_choices=2, eval_max_operand=50)
    assert other["pairs"] == base["pairs"] and other["eval_mc"] != base["eval_mc"][:20]
    assert generate(0, 60, 20, MIX) == base  # deterministic


def test_eval_settings_the_generator_cannot_meet_fail_in_one_line():
    with pytest.raises(UserError, match=r"^data\.eval_choices=5: expected 2 to 4 options$"):
        generate(0, 10, 10, MIX, eval_choices=5)
    with pytest.raises(UserError, match=r"^data\.num_eval_items=200: only 102 distinct questions with data\.eval_max_operand=10"):
        generate(0, 10, 200, MIX, eval_max_operand=10)


# ---------------------------------------------------------------- another domain: data=synthetic_words

WORD_MIX = {"corrupt_step": 0, "wrong_solution": 0, "mc_distractor": 0, "reverse_word": 0.4, "sort_words": 0.3,
            "antonym": 0.3}


def test_word_pairs_are_correct_non_numeric_and_deterministic():
    from pipeline.data.synthetic_words import ANTONYMS
    words = generate(0, 300, 20, WORD_MIX)
    assert words == generate(0, 300, 20, WORD_MIX) and words["pairs"] != generate(1, 300, 20, WORD_MIX)["pairs"]
    kinds = {p["kind"] for p in words["pairs"]}
    assert kinds == {"reverse_word", "sort_words", "antonym"} and len(words["pairs"]) == 300
    opposite = {a: b for pair in ANTONYMS for a, b in (pair, pair[::-1])}
    for pair in words["pairs"]:
        text = pair["raw_prompt"] + pair["chosen"] + pair["rejected"]
        assert not re.search(r"\d", text), pair  # no arithmetic anywhere in this domain
        assert pair["chosen"] != pair["rejected"]
        if pair["kind"] == "reverse_word":
            word = re.fullmatch(r'Write the word "(\w+)" backwards\.', pair["raw_prompt"]).group(1)
            assert pair["chosen"] == word[::-1] and sorted(pair["rejected"]) == sorted(word)
        elif pair["kind"] == "sort_words":
            listed = pair["raw_prompt"].split(": ", 1)[1].rstrip(".").split(", ")
            assert pair["chosen"].split(", ") == sorted(listed)
            assert sorted(pair["rejected"].split(", ")) == sorted(listed) and pair["rejected"].split(", ") != sorted(listed)
        else:
            word = re.fullmatch(r'What is the opposite of "(\w+)"\?', pair["raw_prompt"]).group(1)
            assert pair["chosen"] == f"The opposite of {word} is {opposite[word]}."
    # the held-out items stay arithmetic: reasoning is measured off the training domain
    assert all(re.search(r"\d", item["question"]) for item in words["eval_gen"] + words["eval_mc"])


def test_word_kinds_at_weight_zero_leave_the_arithmetic_pairs_unchanged():
    mix = {"corrupt_step": 0.45, "wrong_solution": 0.30, "mc_distractor": 0.25}
    assert generate(0, 60, 20, mix) == generate(0, 60, 20, {**mix, "reverse_word": 0, "sort_words": 0, "antonym": 0})


def test_synthetic_words_preset_composes_with_only_word_kinds():
    from tests.conftest import compose_config
    from pipeline.orchestration.validate import validate
    cfg = compose_config("data=synthetic_words")
    assert {k for k, v in cfg.data.kind_mix.items() if v > 0} == {"reverse_word", "sort_words", "antonym"}
    validate(cfg)
    with pytest.raises(UserError, match=r"data\.kind_mix=.*reverse_word, sort_words, antonym"):
        validate(compose_config("data=synthetic_words", "+data.kind_mix.spelling=1"))
