"""Benchmark: the pairing stage's distance + bucketing vs raw rapidfuzz and raw batch tokenisation.

    .venv/bin/python bench/pairing.py [--pairs 100000] [--chars 500] [--repeats 3]

Data: 100k pairs of ~500 characters built from synthetic solutions, half with one digit
changed (low distance), half against a different text (high distance). The stage's
function (``pipeline.data.distance.distances_and_buckets``: char + token Levenshtein, raw and
normalised, bucketing) is timed against the bare minimum doing the same work:
``process.cpdist`` on characters, one batch tokenisation call, ``process.cpdist`` on token
ids. The tokenizer is the tiny model's BPE (pipeline/modeling/tiny_model.py). Goal: ratio <= 2.
"""

from __future__ import annotations

import argparse
import os
import random
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")  # the stage runs with the same setting

from rapidfuzz import process  # noqa: E402
from rapidfuzz.distance import Levenshtein  # noqa: E402

from pipeline.data.distance import distances_and_buckets, hf_tokenize  # noqa: E402
from pipeline.data.synthetic import generate  # noqa: E402


def make_pairs(count: int, chars: int, seed: int = 0) -> tuple[list[str], list[str]]:
    generated = generate(seed, 2000, 0, {"corrupt_step": 1, "wrong_solution": 1, "mc_distractor": 0})
    texts = sorted({p["chosen"] for p in generated["pairs"]} | {p["rejected"] for p in generated["pairs"]})
    rng = random.Random(seed)

    def passage() -> str:
        parts, length = [], 0
        while length < chars:
            parts.append(rng.choice(texts))
            length += len(parts[-1]) + 1
        return "\n".join(parts)[:chars]

    chosen, rejected = [], []
    for i in range(count):
        text = passage()
        chosen.append(text)
        if i % 2:
            rejected.append(passage())
        else:
            position = next((k for k in range(rng.randrange(len(text)), len(text)) if text[k].isdigit()), 0)
            rejected.append(text[:position] + str((int(text[position]) + 1) % 10 if text[position].isdigit() else "x")
                            + text[position + 1:])
    return chosen, rejected


def tokenizer():
    try:
        from pipeline.modeling.tiny_model import build_tiny_tokenizer
        return build_tiny_tokenizer(1024, 0), "tiny model BPE (pipeline.modeling.tiny_model, vocab 1024)"
    except ImportError:  # without the model module: a BPE trained on the data itself
        from tokenizers import Tokenizer, models, pre_tokenizers, trainers
        from transformers import PreTrainedTokenizerFast
        raw = Tokenizer(models.BPE())
        raw.pre_tokenizer = pre_tokenizers.ByteLevel()
        raw.train_from_iterator(make_pairs(2000, 500)[0], trainers.BpeTrainer(vocab_size=1024, show_progress=False))
        return PreTrainedTokenizerFast(tokenizer_object=raw), "BPE trained on the benchmark data (vocab 1024)"


def best_of(repeats: int, function) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=100_000)
    parser.add_argument("--chars", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    chosen, rejected = make_pairs(args.pairs, args.chars)
    tok, tok_name = tokenizer()
    tokenize = hf_tokenize(tok)

    def raw_peers():
        process.cpdist(chosen, rejected, scorer=Levenshtein.distance, workers=-1)
        ids = tok(chosen + rejected, add_special_tokens=False)["input_ids"]
        process.cpdist(ids[: len(chosen)], ids[len(chosen):], scorer=Levenshtein.distance, workers=-1)

    def stage():
        distances_and_buckets(chosen, rejected, tokenize, "char_ned", [0.0, 0.2, 1.0])

    distances_and_buckets(chosen[:2000], rejected[:2000], tokenize)  # warm up thread pools and caches
    peer_s = best_of(args.repeats, raw_peers)
    stage_s = best_of(args.repeats, stage)
    mean_chars = sum(map(len, chosen)) / len(chosen)
    print(f"pairs {len(chosen)}, mean chars {mean_chars:.0f}, tokenizer: {tok_name}, cores {os.cpu_count()}, best of {args.repeats}")
    print(f"raw rapidfuzz cpdist (chars + token ids) + batch tokenisation: {peer_s:.3f} s")
    print(f"stage distances_and_buckets (4 distance columns + buckets):    {stage_s:.3f} s")
    print(f"ratio stage / raw = {stage_s / peer_s:.2f}x (goal <= 2x)")


if __name__ == "__main__":
    main()
