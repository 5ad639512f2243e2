"""The teacher's logits over SCRG's sequences, kept current as SCRG rewrites them (issue 18, item 3).

    scores = TeacherScores(teacher, first_column=c0)
    logits = scores(tokens)        # [b, L - c0]: columns c0.. (one pass over all L; the KV cache is kept)
    ...                            # SCRG puts t_j at j and the student regenerates after it
    logits = scores(new_tokens)    # only the changed rows, from their first changed position on

Causal attention makes a position's logits, and its keys and values in every layer, a function of the
tokens up to it. So when a row changes first at column c_r, its logits and cache entries below c_r are
still valid, and one pass that attends to the cached prefixes recomputes the rest:

    R = the changed rows, c = min_r c_r
    logits[r, c_r:] = teacher(tokens[r, c_r:] | cache[r, :c_r])    for r in R   (cache columns >= c_r rewritten)

The lean stage (kv_decode.py) runs it as a ragged pass: the position-wise work (every linear layer, the
output layer) on exactly the changed positions, packed; attention on the rows padded to [c, L). So the
pass costs the changed suffixes plus one read of every weight. Megatron's own inference path (the
fallback, a static cache) recomputes every row from c.

Each SCRG round's detection, and the loss pass of a training step (mgsr.reuse_scrg_teacher_logits),
so cost one full teacher pass plus the changed suffixes, instead of a full pass per round and one more
for the loss.

Megatron teachers run the decoding stages of `generator.PipelineStepper` (TP collectives, PP
send/recv of the pass's rows) with `all_columns`: the last stage returns this TP rank's vocab shard
of every column, as the loss takes it.
A `GenerationModel` teacher (Hugging Face, the DeepSpeed engine) is scored whole on every call:
under ZeRO-3 all ranks must run the same passes, whatever changed on each.
`recomputed` is the share of the [b, L] positions the last call computed.

`first_column` c0: the logits of columns below it are never read (SCRG's candidates and the loss start at
the shortest prompt's last position), so the output layer skips them -- in a small model the largest
product of the pass -- and the kept tensor holds columns [c0, L) only.
"""

from __future__ import annotations

import torch

from mgsr_megatron.generation.generator import GenerationModel, PipelineStepper
from mgsr_megatron.generation.kv_decode import ragged_columns


class TeacherScores:
    def __init__(self, teacher, first_column: int = 0):
        self.teacher = teacher
        self.first_column = first_column
        self.tokens: torch.Tensor | None = None
        self.logits: torch.Tensor | None = None  # the last pipeline stage's; None elsewhere
        self.stepper: PipelineStepper | None = None
        self.recomputed = 0.0

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """This TP rank's logit shard [b, L - first_column, V_padded/TP] of `tokens`, columns first_column..
        (last pipeline stage; None on the others). Identical `tokens` on every rank of the teacher's replica
        (they choose the passes)."""
        if isinstance(self.teacher, GenerationModel):
            self.logits, self.recomputed = self.teacher.score(tokens)[:, self.first_column:], 1.0
            self.tokens = tokens.clone()
            return self.logits
        was_training = self.teacher.training
        self.teacher.eval()  # Megatron's inference path needs it (and a teacher has no dropout to apply)
        try:
            if self.tokens is None or self.tokens.shape != tokens.shape:
                self._score_all(tokens)
            else:
                self._rescore_changed(tokens)
        finally:
            self.teacher.train(was_training)
        self.tokens = tokens.clone()
        return self.logits

    def _score_all(self, tokens: torch.Tensor) -> None:
        b, length = tokens.shape
        self.stepper = PipelineStepper(self.teacher, b, length)
        self.logits = self.stepper.forward(tokens, 0, all_columns=True, first_column=self.first_column)
        self.recomputed = 1.0

    def _rescore_changed(self, tokens: torch.Tensor) -> None:
        b, length = tokens.shape
        differs = tokens != self.tokens
        changed = torch.nonzero(differs.any(-1)).flatten()
        if changed.numel() == 0:
            self.recomputed = 0.0
            return
        firsts = differs[changed].int().argmax(-1)  # argmax: the first True column of each row
        start = int(firsts.min())
        if self.stepper.path == "lean":  # one ragged pass: each changed row from its own first change
            logits = self.stepper.forward(tokens[changed, start:], start, all_columns=True, rows=changed,
                                          starts=firsts)
            computed = ragged_columns(firsts, start, length - start)
            if logits is not None:
                row_index, column = computed.nonzero(as_tuple=True)
                kept = column + (start - self.first_column)  # the kept tensor's column of each computed position
                if start < self.first_column:
                    row_index, kept, logits = row_index[kept >= 0], kept[kept >= 0], logits[kept >= 0]
                self.logits[changed[row_index], kept] = logits
            self.recomputed = int(computed.sum()) / tokens.numel()
        else:  # Megatron's static cache computes whole batches
            logits = self.stepper.forward(tokens[:, start:], start, all_columns=True, first_column=self.first_column)
            if logits is not None:
                self.logits[:, max(start - self.first_column, 0):] = logits
            self.recomputed = b * (length - start) / tokens.numel()
