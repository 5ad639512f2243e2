"""The teacher's logits over SCRG's sequences, kept current as SCRG rewrites them (issue 18, item 3).

    scores = TeacherScores(teacher)
    logits = scores(tokens)        # [b, L]: every position (one pass, the teacher's KV cache is kept)
    ...                            # SCRG puts t_j at j and the student regenerates after it
    logits = scores(new_tokens)    # only the changed rows, from their first changed position on

Causal attention makes a position's logits, and its keys and values in every layer, a function of the
tokens up to it. So when a row changes first at column c, its logits and cache entries below c are
still valid, and a pass over columns [c, L) that attends to the cached prefix recomputes the rest:

    changed rows, grouped into passes (`suffix_passes`); per pass, R = its rows, c = their smallest first change
    logits[R, c:] = teacher(tokens[R, c:] | cache[R, :c])           (the cache's columns >= c rewritten)

Rows in R whose own first change lies after c recompute a few unchanged columns: the same values. The
grouping trades those columns against the passes' fixed cost (every weight is read once per pass).
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
        b, length = tokens.shape
        differs = tokens != self.tokens
        changed = torch.nonzero(differs.any(-1)).flatten()
        firsts = differs[changed].int().argmax(-1)  # argmax: the first True column of each row
        lean = self.stepper.path == "lean"
        if lean:
            passes = suffix_passes(changed.tolist(), firsts.tolist(), length)
        else:  # Megatron's static cache computes whole batches
            passes = [(list(range(b)), int(firsts.min()))] if changed.numel() else []
        computed = 0
        for rows, start in passes:
            rows = torch.tensor(rows, device=tokens.device)
            options = {"rows": rows} if lean else {}
            logits = self.stepper.forward(tokens[rows, start:], start, all_columns=True, **options)
            if logits is not None:
                self.logits[rows, start:] = logits
            computed += rows.numel() * (length - start)
        self.recomputed = computed / tokens.numel()


def suffix_passes(rows: list[int], starts: list[int], length: int) -> list[tuple[list[int], int]]:
    """Rows (with the first column each must recompute, of `length`) grouped into passes [(rows, start)], a pass
    computing all its rows from its smallest start: the grouping that computes the fewest (row, column)
    positions when every pass also costs `length` more (its fixed cost, reading each weight once, taken as one
    row's work). Rows sorted by start: the best groups are runs of that order (dynamic programming)."""
    order = sorted(range(len(rows)), key=lambda i: starts[i])
    best, cut = [0] + [None] * len(order), [0] * (len(order) + 1)  # best[i]: cost of order[:i]
    for end in range(1, len(order) + 1):
        for begin in range(end):
            cost = best[begin] + (end - begin) * (length - starts[order[begin]]) + length
            if best[end] is None or cost < best[end]:
                best[end], cut[end] = cost, begin
    passes, end = [], len(order)
    while end > 0:
        begin = cut[end]
        passes.append(([rows[i] for i in order[begin:end]], starts[order[begin]]))
        end = begin
    return passes[::-1]
