"""What the user sees: a tqdm bar and periodic metric lines on rank 0, every metric in JSONL and TensorBoard."""

from __future__ import annotations

import json
import time
from pathlib import Path

# Order of the keys in the periodic metric line (others follow alphabetically).
_LINE_KEYS = ("loss", "sft", "dac_kl", "span", "mean_l", "mean_u", "band_size", "kept_mass", "scrg_corrected",
              "scrg_mean_j", "grad_norm", "lr", "tokens_per_s", "mem_gib")


class MetricsLogger:
    def __init__(self, output_dir: str | Path, total_steps: int, log_interval: int, enabled: bool,
                 tensorboard: bool = True, progress_bar: bool = True, start_step: int = 0):
        self.enabled = enabled
        self.log_interval = max(1, log_interval)
        self.bar = None
        self.tb = None
        self.jsonl = None
        if not enabled:
            return
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(out / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tensorboard"))
            except ImportError:
                self.tb = None
        if progress_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True,
                            mininterval=1.0)
        self.started = time.time()

    def log(self, step: int, metrics: dict, kind: str = "train") -> None:
        if not self.enabled:
            return
        record = {"step": step, "kind": kind, "time": round(time.time() - self.started, 3), **metrics}
        self.jsonl.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    self.tb.add_scalar(f"{kind}/{key}", value, step)
        if kind == "train" and self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{metrics.get('loss', float('nan')):.4f}",
                                 tok_s=f"{metrics.get('tokens_per_s', 0):.0f}", refresh=False)
        if kind != "train" or step % self.log_interval == 0:
            self.write_line(step, kind, metrics)

    def write_line(self, step: int, kind: str, metrics: dict) -> None:
        # per-family breakdowns ("rouge_l/units") go to JSONL/TensorBoard only: the line stays readable
        keys = [k for k in _LINE_KEYS if k in metrics] + sorted(k for k in metrics
                                                                 if k not in _LINE_KEYS and "/" not in k)
        parts = [f"{k} {metrics[k]:.4g}" if isinstance(metrics[k], float) else f"{k} {metrics[k]}" for k in keys]
        text = f"[{kind} step {step}] " + " | ".join(parts)
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.jsonl is not None:
            self.jsonl.close()
