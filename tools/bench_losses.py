"""Benchmark of the MGSR loss library (issue 5).

1. Memory and time, TP=1 on this machine's CPU: the chunked `mgsr_objective` (forward + backward) next
   to a naive dense PyTorch autograd implementation of the same math (SFT + DAC-KL learned/tail bucket
   + normalised span KL), 8192 tokens x V=32000 by default, teacher logits in bf16. Each variant runs in
   a fresh subprocess of this run; peak memory = peak RSS (ru_maxrss) minus the RSS once the inputs
   exist, so it is the extra memory the loss needs (its gradient buffer included).
2. Bytes communicated per token by DAC-KL and the span loss at TP=4 for V=32000 and V=128000
   (4 gloo processes on this machine; the library's collectives count their payloads, forward and
   backward: all-reduce = tensor size, all-gather = gathered size, per rank).

    .venv/bin/python tools/bench_losses.py                  # both parts, prints a table
    .venv/bin/python tools/bench_losses.py --tokens 2048    # smaller
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _cfg(chunk: int):
    from mgsr_megatron.config import MGSRConfig

    return MGSRConfig(loss_chunk_tokens=chunk)


def make_inputs(tokens: int, vocab: int, seed: int = 0, rows: int = 4):
    """Peaked LM-like logits (a few strong tokens), teacher bf16; spans cover about half the positions."""
    g = torch.Generator().manual_seed(seed)
    seq = tokens // rows
    student = torch.randn(rows, seq, vocab, generator=g).mul_(2.0)
    teacher = student.to(torch.bfloat16)
    teacher += torch.randn(rows, seq, vocab, generator=g).mul_(0.5).to(torch.bfloat16)
    labels = torch.randint(0, vocab, (rows, seq), generator=g)
    sft_mask = torch.ones(rows, seq)
    kd_mask = torch.ones(rows, seq)
    pairs = torch.zeros(rows, seq, dtype=torch.bool)
    for start in range(0, seq - 8, 8):  # spans of 5 tokens every 8 positions: 4 pairs per 8 tokens
        pairs[:, start:start + 4] = True
    return student, teacher, labels, sft_mask, kd_mask, pairs


def naive_objective(student, teacher, labels, sft_mask, kd_mask, pairs, clipnet, cfg):
    """The same math, dense, with plain autograd (what one writes first)."""
    tau = cfg.temperature
    vocab = student.shape[-1]
    zs = student.reshape(-1, vocab)
    zt = teacher.reshape(-1, vocab).float()
    sft_w, kd_w = sft_mask.reshape(-1), kd_mask.reshape(-1)
    ce = torch.nn.functional.cross_entropy(zs, labels.reshape(-1), reduction="none")
    l_sft = (ce * sft_w).sum() / sft_w.sum()
    log_q = torch.log_softmax(zs / tau, dim=-1)
    log_p = torch.log_softmax(zt / tau, dim=-1)
    top_log_p, ids = log_p.topk(max(cfg.k_band, cfg.k_feat), dim=-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    head = top_log_p[:, :cfg.k_feat]
    features = torch.cat([head.clamp(min=-20), entropy[:, None], head.exp().sum(-1, keepdim=True)], dim=-1)
    a, b = clipnet(features)
    lower = (1 - cfg.rho) * torch.sigmoid(a)
    upper = lower + cfg.rho + (1 - lower - cfg.rho) * torch.sigmoid(b)
    p = top_log_p[:, :cfg.k_band].exp()
    log_q_k = log_q.gather(-1, ids[:, :cfg.k_band])
    cum = p.cumsum(-1)
    member = torch.sigmoid((upper[:, None] - (cum - p)) / cfg.kappa) * torch.sigmoid((cum - lower[:, None]) / cfg.kappa)
    pm, qm = p * member, log_q_k.exp() * member
    tail_p, tail_q = 1 - pm.sum(-1), 1 - qm.sum(-1)
    kl = (pm * (top_log_p[:, :cfg.k_band] - log_q_k)).sum(-1) + tail_p * (tail_p.log() - tail_q.log())
    l_dac = (kl * kd_w).sum() / kd_w.sum()
    first = pairs.reshape(-1).nonzero()[:, 0]
    pair_t = torch.log_softmax(log_p[first] + log_p[first + 1], dim=-1)
    pair_s = torch.log_softmax(log_q[first] + log_q[first + 1], dim=-1)
    l_span = (pair_t.exp() * (pair_t - pair_s)).sum(-1).mean()
    return cfg.w_sft * l_sft + cfg.w_dac * l_dac + cfg.w_span * l_span


def run_variant(variant: str, tokens: int, vocab: int, chunk: int) -> dict:
    """One measurement in this (fresh) process."""
    from mgsr_megatron.losses import ClipNet, LossTargets, ObjectiveSettings, mgsr_objective

    cfg = _cfg(chunk)
    settings = ObjectiveSettings.from_config(cfg)
    student, teacher, labels, sft_mask, kd_mask, pairs = make_inputs(tokens, vocab)
    clipnet = ClipNet(cfg.k_feat, cfg.clipnet_hidden, seed=0)
    x = student.requires_grad_(True)
    # warm-up on a slice (first-call costs: allocator, kernels), then measure the full size
    small = slice(0, 2)
    w = student[small].detach().clone().requires_grad_(True)
    if variant == "naive":
        naive_objective(w, teacher[small], labels[small], sft_mask[small], kd_mask[small], pairs[small], clipnet,
                        cfg).backward()
    else:
        mgsr_objective(w, teacher[small], LossTargets(labels[small], sft_mask[small], kd_mask[small], pairs[small]),
                       clipnet=clipnet, settings=settings)[0].backward()
    clipnet.zero_grad()
    del w
    base_rss = _rss_bytes()
    start = time.perf_counter()
    if variant == "naive":
        loss = naive_objective(x, teacher, labels, sft_mask, kd_mask, pairs, clipnet, cfg)
    else:
        loss, _ = mgsr_objective(x, teacher, LossTargets(labels, sft_mask, kd_mask, pairs), clipnet=clipnet,
                                 settings=settings)
    forward_s = time.perf_counter() - start
    loss.backward()
    total_s = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"variant": variant, "loss": loss.item(), "forward_s": forward_s, "total_s": total_s,
            "peak_extra_bytes": peak - base_rss, "peak_rss_bytes": peak, "inputs_bytes": base_rss,
            "grad_norm": x.grad.norm().item()}


def _spawn(variant, tokens, vocab, chunk) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--_variant", variant, "--tokens", str(tokens),
           "--vocab", str(vocab), "--chunk", str(chunk)]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if out.returncode:
        raise SystemExit(f"{variant} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------------
# Communication at TP=4.

def _comm_worker(rank: int, world: int, port: int, vocab: int, tokens: int, queue) -> None:
    import torch.distributed as dist

    from mgsr_megatron.config import MGSRConfig
    from mgsr_megatron.losses import ClipNet, LossTargets, ObjectiveSettings, count_communication, mgsr_objective

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    student, teacher, labels, sft_mask, kd_mask, pairs = make_inputs(tokens, vocab, rows=2)
    width = vocab // world
    shard = slice(rank * width, (rank + 1) * width)
    x = student[..., shard].clone().requires_grad_(True)
    cfg = MGSRConfig(w_sft=0.0, loss_chunk_tokens=max(tokens // 2, 1))
    with count_communication() as comm:
        loss, _ = mgsr_objective(x, teacher[..., shard].clone(), LossTargets(labels, sft_mask, kd_mask, pairs),
                                 clipnet=ClipNet(cfg.k_feat, cfg.clipnet_hidden, seed=0),
                                 settings=ObjectiveSettings.from_config(cfg), tp_group=dist.group.WORLD)
        loss.backward()
        counted = dict(comm.by_tag)
    if rank == 0:
        queue.put({"vocab": vocab, "tokens": tokens, "pairs": int(pairs.sum()), **counted})
    dist.barrier()
    dist.destroy_process_group()


def comm_per_token(vocab: int, tokens: int, port: int, world: int = 4) -> dict:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_comm_worker, args=(r, world, port, vocab, tokens, queue)) for r in range(world)]
    for proc in procs:
        proc.start()
    result = queue.get(timeout=600)
    for proc in procs:
        proc.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--chunk", type=int, default=1024, help="mgsr.loss_chunk_tokens")
    parser.add_argument("--comm-tokens", type=int, default=64)
    parser.add_argument("--port", type=int, default=29620)
    parser.add_argument("--repeats", type=int, default=2, help="runs per variant (fastest kept)")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-comm", action="store_true")
    parser.add_argument("--_variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._variant:
        print(json.dumps(run_variant(args._variant, args.tokens, args.vocab, args.chunk)))
        return
    gib = 2 ** 30
    if not args.skip_memory:
        print(f"MGSR objective, forward+backward, {args.tokens} tokens x V={args.vocab}, TP=1, CPU "
              f"({torch.get_num_threads()} threads), teacher bf16, chunk {args.chunk} tokens")
        # Alternate the variants and keep each one's fastest run: the machine is shared, and a burst of
        # load during one run should not decide the comparison. Memory: the largest peak seen.
        runs = {"chunked": [], "naive": []}
        for _ in range(args.repeats):
            for variant in runs:
                runs[variant].append(_spawn(variant, args.tokens, args.vocab, args.chunk))
        results = []
        for measured in runs.values():
            best = min(measured, key=lambda r: r["total_s"])
            best["peak_extra_bytes"] = max(r["peak_extra_bytes"] for r in measured)
            best["peak_rss_bytes"] = max(r["peak_rss_bytes"] for r in measured)
            results.append(best)
        print(f"(best of {args.repeats} alternating runs per variant; 1-minute load average at the end: "
              f"{os.getloadavg()[0]:.1f})")
        print(f"{'variant':<9} {'loss':>9} {'fwd s':>7} {'fwd+bwd s':>10} {'peak extra GiB':>15} {'peak RSS GiB':>13}")
        for r in results:
            print(f"{r['variant']:<9} {r['loss']:>9.5f} {r['forward_s']:>7.2f} {r['total_s']:>10.2f} "
                  f"{r['peak_extra_bytes'] / gib:>15.2f} {r['peak_rss_bytes'] / gib:>13.2f}")
        chunked, naive = results
        print(f"memory: naive / chunked = {naive['peak_extra_bytes'] / chunked['peak_extra_bytes']:.2f}x; "
              f"time: naive / chunked = {naive['total_s'] / chunked['total_s']:.2f}x; "
              f"loss difference {abs(naive['loss'] - chunked['loss']):.2e}")
    if not args.skip_comm:
        print(f"\nBytes communicated per token at TP=4 (forward + backward, per rank, {args.comm_tokens} tokens, "
              f"k_band=256, k_feat=64)")
        rows = [comm_per_token(v, args.comm_tokens, args.port + i) for i, v in enumerate((32000, 128000))]
        print(f"{'V':>7} {'DAC-KL B/token':>15} {'span B/token':>13} {'span B/pair':>12}")
        for r in rows:
            print(f"{r['vocab']:>7} {r.get('dac_kl', 0) / r['tokens']:>15.1f} {r.get('span', 0) / r['tokens']:>13.1f} "
                  f"{r.get('span', 0) / max(r['pairs'], 1):>12.1f}")
        for key in ("dac_kl", "span"):
            growth = rows[1].get(key, 0) / max(rows[0].get(key, 1), 1) - 1
            print(f"{key}: growth from V=32000 to V=128000: {100 * growth:+.1f}% (limit +5%)")


if __name__ == "__main__":
    main()
