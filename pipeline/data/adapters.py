"""Adapt preference data from its schema to pairs, one row at a time (a whole source: pipeline/data/adapt_source.py).

Schemas (``data.schema``; ``auto`` detects one from the column names and logs it):
  (a) prompt_chosen_rejected  explicit prompt/chosen/rejected strings (Smaug's sets)
  (b) chat_messages           chosen/rejected are lists of {role, content} (UltraFeedback-binarized)
  (c) transcript              chosen/rejected are whole dialogues sharing a prefix (HH-RLHF)
  (d) scored_completions      a prompt and scored completions -> pairs by a strategy
  (e) multiple_choice         question, choices, answer -> correct vs each distractor
  (f) unpaired                prompt, completion, boolean label (kept unpaired, for BNF)
Column names come from ``data.columns``. Whole-file problems and missing or wrongly typed
fields raise a one-line ``UserError``; row-level problems (empty response, chosen equal
to rejected, NaN score) are skipped and counted by reason.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from pipeline.errors import UserError
from pipeline.data.synthetic import mc_prompt

SCHEMAS = ("prompt_chosen_rejected", "chat_messages", "transcript", "scored_completions", "multiple_choice", "unpaired")
STRATEGIES = ("best_vs_worst", "best_vs_each", "all_pairs")


@dataclass
class Adapted:
    schema: str
    rows_read: int
    pairs: list[dict[str, Any]] = field(default_factory=list)     # raw_prompt, messages, chosen, rejected, kind, row
    unpaired: list[dict[str, Any]] = field(default_factory=list)  # raw_prompt, messages, completion, label, row
    skipped: Counter = field(default_factory=Counter)
    bad_rows: list[tuple[int, str]] = field(default_factory=list)
    max_bad_rows: int | None = None  # keep only the first N skipped rows (all counted in ``skipped``)

    def skip(self, row: int, reason: str) -> None:
        self.skipped[reason] += 1
        if self.max_bad_rows is None or len(self.bad_rows) < self.max_bad_rows:
            self.bad_rows.append((row, reason))


class SkipRow(Exception):
    """A row-level problem: the row is skipped and counted under this reason."""


# ---------------------------------------------------------------- field access

def missing(row_no: int, key: str, row: dict[str, Any], expected: str, origin: str) -> UserError:
    return UserError(f"{origin} row {row_no}: missing key '{key}' (expected {expected}); columns found: {sorted(row)}; "
                     f"map names with data.columns.*")


def text_field(row: dict[str, Any], key: str, row_no: int, origin: str, skip_empty: str | None = None) -> str:
    """A string field; None or empty counts as a row-level problem when ``skip_empty`` names it."""
    if key not in row:
        raise missing(row_no, key, row, "a string", origin)
    value = row[key]
    if value is None or (isinstance(value, float) and math.isnan(value)):
        value = ""
    if not isinstance(value, str):
        raise UserError(f"{origin} row {row_no}: key '{key}' is {type(value).__name__}, expected a string")
    if skip_empty and not value.strip():
        raise SkipRow(skip_empty)
    return value


def list_field(row: dict[str, Any], key: str, row_no: int, origin: str, expected: str) -> list[Any]:
    if key not in row:
        raise missing(row_no, key, row, expected, origin)
    value = row[key]
    if hasattr(value, "tolist"):  # numpy arrays from Parquet/pandas
        value = value.tolist()
    if not isinstance(value, list):
        raise UserError(f"{origin} row {row_no}: key '{key}' is {type(value).__name__}, expected {expected}")
    return value


def check_pair(chosen: str, rejected: str) -> None:
    if not chosen.strip():
        raise SkipRow("empty_chosen")
    if not rejected.strip():
        raise SkipRow("empty_rejected")
    if chosen == rejected:
        raise SkipRow("chosen_equals_rejected")


def flatten(messages: list[dict[str, str]]) -> str:
    """Plain-text prompt of a message list: the lone user message as is, else role-tagged turns."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)


# ---------------------------------------------------------------- adapters (one row -> pairs)

def adapt_explicit(row, n, cols, opts, origin):
    prompt = text_field(row, cols["prompt"], n, origin)
    chosen = text_field(row, cols["chosen"], n, origin, "empty_chosen")
    rejected = text_field(row, cols["rejected"], n, origin, "empty_rejected")
    check_pair(chosen, rejected)
    return [{"raw_prompt": prompt, "messages": None, "chosen": chosen, "rejected": rejected}]


