"""The teacher's logits over SCRG's sequences, kept current as SCRG rewrites them (issue 18, item 3).

    scores = TeacherScores(teacher)
    logits = scores(tokens)        # [b, L]: every position (one pass, the teacher's KV cache is kept)
    ...                            # SCRG puts t_j at j and the student regenerates after it
    logits = scores(new_tokens)    # only the changed rows, from their first changed position on

Causal attention makes a position's logits, and its keys and values in every layer, a function of the
tokens up to it. So when a row changes first at column c, its logits and cache entries below c are
still valid, and a pass over columns [c, L) that attends to the cached prefix recomputes the rest:

    pass rows  R = rows whose tokens differ from the last call's,  c = min over R of the first change
    logits[R, c:] = teacher(tokens[R, c:] | cache[R, :c])           (the cache's columns >= c rewritten)

Rows in R whose own first change lies after c recompute a few unchanged columns: the same values.
Each SCRG round's detection, and the loss pass of a training step (mgsr.reuse_scrg_teacher_logits),
so cost one full teacher pass plus the changed suffixes, instead of a full pass per round and one more
for the loss.

Megatron teachers run the decoding stages of `generator.PipelineStepper` (TP collectives, PP
send/recv of the pass's rows) with `all_columns`: the last stage returns this TP rank's vocab shard
of every column, as the loss takes it. The lean stage (kv_decode.py) computes the pass's rows in
place in its cache; Megatron's own inference path (the fallback) recomputes every row from c.
A `GenerationModel` teacher (Hugging Face, the DeepSpeed engine) is scored whole on every call:
under ZeRO-3 all ranks must run the same passes, whatever changed on each.
`recomputed` is the share of the [b, L] positions the last call computed.
"""

from __future__ import annotations

import torch

from mgsr_megatron.generation.generator import GenerationModel, PipelineStepper


class TeacherScores:
    def __init__(self, teacher):
        self.teacher = teacher
        self.tokens: torch.Tensor | None = None
        self.logits: torch.Tensor | None = None  # the last pipeline stage's; None elsewhere
        self.stepper: PipelineStepper | None = None
        self.recomputed = 0.0

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """This TP rank's logit shard [b, L, V_padded/TP] of `tokens` (last pipeline stage; None on the
        others). Identical `tokens` on every rank of the teacher's replica (they choose the passes)."""
        if isinstance(self.teacher, GenerationModel):
            self.logits, self.recomputed = self.teacher.score(tokens), 1.0
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
        self.logits = self.stepper.forward(tokens, 0, all_columns=True)
        self.recomputed = 1.0

    def _rescore_changed(self, tokens: torch.Tensor) -> None:
        differs = tokens != self.tokens
        rows = torch.nonzero(differs.any(-1)).flatten()
        self.recomputed = 0.0
        if rows.numel() == 0:
            return
        start = int(differs[rows].int().argmax(-1).min())  # argmax: the first True column of each row
        if self.stepper.path != "lean":  # Megatron's static cache computes whole batches
            rows = torch.arange(tokens.shape[0], device=tokens.device)
        options = {"rows": rows} if self.stepper.path == "lean" else {}
        logits = self.stepper.forward(tokens[rows, start:], start, all_columns=True, **options)
        if logits is not None:
            self.logits[rows, start:] = logits
        self.recomputed = rows.numel() * (tokens.shape[1] - start) / tokens.numel()
