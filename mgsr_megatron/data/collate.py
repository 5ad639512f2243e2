"""Micro-batch tensors for the trainer, right-padded.

For a row with prompt p (P tokens) and response r (R tokens, ending with EOS) the sequence is
tokens = p + r, L = P + R, and with s = the padded length:

    tokens[i]          token i (pad_id for i >= L)
    labels[i]          tokens[i + 1] — the next-token target at LABEL position i (pad_id for i >= L - 1)
    loss_mask[i]       1.0 where labels[i] is a response token: i in [P - 1, L - 2]
    span_pair_mask[i]  True where label positions i and i + 1 predict two tokens of ONE span: for a span
                       [a, e) of response tokens (relative, as stored), i in [P + a - 1, P + e - 3].
                       The pair (logits[i], logits[i + 1]) is one term of the span loss (method.md §3).
    position_ids[i]    i
    prompt_lengths     P per row; response_lengths: R per row

`collate_prompts` gives prompts only (right-padded `prompt_tokens`, `prompt_lengths`) for generation.
"""

from __future__ import annotations

import torch

from mgsr_megatron.data.indexed import Sample


def collate(samples: list[Sample], pad_id: int, pad_to: int | None = None) -> dict:
    """Stack samples into right-padded tensors; `pad_to` fixes the length (pipeline parallelism needs
    one shape for every micro-batch), otherwise the longest row sets it."""
    lengths = [len(s.prompt_ids) + len(s.response_ids) for s in samples]
    seq_len = max(lengths) if pad_to is None else pad_to
    if max(lengths) > seq_len:
        raise ValueError(f"a sample of {max(lengths)} tokens does not fit pad_to={pad_to} "
                         f"(set data.max_length <= the sequence length)")
    batch = len(samples)
    tokens = torch.full((batch, seq_len), pad_id, dtype=torch.long)
    labels = torch.full((batch, seq_len), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((batch, seq_len), dtype=torch.float32)
    span_pair_mask = torch.zeros((batch, seq_len), dtype=torch.bool)
    prompt_lengths = torch.zeros(batch, dtype=torch.long)
    response_lengths = torch.zeros(batch, dtype=torch.long)
    for row, sample in enumerate(samples):
        prompt_len, response_len = len(sample.prompt_ids), len(sample.response_ids)
        length = prompt_len + response_len
        tokens[row, :prompt_len] = torch.as_tensor(sample.prompt_ids)
        tokens[row, prompt_len:length] = torch.as_tensor(sample.response_ids)
        labels[row, :length - 1] = tokens[row, 1:length]
        if response_len:
            loss_mask[row, prompt_len - 1:length - 1] = 1.0
        for start, end in sample.spans:
            span_pair_mask[row, prompt_len + start - 1:prompt_len + end - 2] = True
        prompt_lengths[row], response_lengths[row] = prompt_len, response_len
    position_ids = torch.arange(seq_len, dtype=torch.long).unsqueeze(0).expand(batch, -1).contiguous()
    return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "span_pair_mask": span_pair_mask,
            "position_ids": position_ids, "prompt_lengths": prompt_lengths, "response_lengths": response_lengths}


def collate_prompts(prompt_ids_list, pad_id: int) -> dict:
    """Right-padded prompts: `prompt_tokens [b, max P]`, `prompt_lengths [b]`."""
    lengths = [len(ids) for ids in prompt_ids_list]
    prompt_tokens = torch.full((len(lengths), max(lengths)), pad_id, dtype=torch.long)
    for row, ids in enumerate(prompt_ids_list):
        prompt_tokens[row, :len(ids)] = torch.as_tensor(ids, dtype=torch.long)
    return {"prompt_tokens": prompt_tokens, "prompt_lengths": torch.tensor(lengths, dtype=torch.long)}


def micro_batches(dataset, sampler, pad_id: int, pad_to: int | None = None):
    """Endless micro-batches of this DP rank: `collate([dataset[i] for i in next(sampler)])`.
    Checkpoint `sampler.state_dict()`: it counts the micro-batches handed out by this generator."""
    for indices in sampler:
        yield collate([dataset[i] for i in indices], pad_id, pad_to)
