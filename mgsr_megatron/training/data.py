"""What the trainer reads: ground-truth micro-batches, prompts for on-policy generation, and batches
built from generated responses — all shaped for the loss (sft_mask / kd_mask / span pairs).

Ground-truth rows get SFT and distillation on their response tokens. Generated (SCRG or replayed) rows
get distillation only (method.md §4; `mgsr.sft_on_generated` adds SFT). Rows without a response in the
preprocessed data are prompts only: they feed generation but never a ground-truth batch.
"""

from __future__ import annotations

import numpy as np
import torch

from mgsr_megatron.config import Config
from mgsr_megatron.data.collate import collate
from mgsr_megatron.data.indexed import InstructionDataset, Sample
from mgsr_megatron.data.sampler import DistributedResumableSampler
from mgsr_megatron.data.spans import get_span_extractor, spans_for_ids
from mgsr_megatron.data.tokenizer import load_tokenizer
from mgsr_megatron.errors import UserError


class _IndexedSampler:
    """A resumable sampler over a subset of a dataset's indices."""

    def __init__(self, indices: np.ndarray, micro_batch_size: int, dp_rank: int, dp_size: int, seed: int,
                 step_samples: int):
        self.indices = indices
        self.sampler = DistributedResumableSampler(len(indices), micro_batch_size, dp_rank, dp_size, seed,
                                                   step_samples=step_samples)

    def next(self) -> list[int]:
        return [int(self.indices[i]) for i in next(self.sampler)]


