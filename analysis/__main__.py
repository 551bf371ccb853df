"""``python -m analysis <run_or_sweep_dir> [--out DIR]``: regenerate every table, figure and the report.

Reads only run records and artifacts (no W&B, no model). Prints the path of report.md.
"""

from __future__ import annotations

import argparse
import sys

from pipeline.errors import UserError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis", description=__doc__.splitlines()[0])
    parser.add_argument("source", help="a run dir (run.json inside) or a sweep dir (<job>/run.json below it)")
    parser.add_argument("--out", default=None, help="output folder (default: <source>/report)")
    args = parser.parse_args(argv)
    from analysis.report import generate  # after argument errors, which need no matplotlib
    try:
        report = generate(args.source, args.out)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
