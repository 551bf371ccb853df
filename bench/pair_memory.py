"""Benchmark: peak memory (RSS) of the real pair stage on a large local JSONL file.

    .venv/bin/python bench/pair_memory.py --rows 20000
    .venv/bin/python bench/pair_memory.py --rows 200000 1000000     # the full run (GBs of RAM before the fix)

For each N a JSONL of N prompt/chosen/rejected rows (~500 characters per row in total) is written
into a temporary folder: arithmetic word problems of ``pipeline.data.synthetic`` with an instruction
prefix; half the rejected answers are the solution with one intermediate result changed (low edit
distance, Smaug's MetaMath recipe), half a wrong line of reasoning (high edit distance), and about
0.5% of the rows repeat an earlier row (the stage drops them as duplicates). Then the real stage runs
in a fresh process,

    python -m pipeline stages=[pair] data=local data.path=<file> model=tiny logger=none artifacts_dir=<tmp>

and its peak RSS (``os.wait4``'s ``ru_maxrss`` of that process), wall time and the input size are
reported (MB = 10^6 bytes). The tiny model artifact is built first in a separate process (not measured), so the measured
process only loads its tokenizer; a run on a 100-row file gives the fixed cost (interpreter, torch,
transformers, pandas imports) for comparison. Goal: <= 1.5 GB peak RSS at 1M rows.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.data.synthetic import generate  # noqa: E402

PREFIXES = (
    "Solve the following problem step by step and give the final answer after ####.\n\n",
    "Answer the question below. Show each step of your reasoning, then write #### and the answer.\n\n",
    "Read the word problem carefully, work it out one step at a time, and end with #### <answer>.\n\n",
)
CHUNK = 5000  # problems generated per seed


def write_rows(path: Path, rows: int, seed: int = 0) -> dict[str, float]:
    """N rows of ~500 characters; returns the share of low-distance pairs and duplicates written."""
    rng = random.Random(f"pair-memory:{seed}")
    written = duplicates = low = chars = 0
    with path.open("w", encoding="utf-8") as handle:
        chunk = 0
        while written < rows:
            pairs = generate(seed * 100_000 + chunk, CHUNK, 0,
                             {"corrupt_step": 1, "wrong_solution": 1, "mc_distractor": 0})["pairs"]
            chunk += 1
            recent: list[str] = []
            for pair in pairs:
                if written >= rows:
                    break
                if recent and rng.random() < 0.005:
                    line = rng.choice(recent)  # an exact repeat of an earlier row
                    duplicates += 1
                else:
                    row = {"prompt": rng.choice(PREFIXES) + pair["raw_prompt"], "chosen": pair["chosen"],
                           "rejected": pair["rejected"]}
                    chars += sum(map(len, row.values()))
                    low += pair["kind"] == "corrupt_step"
                    line = json.dumps(row)
                    recent.append(line)
                handle.write(line + "\n")
                written += 1
    return {"low_share": low / max(1, written - duplicates), "duplicates": duplicates,
            "chars_per_row": chars / max(1, written - duplicates)}


def run_stage(data: Path, store: Path, stages: str = "[pair]") -> dict[str, float]:
    """One fresh `python -m pipeline` process; its peak RSS (MB), wall time (s) and output."""
    command = [sys.executable, "-m", "pipeline", f"stages={stages}", "data=local", f"data.path={data}", "model=tiny",
               "logger=none", f"artifacts_dir={store}", f"hydra.run.dir={store.parent / 'runs' / data.stem}"]
    started = time.perf_counter()
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - started
        log.seek(0)
        output = log.read().decode(errors="replace")
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{' '.join(command)} exited with {code}:\n{output[-3000:]}")
    return {"peak_rss_mb": usage.ru_maxrss * 1024 / 1e6, "wall_s": wall, "output": output}  # ru_maxrss: KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[20000], help="row counts to measure, e.g. 200000 1000000")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (printed)")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="pair-memory-"))
    store = folder / "store"
    try:
        small = folder / "rows-100.jsonl"
        write_rows(small, 100, args.seed)
        run_stage(small, store, "[model]")  # build the tiny model artifact once, unmeasured
        baseline = run_stage(small, store)
        print(f"fixed cost (100 rows): peak RSS {baseline['peak_rss_mb']:.0f} MB, {baseline['wall_s']:.1f} s", flush=True)
        results = []
        for rows in args.rows:
            data = folder / f"rows-{rows}.jsonl"
            shape = write_rows(data, rows, args.seed)
            size_mb = data.stat().st_size / 1e6
            measured = run_stage(data, store)
            stats_line = next((line for line in measured["output"].splitlines() if "duplicate" in line), "")
            results.append({"rows": rows, "input_mb": size_mb, **{k: v for k, v in measured.items() if k != "output"}})
            print(f"{rows} rows: input {size_mb:.1f} MB ({shape['chars_per_row']:.0f} chars/row, "
                  f"{shape['low_share']:.0%} low-distance, {shape['duplicates']} repeated rows), "
                  f"peak RSS {measured['peak_rss_mb']:.0f} MB ({measured['peak_rss_mb'] / size_mb:.1f}x input), "
                  f"wall {measured['wall_s']:.1f} s  {stats_line.strip()}", flush=True)
            data.unlink()
        print("| rows | input | peak RSS | above the fixed cost | RSS / input | wall |")
        print("|---|---|---|---|---|---|")
        print(f"| 100 (fixed cost) | - | {baseline['peak_rss_mb']:.0f} MB | - | - | {baseline['wall_s']:.1f} s |")
        for r in results:
            above = r["peak_rss_mb"] - baseline["peak_rss_mb"]
            print(f"| {r['rows']} | {r['input_mb']:.1f} MB | {r['peak_rss_mb']:.0f} MB | {above:.0f} MB "
                  f"({above * 1000 / r['rows']:.1f} KB/row) | {r['peak_rss_mb'] / r['input_mb']:.1f}x | {r['wall_s']:.1f} s |")
    finally:
        if args.keep:
            print(f"kept {folder}")
        else:
            import shutil
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
