"""``python -m analysis <run_or_sweep_dir> [--out DIR] [--store DIR]``: regenerate every table, figure and the report.

Reads only run records and artifacts (no W&B, no model). Prints the path of report.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from analysis.inference import Settings
from pipeline.errors import UserError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis", description=__doc__.splitlines()[0])
    parser.add_argument("source", help="a run dir (run.json inside) or a sweep dir (<job>/run.json below it)")
    parser.add_argument("--out", default=None, help="output folder (default: <source>/report)")
    parser.add_argument("--store", default=None,
                        help="the artifact store's root, if it moved since the runs (default: where the run records "
                             "point, relative to them first)")
    defaults = Settings()
    parser.add_argument("--after-diff-min-tokens", type=int, default=defaults.after_diff_min_tokens,
                        help="after-first-difference log-prob only on pairs with at least this many chosen tokens "
                             "after the difference (default: %(default)s)")
    parser.add_argument("--margin-after-diff", type=float, default=defaults.margin_after_diff,
                        help="non-inferiority margin of the after-difference shift, nats per token (default: %(default)s)")
    parser.add_argument("--margin-nats", type=float, default=defaults.margin_nats,
                        help="non-inferiority margin of summed log-prob shifts, nats (default: %(default)s)")
    parser.add_argument("--margin-score", type=float, default=defaults.margin_score,
                        help="non-inferiority margin of lm-eval score differences (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.after_diff_min_tokens < 1 or min(args.margin_after_diff, args.margin_nats, args.margin_score) <= 0:
        parser.error("--after-diff-min-tokens must be >= 1 and every margin > 0")
    settings = Settings(args.after_diff_min_tokens, args.margin_after_diff, args.margin_nats, args.margin_score)
    from analysis.report import generate  # after argument errors, which need no matplotlib
    try:
        if args.store is not None and not Path(args.store).is_dir():
            raise UserError(f"--store {args.store}: not a directory (expected the artifact store's root)")
        report = generate(args.source, args.out, args.store, settings)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(report)
    look_at(report.with_name("report.html"))
    return 0


def look_at(page) -> None:
    """Render the page in headless Chromium when it is installed: a screenshot, and a word on broken images."""
    from analysis.browser import check_report, find_browser
    if find_browser() is None or not page.is_file():
        return
    seen = check_report(page)
    broken = [src for src, ok in seen["images"].items() if not ok]
    print(f"[report] rendered in Chromium: {len(seen['images']) - len(broken)} of {len(seen['images'])} figures loaded, "
          f"{seen['tables']} tables; screenshot {seen['screenshot']}" + (f"; BROKEN: {broken}" if broken else ""),
          file=sys.stderr)  # stdout stays the report's path alone


if __name__ == "__main__":
    sys.exit(main())