class TrainingData:
    def __init__(self, cfg: Config, dp_rank: int, dp_size: int):
        if not cfg.data.train_path:
            raise UserError("data.train_path is not set (a prefix written by tools/preprocess_data.py)")
        self.cfg = cfg
        self.tokenizer = load_tokenizer(cfg.data.tokenizer)
        if self.tokenizer.vocab_size != cfg.student.vocab_size:
            raise UserError(f"tokenizer {cfg.data.tokenizer} has {self.tokenizer.vocab_size} tokens but "
                            f"student.vocab_size={cfg.student.vocab_size}")
        self.dataset = InstructionDataset(cfg.data.train_path, self.tokenizer)
        self.eos_id, self.pad_id = self.tokenizer.eos_id, self.tokenizer.pad_id
        self.seq_length = cfg.schedule.seq_length
        self.extractor = get_span_extractor(cfg.data.span_extractor)
        labelled = np.nonzero(self.dataset.tokens.sequence_lengths[1::2])[0]  # rows with a response
        mbs, seed = cfg.schedule.micro_batch_size, cfg.parallel.seed
        step = cfg.schedule.global_batch_size  # epochs wrap at step boundaries: the same at every DP size
        self.ground_truth = _IndexedSampler(labelled, mbs, dp_rank, dp_size, seed, step)
        self.prompts = _IndexedSampler(np.arange(len(self.dataset)), mbs, dp_rank, dp_size, seed + 1, step)
        self.valid = self._open_valid(cfg)
        self._check_evaluation_fits(cfg)

    def _open_valid(self, cfg: Config):
        """data.valid_path, else the `.valid` split written beside a `.train` prefix (None if absent)."""
        from pathlib import Path

        path = cfg.data.valid_path
        if path is None and cfg.data.train_path.endswith(".train"):
            candidate = cfg.data.train_path[:-len(".train")] + ".valid"
            path = candidate if Path(candidate + ".json").is_file() else None
        if path is None:
            return None
        valid = InstructionDataset(path, self.tokenizer)
        labelled = [i for i in range(len(valid)) if len(valid[i].response_ids)]
        self.valid_path = path
        return (valid, labelled) if labelled else None

    def _check_evaluation_fits(self, cfg: Config) -> None:
        """Evaluation generates up to schedule.eval_max_new_tokens after each held-out prompt, which must fit
        the student's positions: checked here, before any model is built, not at the first evaluation."""
        sched = cfg.schedule
        if not (sched.eval_interval and sched.eval_prompts) or self.valid is None:
            return
        valid, labelled = self.valid
        longest, row = max((len(valid[i].prompt_ids), i) for i in labelled[:sched.eval_prompts])
        limit = cfg.student.max_position_embeddings
        if longest + sched.eval_max_new_tokens > limit:
            raise UserError(f"{self.valid_path} row {row}: its prompt ({longest} tokens) + "
                            f"schedule.eval_max_new_tokens ({sched.eval_max_new_tokens}) = "
                            f"{longest + sched.eval_max_new_tokens} exceeds student.max_position_embeddings={limit}"
                            f"; lower schedule.eval_max_new_tokens to {limit - longest} or less")

    def validation_micro_batches(self, count: int, dp_rank: int, dp_size: int) -> list[dict]:
        """The first `count` validation micro-batches of this DP rank (fixed: comparable across evals)."""
        if self.valid is None:
            return []
        valid, labelled = self.valid
        mbs = self.cfg.schedule.micro_batch_size
        windows = min(count, len(labelled) // (mbs * dp_size))
        return [self.with_loss_masks(collate([valid[labelled[(w * dp_size + dp_rank) * mbs + r]] for r in range(mbs)],
                                     self.pad_id, self.seq_length), generated=False) for w in range(windows)]

    def evaluation_items(self, count: int) -> list:
        """Up to `count` held-out prompts with references (PromptItem) from the validation split."""
        if self.valid is None or count <= 0:
            return []
        from mgsr_megatron.data.indexed import PromptItem

        valid, labelled = self.valid
        items = []
        for i in labelled[:count]:
            row = valid.row(i)
            items.append(PromptItem(valid[i].prompt_ids, row["prompt"], row["references"], row["family"]))
        return items

    def with_loss_masks(self, batch: dict, generated: bool) -> dict:
        sft_on = (not generated) or self.cfg.mgsr.sft_on_generated
        batch["kd_mask"] = batch["loss_mask"]
        batch["sft_mask"] = batch["loss_mask"] if sft_on else batch["loss_mask"] * 0
        return batch

    def next_micro_batches(self, count: int) -> list[dict]:
        """Ground-truth micro-batches; with teacher.cache each also carries `row_ids` [b] (the dataset rows:
        where the trainer reads their cached teacher distributions)."""
        batches = []
        for _ in range(count):
            rows = self.ground_truth.next()
            batch = self.with_loss_masks(collate([self.dataset[i] for i in rows], self.pad_id, self.seq_length),
                                         generated=False)
            if self.cfg.teacher.cache:
                batch["row_ids"] = torch.tensor(rows, dtype=torch.long)
            batches.append(batch)
        return batches

    def next_prompt_micro_batches(self, count: int) -> list[list[list[int]]]:
        return [[self.dataset[i].prompt_ids.tolist() for i in self.prompts.next()] for _ in range(count)]

    def collate_generated(self, samples: list[tuple[list[int], list[int]]], count: int,
                          length: int | None = None) -> list[dict]:
        """(prompt ids, response ids) pairs -> `count` micro-batches of `length` positions (default
        seq_length; a response that does not fit is cut to the room left); spans are extracted online."""
        length = self.seq_length if length is None else length
        rows = []
        for prompt, response in samples:
            room = length - len(prompt)
            response = list(response)[:room]
            rows.append(Sample(np.asarray(prompt, dtype=np.int64), np.asarray(response, dtype=np.int64),
                               spans_for_ids(self.extractor, self.tokenizer, response)))
        size = len(rows) // count
        return [self.with_loss_masks(collate(rows[k * size:(k + 1) * size], self.pad_id, length),
                                     generated=True) for k in range(count)]

    def state_dict(self) -> dict:
        return {"ground_truth": self.ground_truth.sampler.state_dict(),
                "prompts": self.prompts.sampler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.ground_truth.sampler.load_state_dict(state["ground_truth"])
        self.prompts.sampler.load_state_dict(state["prompts"])
