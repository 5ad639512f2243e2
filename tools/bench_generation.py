"""Generation throughput on this machine (single process, TP1/PP1; CPU or one GPU).

    .venv/bin/python tools/bench_generation.py            # tiny GPT-2 style model, batch 8, 128 new tokens

Prints, in one run:
  1. tokens/s of the KV-cached generator vs a no-cache loop that recomputes the whole sequence each
     step with the same Megatron model and the same sampler          (target >= 5x)
  2. tokens/s vs Hugging Face `generate` (LlamaForCausalLM or GPT2LMHeadModel, KV cache) on the same
     weights (target >= 1x); the greedy tokens of both are compared as a check of the weight mapping.
     (GPT-2's HF Conv1D keeps weights as [in, out]; on this CPU x @ W with that layout is 2-2.5x faster
     than Megatron's (and nn.Linear's) x @ W.t() for 8-row inputs, so `--arch gpt2` compares layouts
     as much as generators; llama uses nn.Linear on both sides.)
  3. the cost of SCRG with one correction round vs plain student sampling   (target <= 2.2x)
Each comparison times its two sides alternately `--repeats` times and takes the medians. On CPU the clock
is the process's CPU time with one torch thread by default (`--threads`): wall time on the 2 shared cores
of the build machine swung by 3x between runs, CPU time much less.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import torch


def megatron_to_hf_gpt2(full: dict, cfg):
    """GPT2LMHeadModel with the weights of a dense Megatron gpt2-style state dict (few lines on
    purpose: mgsr_megatron/conversion is the real converter). Padded vocabulary rows are dropped."""
    from transformers import GPT2Config, GPT2LMHeadModel

    h, heads, layers = cfg.hidden_size, cfg.num_attention_heads, cfg.num_layers
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.max_position_embeddings, n_embd=h,
                                    n_layer=layers, n_head=heads, n_inner=4 * h, activation_function="gelu_new",
                                    layer_norm_epsilon=cfg.norm_epsilon, resid_pdrop=0.0, embd_pdrop=0.0,
                                    attn_pdrop=0.0, tie_word_embeddings=True))
    head_dim = h // heads
    out = {"transformer.wte.weight": full["embedding.word_embeddings.weight"][:cfg.vocab_size],
           "transformer.wpe.weight": full["embedding.position_embeddings.weight"],
           "transformer.ln_f.weight": full["decoder.final_layernorm.weight"],
           "transformer.ln_f.bias": full["decoder.final_layernorm.bias"]}
    for i in range(layers):
        m, p = f"decoder.layers.{i}.", f"transformer.h.{i}."
        # Megatron fuses QKV per head: [h0: q k v, h1: q k v, ...]; HF Conv1D wants [in, q|k|v]
        qkv_w = full[m + "self_attention.linear_qkv.weight"].view(heads, 3, head_dim, h)
        qkv_b = full[m + "self_attention.linear_qkv.bias"].view(heads, 3, head_dim)
        out[p + "attn.c_attn.weight"] = qkv_w.permute(1, 0, 2, 3).reshape(3 * h, h).t()
        out[p + "attn.c_attn.bias"] = qkv_b.permute(1, 0, 2).reshape(3 * h)
        out[p + "attn.c_proj.weight"] = full[m + "self_attention.linear_proj.weight"].t()
        out[p + "attn.c_proj.bias"] = full[m + "self_attention.linear_proj.bias"]
        out[p + "mlp.c_fc.weight"] = full[m + "mlp.linear_fc1.weight"].t()
        out[p + "mlp.c_fc.bias"] = full[m + "mlp.linear_fc1.bias"]
        out[p + "mlp.c_proj.weight"] = full[m + "mlp.linear_fc2.weight"].t()
        out[p + "mlp.c_proj.bias"] = full[m + "mlp.linear_fc2.bias"]
        for ours, theirs in (("input_layernorm", "ln_1"), ("pre_mlp_layernorm", "ln_2")):
            out[p + theirs + ".weight"] = full[m + ours + ".weight"]
            out[p + theirs + ".bias"] = full[m + ours + ".bias"]
    missing, unexpected = hf.load_state_dict(out, strict=False)
    missing = [k for k in missing if not k.endswith("attn.bias") and k != "lm_head.weight"]
    assert not missing and not unexpected, (missing, unexpected)
    hf.tie_weights()
    return hf.eval()


def megatron_to_hf_llama(full: dict, cfg):
    """LlamaForCausalLM with the weights of a dense Megatron llama-style state dict (untied, no biases)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    h, heads, groups, layers = cfg.hidden_size, cfg.num_attention_heads, cfg.num_query_groups, cfg.num_layers
    head_dim = h // heads
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=h, intermediate_size=cfg.ffn_hidden_size,
                                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=groups,
                                      max_position_embeddings=cfg.max_position_embeddings,
                                      rms_norm_eps=cfg.norm_epsilon,
                                      rope_theta=cfg.rope_theta, tie_word_embeddings=False, attention_bias=False))
    out = {"model.embed_tokens.weight": full["embedding.word_embeddings.weight"][:cfg.vocab_size],
           "lm_head.weight": full["output_layer.weight"][:cfg.vocab_size],
           "model.norm.weight": full["decoder.final_layernorm.weight"]}
    for i in range(layers):
        m, p = f"decoder.layers.{i}.", f"model.layers.{i}."
        # Megatron fuses QKV per query group: [g0: q (heads/groups heads) k v, g1: ...]
        qkv = full[m + "self_attention.linear_qkv.weight"].view(groups, heads // groups + 2, head_dim, h)
        out[p + "self_attn.q_proj.weight"] = qkv[:, :-2].reshape(heads * head_dim, h)
        out[p + "self_attn.k_proj.weight"] = qkv[:, -2].reshape(groups * head_dim, h)
        out[p + "self_attn.v_proj.weight"] = qkv[:, -1].reshape(groups * head_dim, h)
        out[p + "self_attn.o_proj.weight"] = full[m + "self_attention.linear_proj.weight"]
        gate, up = full[m + "mlp.linear_fc1.weight"].chunk(2, dim=0)  # SwiGLU: [gate; up]
        out[p + "mlp.gate_proj.weight"], out[p + "mlp.up_proj.weight"] = gate, up
        out[p + "mlp.down_proj.weight"] = full[m + "mlp.linear_fc2.weight"]
        out[p + "input_layernorm.weight"] = full[m + "input_layernorm.weight"]
        out[p + "post_attention_layernorm.weight"] = full[m + "pre_mlp_layernorm.weight"]
    hf.load_state_dict(out, strict=True)
    return hf.eval()


def full_recompute(model, prompts, options, *, vocab_size):
    """The no-cache baseline: every step runs the whole sequence through the model."""
    from mgsr_megatron.generation.sampling import sample

    max_new_tokens, eos_id = options.max_new_tokens, options.eos_id
    b = len(prompts)
    lengths = torch.tensor([len(p) for p in prompts])
    total = int(lengths.max()) + max_new_tokens
    tokens = torch.full((b, total), eos_id, dtype=torch.long)
    for r, p in enumerate(prompts):
        tokens[r, :len(p)] = torch.tensor(p)
    finished = torch.zeros(b, dtype=torch.bool)
    produced = 0
    model.eval()
    with torch.no_grad():
        for position in range(int(lengths.min()), total):
            seq = tokens[:, :position]
            logits = model(seq, torch.arange(position).unsqueeze(0).expand(b, -1), None)[:, -1]
            column = sample(logits, options, vocab_size=vocab_size, step=position)
            sampled = (position >= lengths) & ~finished & (position < lengths + max_new_tokens)
            tokens[sampled, position] = column[sampled]
            produced += int(sampled.sum())
            finished |= sampled & (column == eos_id)
            if bool((finished | (position + 1 >= lengths + max_new_tokens)).all()):
                break
    return tokens, produced


def clock() -> float:
    """CPU time of this process on CPU (robust when other jobs share the cores), wall time on GPU."""
    from mgsr_megatron import platform

    if platform.cuda_available():
        platform.synchronize()
        return time.perf_counter()
    return time.process_time()


def timed(fn):
    start = clock()
    result = fn()
    return clock() - start, result


def paired(baseline, candidate, repeats: int):
    """Time `baseline` and `candidate` alternately `repeats` times. Returns (baseline seconds,
    candidate seconds, their results), each time the median: alternating and pairing keeps slow
    drifts of a shared machine (seen: 30% over a minute) out of the ratio."""
    base_times, cand_times = [], []
    for _ in range(repeats):
        t, base_result = timed(baseline)
        base_times.append(t)
        t, cand_result = timed(candidate)
        cand_times.append(t)
    return statistics.median(base_times), statistics.median(cand_times), (base_result, cand_result)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=("llama", "gpt2"), default="llama")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=1000)
    parser.add_argument("--teacher-hidden", type=int, default=384)
    parser.add_argument("--teacher-layers", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=5, help="timed pairs per comparison (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: leave as is)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-baseline", action="store_true", help="skip the slow full-recompute loop")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from mgsr_megatron import parallel
    from mgsr_megatron.config import MGSRConfig, ModelConfig
    from mgsr_megatron.generation import SamplingOptions, ScrgSettings, generate, scrg
    from mgsr_megatron.models import build_model, resolve
    from mgsr_megatron.models.state_dict import gather_full_state_dict

    parallel.init_distributed()
    parallel.initialize_model_parallel(1, 1, seed=args.seed)
    student_cfg = resolve(ModelConfig(arch=args.arch, num_layers=args.layers, hidden_size=args.hidden,
                                      num_attention_heads=args.heads, vocab_size=args.vocab,
                                      max_position_embeddings=512))
    teacher_cfg = ModelConfig(arch=args.arch, num_layers=args.teacher_layers, hidden_size=args.teacher_hidden,
                              num_attention_heads=args.heads, vocab_size=args.vocab, max_position_embeddings=512)
    student, teacher = build_model(student_cfg), build_model(teacher_cfg)
    student.eval(), teacher.eval()
    gen = torch.Generator().manual_seed(args.seed)
    prompts = [torch.randint(4, args.vocab, (int(n),), generator=gen).tolist()
               for n in torch.randint(16, 33, (args.batch,), generator=gen)]
    eos_id = 3
    options = SamplingOptions(max_new_tokens=args.new_tokens, eos_id=eos_id, seed=args.seed)
    vocab = dict(vocab_size=args.vocab)
    figures = {"clock": "wall" if torch.cuda.is_available() else "process CPU time", "batch": args.batch,
               "new_tokens": args.new_tokens, "threads": torch.get_num_threads(),
               "student": f"{args.arch} {args.layers}x{args.hidden}",
               "teacher": f"{args.arch} {args.teacher_layers}x{args.teacher_hidden}"}

    def tokens_of(out):
        return int(out.response_lengths.sum())

    # warm-up: the first passes pay one-time allocations
    warm = dataclasses.replace(options, max_new_tokens=4)
    generate(student, prompts, warm, **vocab)
    scrg(student, teacher, prompts, dataclasses.replace(warm, seed=0), settings=ScrgSettings(), **vocab)
    if not args.skip_baseline:
        full_recompute(student, prompts, warm, **vocab)

    # 1. KV cache vs full recompute (same sampler, same seed: the tokens must agree)
    def sampled():
        return generate(student, prompts, options, **vocab)

    if not args.skip_baseline:
        t_full, t_cached, ((full_tokens, produced), out) = paired(
            lambda: full_recompute(student, prompts, options, **vocab), sampled, 1)
        figures["full_recompute_tokens_per_s"] = produced / t_full
        figures["speedup_vs_full_recompute"] = (tokens_of(out) / t_cached) / figures["full_recompute_tokens_per_s"]
        figures["same_tokens_as_full_recompute"] = bool(torch.equal(
            full_tokens[:, :out.tokens.shape[1]], out.tokens))

    # 2. Hugging Face generate, same weights, greedy both (deterministic; compares the mapping too)
    to_hf = megatron_to_hf_llama if args.arch == "llama" else megatron_to_hf_gpt2
    hf = to_hf(gather_full_state_dict(student), student_cfg)
    width = max(map(len, prompts))
    ids = torch.zeros(args.batch, width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompts):  # HF decoder-only generation wants left padding
        ids[r, width - len(p):] = torch.tensor(p)
        mask[r, width - len(p):] = 1

    def run_hf():
        with torch.no_grad():
            return hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.new_tokens,
                               min_new_tokens=args.new_tokens,
                               do_sample=False, eos_token_id=None, pad_token_id=0, use_cache=True)

    with torch.no_grad():
        hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    t_hf, t_ours_greedy, (hf_out, ours) = paired(
        run_hf, lambda: generate(student, prompts, dataclasses.replace(options, greedy=True, seed=0), **vocab),
        args.repeats)
    figures["hf_generate_tokens_per_s"] = args.batch * args.new_tokens / t_hf
    figures["cached_greedy_tokens_per_s"] = tokens_of(ours) / t_ours_greedy
    figures["speedup_vs_hf_generate"] = figures["cached_greedy_tokens_per_s"] / figures["hf_generate_tokens_per_s"]
    hf_responses = hf_out[:, width:].tolist()
    agree = [sum(a == b for a, b in zip(mine, theirs)) / max(len(mine), 1)
             for mine, theirs in zip(ours.responses(), hf_responses)]
    # rows stop at EOS in ours (HF was told to ignore EOS): compare up to our length
    figures["greedy_token_agreement_with_hf"] = sum(agree) / len(agree)

    # 3. SCRG, one round, vs plain sampling (same student sample inside)
    settings = ScrgSettings.from_config(MGSRConfig(max_new_tokens=args.new_tokens, scrg_rounds=1))
    t_cached, t_scrg, (out, (scrg_out, stats)) = paired(
        sampled, lambda: scrg(student, teacher, prompts, options, settings=settings, **vocab), args.repeats)
    figures["cached_tokens_per_s"] = tokens_of(out) / t_cached
    figures["scrg_one_round_cost_vs_sampling"] = t_scrg / t_cached
    figures["scrg_rows_corrected"] = int(stats["corrected"].sum())
    figures["scrg_mean_j_over_response"] = float(
        ((stats["j"] - scrg_out.prompt_lengths).double() / args.new_tokens)[stats["corrected"]].mean())

    width_name = max(map(len, figures))
    for name, value in figures.items():
        print(f"{name:<{width_name}}  {value:.3f}" if isinstance(value, float) else f"{name:<{width_name}}  {value}")
    print("JSON " + json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()}))
    return figures


if __name__ == "__main__":
    main()
