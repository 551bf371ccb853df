"""Peak memory and time of the log-prob head plus loss at a large vocabulary: chunked vs unchunked.

`python bench/head_memory.py`: hidden states of 8 rows x 1024 tokens (hidden size 576, SmolLM2's), an
output head of V = 128256 (Llama-3's vocabulary), fp32; forward + backward of a DPO-style loss (summed
token log-probs) through

- unchunked: ``logits = hidden @ W^T`` for every position (``[8, 1024, V]``), then ``score_tokens``
  (what a model's own ``logits`` followed by log-softmax cost), and
- chunked: ``pipeline.modeling.logprob_head.score_hidden`` with ``train.logprob_chunk`` positions at a time.

and the same with BNF's O_t (``with_others``) at 2 rows x 1024 (the unchunked O_t path needs ~5 fp32
``[rows, T, V]`` tensors: 8 rows would not fit in 24 GB). Each variant runs in a fresh process; peak
memory = the process's peak RSS minus its RSS after building the inputs. Time = median of 3 repetitions.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def one(variant: str, rows: int, tokens: int, hidden_size: int, vocab: int, chunk: int, with_others: bool,
        repeats: int) -> dict:
    import torch
    from pipeline.modeling.logprob_head import Head, score_hidden
    from pipeline.modeling.logprobs import score_tokens

    generator = torch.Generator().manual_seed(0)
    hidden = (torch.randn(rows * tokens, hidden_size, generator=generator)).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, generator=generator) / hidden_size ** 0.5).requires_grad_()
    labels = torch.randint(0, vocab, (rows * tokens,), generator=generator)
    base = rss_mb()
    times, values = [], []
    for _ in range(repeats):
        hidden.grad = weight.grad = None
        started = time.perf_counter()
        ids = labels.view(rows, tokens)  # position t scores ids[:, t + 1]: tokens - 1 scored per row
        if variant == "unchunked":
            logits = (hidden @ weight.T).view(rows, tokens, vocab)
            scores = score_tokens(logits, ids, torch.ones_like(ids), with_others=with_others)
            logp, others = scores.token_logps, scores.others
        else:
            states = hidden.view(rows, tokens, hidden_size)[:, :-1].reshape(-1, hidden_size)
            logp, _, others = score_hidden(states, ids[:, 1:].reshape(-1), Head(weight, None), chunk, with_others)
        loss = logp.sum() + (others.sum() if with_others else 0)
        loss.backward()
        times.append(time.perf_counter() - started)
        values.append(float(loss))
        del logp, others, loss
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"variant": variant, "rows": rows, "tokens": tokens, "vocab": vocab, "hidden": hidden_size,
            "chunk": chunk if variant == "chunked" else None, "with_others": with_others,
            "peak_mb": round(peak - base, 1), "median_s": round(statistics.median(times), 3),
            "times_s": [round(t, 3) for t in times], "loss": values[0],
            "grad_norm_weight": float(weight.grad.norm()), "grad_norm_hidden": float(hidden.grad.norm())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one variant in this process
    args = parser.parse_args()
    if args.one:
        spec = json.loads(args.one)
        print(json.dumps(one(**spec)))
        return
    print(f"load average at start {os.getloadavg()}; torch threads: default")
    cases = [(8, False), (2, True)]
    results = []
    for rows, with_others in cases:
        for variant in ("unchunked", "chunked"):
            spec = {"variant": variant, "rows": rows, "tokens": args.tokens, "hidden_size": args.hidden,
                    "vocab": args.vocab, "chunk": args.chunk, "with_others": with_others, "repeats": args.repeats}
            out = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], check=True,
                                 capture_output=True, text=True).stdout
            results.append(json.loads(out.strip().splitlines()[-1]))
            print(json.dumps(results[-1]), flush=True)
    print(f"load average at end {os.getloadavg()}")
    print("| rows x tokens | loss terms | unchunked peak MB | chunked peak MB | memory ratio | unchunked s | "
          "chunked s | time ratio | loss difference |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for k in range(0, len(results), 2):
        u, c = results[k], results[k + 1]
        print(f"| {u['rows']} x {u['tokens']} | {'log-probs + O_t' if u['with_others'] else 'log-probs'} | "
              f"{u['peak_mb']:.0f} | {c['peak_mb']:.0f} | {u['peak_mb'] / c['peak_mb']:.1f}x | {u['median_s']:.2f} | "
              f"{c['median_s']:.2f} | {c['median_s'] / u['median_s']:.2f}x | {abs(u['loss'] - c['loss']):.2e} |")


if __name__ == "__main__":
    main()
