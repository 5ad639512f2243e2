"""Generation and SCRG on a Hugging Face causal LM (TP = PP = 1): the GenerationModel adapter.

    student = HfCausalLM(hf_model, vocab_size=tokenizer.vocab_size, lockstep=zero_stage == 3)
    out = generate(student, prompts, options, vocab_size=tokenizer.vocab_size)
    out, stats = scrg(student, HfCausalLM(hf_teacher, vocab_size=...), prompts, options, settings=..., vocab_size=...)

generator.decode and scrg.py run unchanged on it: `HfStage` is a decode stage (the protocol of
generator.MegatronStage and kv_decode.LeanStage: `hidden_shape`, `reorder_rows`,
`__call__(tokens, received, offset)`) that computes with the model's own attention and KV cache
(transformers' `DynamicCache`, explicit `position_ids`), and `HfStepper` is the one-stage stepper
decode drives. The keys/values live in preallocated tensors [b, kv_heads, max_length, head_dim] per
layer, so that rows can be permuted (decode computes a prefix of rows sorted by where they join) and a
pass can start at any offset (SCRG's regeneration from each row's j): each pass hands the model a
DynamicCache holding rows [:b'] and positions [0, offset), and copies the keys/values it appended at
[offset, offset + s) back. Logits are cut to `vocab_size` (the tokenizer's; HF embeddings may be wider).

Lockstep (ZeRO-3): every forward gathers the partitioned parameters collectively, so every data-parallel
rank must run the same number of passes. With `lockstep=True` each real pass is preceded by a MAX
all-reduce of 1 ("I pass"); a rank done with a generation all-reduces 0 and, while any peer still
passes, runs an idle forward on one dummy token (no cache, result dropped), as transformers'
`synced_gpus` does. SCRG's round loop asks `any_rank` so that every rank runs the same rounds. The flag
is explicit (the DeepSpeed trainer sets it for ZeRO-3 models), not probed.
"""

from __future__ import annotations

import inspect

import torch
import torch.distributed as dist

from mgsr_megatron import platform
from mgsr_megatron.generation.generator import GenerationModel


def _bare(model):
    """The HF model inside a DeepSpeed engine (`.module`), or the model itself."""
    return getattr(model, "module", model)


class HfStage:
    """One decode stage over the whole HF model: `stage(tokens [b', s], None, offset)` writes the cache of
    rows [:b'] at positions [offset, offset + s) (rows [:b'] must hold positions [0, offset)) and returns
    the logits of the last column [b', vocab_size]."""

    def __init__(self, model, batch_size: int, max_length: int, vocab_size: int):
        self.model, self.batch_size, self.max_length, self.vocab_size = model, batch_size, max_length, vocab_size
        self.keys: list[torch.Tensor] = []  # per layer [batch_size, kv_heads, max_length, head_dim], on first use
        self.values: list[torch.Tensor] = []
        parameters = inspect.signature(model.forward).parameters
        self.keep_last = "logits_to_keep" in parameters
        # transformers 5.x names the cache argument `cache` (`past_key_values` is deprecated there)
        self.cache_argument = "cache" if "cache" in parameters else "past_key_values"

    def hidden_shape(self, batch: int, columns: int) -> tuple[int, int, int]:
        return batch, columns, self.model.config.hidden_size

    def reorder_rows(self, order: torch.Tensor) -> bool:
        """Cache row i <- cache row order[i] (nothing to move before the first pass)."""
        self.keys = [keys.index_select(0, order) for keys in self.keys]
        self.values = [values.index_select(0, order) for values in self.values]
        return True

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, received: torch.Tensor | None, offset: int) -> torch.Tensor:
        from transformers import DynamicCache

        b, s = tokens.shape
        if self.keys and offset > 0:
            cache = DynamicCache([(k[:b, :, :offset], v[:b, :, :offset]) for k, v in zip(self.keys, self.values)])
        else:
            cache = DynamicCache()
        positions = torch.arange(offset, offset + s, device=tokens.device)
        extra = {"logits_to_keep": 1} if self.keep_last else {}
        extra[self.cache_argument] = cache  # the model appends positions [offset, offset + s) to it
        output = self.model(input_ids=tokens, position_ids=positions.unsqueeze(0).expand(b, s), use_cache=True,
                            **extra)
        self._store(cache, b, offset, s)
        return output.logits[:, -1, :self.vocab_size]

    def _store(self, cache, b: int, offset: int, s: int) -> None:
        """Copy the keys/values the pass appended (positions [offset, offset + s)) into the row store."""
        for index, layer in enumerate(cache.layers):
            if len(self.keys) <= index:  # first pass: allocate with the model's own shapes and dtype
                shape = (self.batch_size, layer.keys.shape[1], self.max_length, layer.keys.shape[-1])
                self.keys.append(layer.keys.new_zeros(shape))
                self.values.append(layer.values.new_zeros(shape[:-1] + layer.values.shape[-1:]))
            self.keys[index][:b, :, offset:offset + s] = layer.keys[:, :, offset:offset + s]
            self.values[index][:b, :, offset:offset + s] = layer.values[:, :, offset:offset + s]


