"""Training curves from a run's metrics.jsonl, as one PNG (used by `mgsr demo` and tools/plot_metrics.py)."""

from __future__ import annotations

import json
from pathlib import Path

CURVES = ("loss", "sft", "dac_kl", "span", "mean_l", "mean_u", "kept_mass", "grad_norm", "teacher_entropy",
          "gen_mean_len", "gen_distinct_2", "scrg_changed")


def read_metrics(path: str | Path, kind: str = "train") -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as stream:
        for line in stream:
            row = json.loads(line)
            if row.get("kind") == kind:
                rows.append(row)
    return rows


def plot_runs(runs: dict[str, Path], output: str | Path, keys=CURVES, smooth: int = 10) -> Path:
    """One panel per metric, one line per run (moving average over `smooth` steps)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = {name: read_metrics(path) for name, path in runs.items() if Path(path).is_file()}
    keys = [k for k in keys if any(k in row for rows in data.values() for row in rows)]
    cols = min(4, max(1, len(keys)))
    rows_n = -(-len(keys) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4 * cols, 3 * rows_n), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for name, rows in data.items():
            points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            if not points:
                continue
            steps, values = zip(*points)
            window = max(1, min(smooth, len(values)))
            averaged = [sum(values[max(0, i - window + 1):i + 1]) / len(values[max(0, i - window + 1):i + 1])
                        for i in range(len(values))]
            ax.plot(steps, averaged, label=name)
        ax.set_title(key)
        ax.set_xlabel("step")
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    output = Path(output)
    fig.savefig(output, dpi=100)
    plt.close(fig)
    return output