def messages_field(row, key, n, origin) -> list[dict[str, str]]:
    messages = list_field(row, key, n, origin, "a list of {role, content} messages")
    for message in messages:
        if not (isinstance(message, dict) and isinstance(message.get("role"), str) and isinstance(message.get("content"), str)):
            raise UserError(f"{origin} row {n}: key '{key}' holds {str(message)[:60]!r}; expected messages {{role, content}} with string values")
    if not messages or messages[-1]["role"] != "assistant":
        raise SkipRow(f"no_final_assistant_{key}")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def adapt_chat(row, n, cols, opts, origin):
    chosen = messages_field(row, cols["chosen"], n, origin)
    rejected = messages_field(row, cols["rejected"], n, origin)
    context = chosen[:-1]
    if context != rejected[:-1]:
        raise SkipRow("chosen_rejected_context_differs")
    prompt_value = row.get(cols["prompt"])
    if not context:  # the prompt lives in its own column (string or messages)
        if isinstance(prompt_value, str):
            context = [{"role": "user", "content": prompt_value}]
        elif isinstance(prompt_value, list):
            context = messages_field({cols["prompt"]: prompt_value + [{"role": "assistant", "content": ""}]},
                                     cols["prompt"], n, origin)[:-1]
        else:
            raise missing(n, cols["prompt"], row, "a prompt string or messages before the final assistant turn", origin)
    raw = prompt_value if isinstance(prompt_value, str) and len(context) == 1 else flatten(context)
    pair = {"raw_prompt": raw, "messages": context, "chosen": chosen[-1]["content"], "rejected": rejected[-1]["content"]}
    check_pair(pair["chosen"], pair["rejected"])
    return [pair]


def transcript_messages(prompt: str, human: str, assistant: str) -> list[dict[str, str]]:
    """HH-style transcript prefix -> chat messages (the trailing empty assistant turn dropped)."""
    parts = re.split(f"({re.escape(human)}|{re.escape(assistant)})", prompt)
    messages, role = [], None
    for part in parts:
        if part == human:
            role = "user"
        elif part == assistant:
            role = "assistant"
        elif role and part.strip():
            messages.append({"role": role, "content": part.strip()})
    return messages


def adapt_transcript(row, n, cols, opts, origin):
    chosen = text_field(row, cols["chosen"], n, origin, "empty_chosen")
    rejected = text_field(row, cols["rejected"], n, origin, "empty_rejected")
    marker = opts["assistant_marker"]
    shared = os.path.commonprefix([chosen, rejected])
    cut = shared.rfind(marker)
    if cut < 0:
        raise SkipRow("no_shared_prompt")
    prompt = chosen[: cut + len(marker)]
    pair = {"raw_prompt": prompt, "messages": transcript_messages(prompt, opts["human_marker"], marker) or None,
            "chosen": chosen[len(prompt):].strip(), "rejected": rejected[len(prompt):].strip()}
    check_pair(pair["chosen"], pair["rejected"])
    return [pair]


def score_value(value, key, n, origin) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) and value is not None:
        raise UserError(f"{origin} row {n}: score {value!r} in '{key}' is {type(value).__name__}, expected a number")
    if value is None or math.isnan(value):
        raise SkipRow("nan_score")
    return float(value)


def adapt_scored(row, n, cols, opts, origin):
    prompt = text_field(row, cols["prompt"], n, origin)
    completions = list_field(row, cols["completions"], n, origin, "a list of completions")
    if completions and isinstance(completions[0], dict):
        text_key, score_key = cols["completion_text"], cols["completion_score"]
        for c in completions:
            if text_key not in c or score_key not in c:
                raise UserError(f"{origin} row {n}: completion keys {sorted(c)}; expected '{text_key}' and '{score_key}' "
                                f"(data.columns.completion_text / completion_score)")
        texts = [c[text_key] for c in completions]
        scores = [score_value(c[score_key], cols["completions"], n, origin) for c in completions]
    else:
        texts = completions
        raw_scores = list_field(row, cols["scores"], n, origin, "a list of numbers")
        if len(raw_scores) != len(texts):
            raise UserError(f"{origin} row {n}: {len(texts)} completions but {len(raw_scores)} scores")
        scores = [score_value(s, cols["scores"], n, origin) for s in raw_scores]
    if not all(isinstance(t, str) for t in texts):
        raise UserError(f"{origin} row {n}: completions must be strings")
    if len(texts) < 2:
        raise SkipRow("too_few_completions")
    gap, strategy = float(opts["min_score_gap"]), opts["strategy"]
    order = sorted(range(len(texts)), key=lambda i: -scores[i])  # stable: ties keep file order
    best, worst = order[0], order[-1]
    if strategy == "best_vs_worst":
        candidates = [(best, worst)]
    elif strategy == "best_vs_each":
        candidates = [(best, j) for j in order[1:]]
    else:
        candidates = [(i, j) for a, i in enumerate(order) for j in order[a + 1:]]
    pairs = [{"raw_prompt": prompt, "messages": None, "chosen": texts[i], "rejected": texts[j]}
             for i, j in candidates if scores[i] - scores[j] > 0 and scores[i] - scores[j] >= gap
             and texts[i].strip() and texts[j].strip() and texts[i] != texts[j]]
    if not pairs:
        raise SkipRow("no_pair_above_score_gap")
    return pairs