class HfStepper:
    """generator.PipelineStepper's interface over one HfStage (one rank holds the whole model replica)."""

    tp_rank = 0

    def __init__(self, adapter: HfCausalLM, batch_size: int, max_length: int):
        self.adapter, self.batch_size = adapter, batch_size
        self.stage = HfStage(adapter.model, batch_size, max_length, adapter.vocab_size)
        self.path = "hf"

    def logit_record(self, length: int) -> torch.Tensor:
        """A zeroed [b, length, vocab_size] buffer for `decode(record=...)`."""
        dtype = next(self.adapter.model.parameters()).dtype
        return torch.zeros(self.batch_size, length, self.adapter.vocab_size, dtype=dtype, device=platform.device())

    def forward(self, tokens: torch.Tensor, offset: int) -> torch.Tensor:
        self.adapter.announce_pass()
        return self.stage(tokens, None, offset)

    def reorder_rows(self, order: torch.Tensor) -> bool:
        return self.stage.reorder_rows(order)

    def broadcast_column(self, column: torch.Tensor) -> torch.Tensor:
        return column  # no pipeline


class HfCausalLM(GenerationModel):
    """A Hugging Face causal LM (bare, or the `.module` of a DeepSpeed engine) as a GenerationModel.

    `vocab_size`: the tokenizer's (logits are cut to it). `lockstep`: every rank of `group` (default:
    the world) runs the same number of forward passes (required for ZeRO-3-partitioned models)."""

    def __init__(self, model, vocab_size: int, *, lockstep: bool = False, group=None):
        self.model = _bare(model)
        self.vocab_size = vocab_size
        self.lockstep = lockstep
        self.group = group

    @property
    def training(self) -> bool:
        return self.model.training

    def train(self, mode: bool = True):
        self.model.train(mode)
        return self

    def context_limit(self) -> int:
        return int(self.model.config.max_position_embeddings)

    def stepper(self, batch_size: int, max_length: int) -> HfStepper:
        return HfStepper(self, batch_size, max_length)

    @torch.no_grad()
    def score(self, tokens: torch.Tensor) -> torch.Tensor:
        was_training = self.model.training
        self.model.eval()
        try:
            positions = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)
            logits = self.model(input_ids=tokens, position_ids=positions, use_cache=False).logits
        finally:
            self.model.train(was_training)
        return logits[..., :self.vocab_size]

    # ---------------------------------------------------------------------------------------- lockstep
    def _vote(self, passing: bool) -> bool:
        """MAX all-reduce of this rank's flag: True when any rank of the group runs a pass now."""
        flag = torch.tensor([1.0 if passing else 0.0], device=platform.device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag.item() > 0)

    def any_rank(self, flag: torch.Tensor) -> bool:
        return self._vote(bool(flag.any())) if self.lockstep else bool(flag.any())

    def announce_pass(self) -> None:
        if self.lockstep:
            self._vote(True)

    @torch.no_grad()
    def join_peer_passes(self) -> None:
        if not self.lockstep:
            return
        dummy = torch.zeros(1, 1, dtype=torch.int64, device=platform.device())
        while self._vote(False):
            self.model(input_ids=dummy, use_cache=False)  # matches a peer's pass: same modules, same gathers
