#!/usr/bin/env python
"""Plot a run's (or several runs') metrics.jsonl as one PNG of curves.

    python tools/plot_metrics.py runs/demo/mgsr_student/metrics.jsonl runs/demo/sft_student/metrics.jsonl -o curves.png
"""

import argparse
from pathlib import Path

from mgsr_megatron.plotting import CURVES, plot_runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("metrics", nargs="+", type=Path, help="metrics.jsonl files (one line per run)")
    parser.add_argument("-o", "--output", type=Path, default=Path("metrics.png"), help="PNG to write")
    parser.add_argument("--keys", nargs="+", default=list(CURVES), help="metrics to plot")
    parser.add_argument("--smooth", type=int, default=10, help="moving-average window in steps")
    args = parser.parse_args()
    missing = [str(p) for p in args.metrics if not p.is_file()]
    if missing:
        parser.error(f"metrics file not found: {', '.join(missing)}")
    runs = {p.parent.name or str(p): p for p in args.metrics}
    print(f"wrote {plot_runs(runs, args.output, args.keys, args.smooth)}")


if __name__ == "__main__":
    main()