def answer_index(answer, choices: list[str], labels: list[str] | None, n, origin, key) -> int:
    if isinstance(answer, str) and answer.strip().lstrip("-").isdigit() and not (labels and answer.strip() in labels):
        answer = int(answer.strip())
    if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(choices):
        return answer
    if isinstance(answer, str):
        letters = labels or [chr(ord("A") + i) for i in range(len(choices))]
        if answer.strip() in letters:
            return letters.index(answer.strip())
        if answer in choices:
            return choices.index(answer)
    raise UserError(f"{origin} row {n}: '{key}'={answer!r} is neither an index into {len(choices)} choices, "
                    f"a choice label nor a choice text")


def adapt_multiple_choice(row, n, cols, opts, origin):
    question = text_field(row, cols["question"], n, origin, "empty_question")
    if cols["choices"] not in row:
        raise missing(n, cols["choices"], row, "a list of choices", origin)
    choices, labels = row[cols["choices"]], None
    if isinstance(choices, dict):  # ARC on the hub: {"text": [...], "label": ["A", ...]}
        labels = [str(label) for label in choices.get("label", [])] or None
        choices = choices.get("text")
    if hasattr(choices, "tolist"):
        choices = choices.tolist()
    if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices) or len(choices) < 2:
        raise UserError(f"{origin} row {n}: '{cols['choices']}' must be a list of at least two strings (or {{text, label}} lists)")
    if cols["answer"] not in row:
        raise missing(n, cols["answer"], row, "an answer index or label", origin)
    correct = answer_index(row[cols["answer"]], choices, labels, n, origin, cols["answer"])
    prompt = mc_prompt(question, choices)
    pairs = [{"raw_prompt": prompt, "messages": None, "chosen": choices[correct], "rejected": c}
             for i, c in enumerate(choices) if i != correct and c.strip() and c != choices[correct]]
    if not pairs:
        raise SkipRow("no_distinct_distractor")
    return pairs


def adapt_unpaired(row, n, cols, opts, origin):
    prompt = text_field(row, cols["prompt"], n, origin)
    completion = text_field(row, cols["completion"], n, origin, "empty_completion")
    if cols["label"] not in row:
        raise missing(n, cols["label"], row, "a boolean label", origin)
    label = row[cols["label"]]
    if isinstance(label, bool) or (isinstance(label, (int, float)) and label in (0, 1)):
        return [{"raw_prompt": prompt, "messages": None, "completion": completion, "label": bool(label)}]
    if isinstance(label, str) and label.strip().lower() in ("true", "false", "1", "0"):  # CSV cells are text
        return [{"raw_prompt": prompt, "messages": None, "completion": completion,
                 "label": label.strip().lower() in ("true", "1")}]
    raise UserError(f"{origin} row {n}: '{cols['label']}'={label!r}; expected a boolean (true/false or 1/0)")


ADAPTERS = {
    "prompt_chosen_rejected": adapt_explicit, "chat_messages": adapt_chat, "transcript": adapt_transcript,
    "scored_completions": adapt_scored, "multiple_choice": adapt_multiple_choice, "unpaired": adapt_unpaired,
}
KIND = {"prompt_chosen_rejected": "explicit", "chat_messages": "chat", "transcript": "transcript",
        "scored_completions": "scored", "multiple_choice": "mc_distractor", "unpaired": "unpaired"}
















