"""An independent SFT training loop, the reference the framework's SFT-only runs are held to (issue 13).

Model: Hugging Face `transformers` LlamaForCausalLM (eager attention, float32), loaded from the HF
directory the framework's `export_hf` writes for the framework's initial student (the conversion is
tested against transformers on its own, tests/test_conversion.py and tests/dist/check_conversion.py).
Everything else is written here from the definitions, without the framework's model, loss or
optimizer code:

  loss of a micro-batch  sum_i m_i * CE_i / sum_i m_i   (m = sft_mask: the response tokens; CE over the
                         TRUE vocabulary, which is what masking the padded columns to -inf gives)
  loss of a step         mean over the step's micro-batches (the framework: over micro-batches and DP
                         ranks; the reference sees all of a step's micro-batches in one process)
  gradient               of the step loss; clipped by the global L2 norm: g *= c / (norm + 1e-6) when
                         norm > c
  AdamW                  decoupled weight decay on tensors with ndim >= 2 only (norm weights: none);
                         p -= lr * wd * p; m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2;
                         p -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
  learning rate          linear warm-up lr * (step + 1) / warmup for step < warmup, then cosine from lr to
                         min_lr over train_iters - warmup steps (constant style: lr)

Input: the token / label / mask tensors of each step as the framework's data pipeline
(training/data.py TrainingData at DP=1) produces them; a step of global batch B and micro-batch b
is B / b consecutive micro-batches of that stream (the sampler gives global micro-batch k*DP + r to
DP rank r, so every DP layout sees the same micro-batches).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def learning_rate(step: int, lr: float, min_lr: float, warmup: int, train_iters: int,
                  style: str = "cosine") -> float:
    if warmup and step < warmup:
        return lr * (step + 1) / warmup
    if style == "constant":
        return lr
    decay_steps = max(1, train_iters - warmup)
    progress = min(1.0, (step - warmup) / decay_steps)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class Hyper:
    lr: float
    min_lr: float
    warmup: int
    train_iters: int
    weight_decay: float
    beta1: float
    beta2: float
    eps: float
    clip_grad: float
    style: str = "cosine"

    @classmethod
    def from_config(cls, cfg, **overrides) -> Hyper:
        """Read the numbers (only the numbers) from a framework Config."""
        o, s = cfg.optimizer, cfg.schedule
        values = dict(lr=o.lr, min_lr=o.min_lr, warmup=s.lr_warmup_iters, train_iters=s.train_iters,
                      weight_decay=o.weight_decay, beta1=o.adam_beta1, beta2=o.adam_beta2, eps=o.adam_eps,
                      clip_grad=o.clip_grad, style=s.lr_decay_style)
        values.update(overrides)
        return cls(**values)


def load_hf(directory) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32, attn_implementation="eager")
    model.train()
    return model


def _logits(model, mb: dict) -> torch.Tensor:
    logits = model(input_ids=mb["tokens"], position_ids=mb["position_ids"]).logits
    return logits if logits.dtype == torch.float64 else logits.float()  # float64: a run for rounding studies


def micro_batch_loss(model, mb: dict) -> torch.Tensor:
    logits = _logits(model, mb)
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), mb["labels"].reshape(-1),
                         reduction="none").view(mb["labels"].shape)
    mask = mb["sft_mask"].to(logits.dtype)
    return (ce * mask).sum() / mask.sum()


class ReferenceSFT:
    """fp32 SFT of one HF model with the hand-written AdamW / clipping / LR schedule above."""

    def __init__(self, model, hyper: Hyper):
        self.model, self.h = model, hyper
        self.params = [p for p in model.parameters() if p.requires_grad]  # tied weights appear once
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]
        self.step = 0

    def train_step(self, micro_batches: list[dict]) -> dict:
        h = self.h
        lr = learning_rate(self.step, h.lr, h.min_lr, h.warmup, h.train_iters, h.style)
        for p in self.params:
            p.grad = None
        losses = []
        for mb in micro_batches:
            loss = micro_batch_loss(self.model, mb)
            (loss / len(micro_batches)).backward()
            losses.append(loss.item())
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))
        scale = h.clip_grad / (norm + 1e-6) if h.clip_grad > 0 and norm > h.clip_grad else 1.0
        t = self.step + 1
        with torch.no_grad():
            for p, g, m, v in zip(self.params, grads, self.exp_avg, self.exp_avg_sq):
                g = g * scale
                if p.ndim >= 2 and h.weight_decay:
                    p.mul_(1.0 - lr * h.weight_decay)
                m.mul_(h.beta1).add_(g, alpha=1.0 - h.beta1)
                v.mul_(h.beta2).addcmul_(g, g, value=1.0 - h.beta2)
                denom = (v / (1.0 - h.beta2 ** t)).sqrt().add_(h.eps)
                p.addcdiv_(m, denom, value=-lr / (1.0 - h.beta1 ** t))
        self.step += 1
        return {"loss": sum(losses) / len(losses), "grad_norm": norm, "lr": lr}


def train(model, hyper: Hyper, batches: list[list[dict]]) -> list[dict]:
    """Run one step per entry of `batches` (each a list of micro-batches)."""
    loop = ReferenceSFT(model, hyper)
    return [loop.train_step(step) for step in batches]


@torch.no_grad()
def token_loss(model, micro_batches: list[dict]) -> float:
    """Mean cross-entropy over all response tokens of the given micro-batches (token-weighted)."""
    was = model.training
    model.eval()
    total, count = 0.0, 0.0
    for mb in micro_batches:
        logits = _logits(model, mb)
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), mb["labels"].reshape(-1),
                             reduction="none").view(mb["labels"].shape)
        mask = mb["loss_mask"].to(logits.dtype)
        total += float((ce * mask).sum())
        count += float(mask.sum())
    model.train(was)
    return total / count


@torch.no_grad()
def greedy(model, prompts: list[list[int]], max_new_tokens: int, eos_id: int,
           margins: list | None = None) -> list[list[int]]:
    """Greedy continuation of each prompt (one at a time, full recompute; EOS kept when produced).
    `margins` (a list) receives, per prompt, the smallest gap between the best and the second-best
    logit over its chosen tokens: how close the decoding came to a tie."""
    was = model.training
    model.eval()
    out = []
    for prompt in prompts:
        ids, new, gap = list(prompt), [], float("inf")
        for _ in range(max_new_tokens):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
            top = logits.topk(2).values
            gap = min(gap, float(top[0] - top[1]))
            token = int(logits.argmax())
            new.append(token)
            ids.append(token)
            if token == eos_id:
                break
        out.append(new)
        if margins is not None:
            margins.append(gap)
    model.train(was)
    return out


def rouge_l(answers: list[str], references: list[list[str]]) -> float:
    """Mean over prompts of the max ROUGE-L F over references, x100 (`rouge_score`, stemmer on)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [100.0 * max((scorer.score(ref, answer)["rougeL"].fmeasure for ref in refs), default=0.0)
              for answer, refs in zip(answers, references)]
    return sum(scores) / len(scores)


def strip_eos(ids: list[int], eos_id: int) -> list[int]:
    return ids[:ids.index(eos_id)] if eos_id in ids else ids
