"""A lean KV-cached forward of one pipeline stage of a Megatron GPTModel, for decoding.

Why: at decode time a step is a handful of [b, h] x [h, h'] products per layer, and in megatron-core
0.16.1 the inference path spends most of it elsewhere: per-module bookkeeping, autograd Functions
around every parallel linear, and the static KV cache keeps keys *before* RoPE, so every step
re-rotates the whole cached prefix. This stage runs the same math straight on the layers' parameters:

    per layer   a = x + (proj(attention(rope(q), cache(rope(k)), cache(v))) + b_proj)
                y = a + (fc2(act(fc1(norm2(a)))) + b_fc2)        with q, k, v = qkv(norm1(x))
    first stage x = embed(tokens) (+ learned positions)
    last stage  logits = output(final_norm(y[:, -1]))               gathered over the vocabulary

with its own cache of rotated keys and values [b, groups_local, max_length, head_dim] per layer and
Megatron's TP collectives: an all-reduce after the row-parallel `linear_proj` / `linear_fc2` and after
the vocab-parallel embedding lookup, an all-gather of the vocab-parallel logits. Grouped-query
attention folds a group's query heads into the query-length axis, so K/V are never repeated.
A ragged pass (`starts`, the teacher's rescoring in teacher_scores.py) computes each row from its own
column: every position-wise product on the packed positions, attention on the rows padded.

It covers the layer spec `models/builder.py` builds (Megatron's local spec, llama / gpt2 / opt styles).
`unsupported_reason` names what it does not cover (sequence parallel, MoE, QK-norm, fewer KV groups
than TP ranks, partial RoPE); the generator then uses Megatron's own inference path. Tests compare
both paths' tokens with an independent dense reference at TP1, TP2, PP2 and TP2xPP2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mgsr_megatron.losses.vocab_parallel import all_gather_last, all_reduce


def _is_identity(module) -> bool:
    return module is None or type(module).__name__ in ("IdentityOp", "IdentityFuncOp")


def unsupported_reason(gpt) -> str | None:
    """Why this stage cannot run `gpt` (None: it can)."""
    from megatron.core import parallel_state

    cfg = gpt.config
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if cfg.sequence_parallel:
        return "sequence parallelism"
    if getattr(cfg, "num_moe_experts", None):
        return "mixture-of-experts layers"
    if cfg.num_query_groups is not None and cfg.num_query_groups % tp:
        return f"num_query_groups={cfg.num_query_groups} not divisible by TP={tp}"
    if gpt.position_embedding_type not in ("rope", "learned_absolute"):
        return f"position embedding '{gpt.position_embedding_type}'"
    if gpt.position_embedding_type == "rope":
        if cfg.rotary_interleaved or getattr(cfg, "rotary_percent", 1.0) != 1.0:
            return "interleaved or partial RoPE"
    if cfg.fp32_residual_connection:
        return "fp32 residual connection"
    if getattr(cfg, "attention_output_gate", False):
        return "gated attention"
    for layer in gpt.decoder.layers:
        attention = getattr(layer, "self_attention", None)
        if attention is None or not hasattr(attention, "linear_qkv") or not hasattr(layer, "mlp"):
            return f"layer type {type(layer).__name__}"
        if not (_is_identity(getattr(attention, "q_layernorm", None))
                and _is_identity(getattr(attention, "k_layernorm", None))):
            return "QK layer norm"
        if not hasattr(layer.mlp, "linear_fc1"):
            return f"MLP type {type(layer.mlp).__name__}"
    return None


def ragged_columns(starts: torch.Tensor, offset: int, columns: int) -> torch.Tensor:
    """[b, columns] bool: the positions a ragged pass over columns [offset, offset + columns) computes,
    row r from its own starts[r] on."""
    positions = torch.arange(offset, offset + columns, device=starts.device)
    return positions.unsqueeze(0) >= starts.unsqueeze(-1)


@dataclass(frozen=True)
class _Pass:
    """What every layer of one pass shares: its [batch, columns] block at `offset`, the (cos, sin) of the
    computed positions (broadcastable over their heads), the attention mask, the cache rows (None: the
    first `batch`) and, in a ragged pass, (computed [batch, columns], cache row, absolute position per
    computed position)."""
    batch: int
    columns: int
    offset: int
    rope: tuple[torch.Tensor, torch.Tensor] | None
    mask: torch.Tensor | None
    rows: torch.Tensor | None
    ragged: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None


_WEIGHT_MAJOR_BYTES = 16 << 20  # output layers from this size on exceed the CPU's caches


def _decode_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """hidden [b, h] (a decode step's few rows) times the output layer's weight [V/TP, h], transposed.
    On CPU, for a weight larger than the caches, MKL's product with the transposed weight as its right
    operand runs 1.2-6x slower for 2-32 rows than the same product taken weight-major (V/TP 6000-50257,
    h 256-2048; docs/generation.md), and this product is the largest part of a decode step: CPU takes it
    weight-major there (equal to rounding). Cache-resident weights (< 16 MiB) are faster as they are."""
    if hidden.device.type == "cpu" and weight.numel() * weight.element_size() >= _WEIGHT_MAJOR_BYTES:
        return (weight @ hidden.t()).t()
    return F.linear(hidden, weight)


class LeanStage:
    """`stage(tokens [b, s], received [b, s, h] | None, offset)` writes the cache at positions
    [offset, offset + s) and returns hidden states [b, s, h] (not the last stage) or the gathered
    logits of the last column [b, V_padded] (last stage)."""

    def __init__(self, gpt, batch_size: int, max_length: int):
        from megatron.core import parallel_state

        cfg = gpt.config
        self.gpt = gpt
        self.tp_group = parallel_state.get_tensor_model_parallel_group()
        self.tp = parallel_state.get_tensor_model_parallel_world_size()
        self.first, self.last = gpt.pre_process, gpt.post_process
        self.layers = list(gpt.decoder.layers)
        self.head_dim = cfg.kv_channels
        self.groups = (cfg.num_query_groups or cfg.num_attention_heads) // self.tp
        self.heads_per_group = cfg.num_attention_heads // (cfg.num_query_groups or cfg.num_attention_heads)
        self.gated_mlp = cfg.gated_linear_unit
        self.activation = cfg.activation_func
        params = next(gpt.parameters())
        self.dtype, self.device = params.dtype, params.device
        shape = (batch_size, self.groups, max_length, self.head_dim)
        self.keys = [torch.empty(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self.values = [torch.empty(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self.rope = None
        if gpt.position_embedding_type == "rope":
            # Megatron's own table (theta, Llama-3 scaling): [max_length, 1, 1, head_dim] angles
            angles = gpt.rotary_pos_emb(max_length).reshape(max_length, -1).float().to(self.device)
            self.rope = (angles.cos().to(self.dtype), angles.sin().to(self.dtype))

    def hidden_shape(self, batch: int, columns: int) -> tuple[int, int, int]:
        return batch, columns, self.gpt.config.hidden_size

    def reorder_rows(self, order: torch.Tensor) -> bool:
        """Cache row i <- cache row order[i] (one copy per layer): lets a pass compute a prefix of rows."""
        self.keys = [keys.index_select(0, order) for keys in self.keys]
        self.values = [values.index_select(0, order) for values in self.values]
        return True

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, received: torch.Tensor | None, offset: int, *,
                 all_columns: bool = False, rows: torch.Tensor | None = None,
                 starts: torch.Tensor | None = None, first_column: int = 0) -> torch.Tensor:
        """`all_columns`: the last stage returns this TP rank's logit shard of every column [b, s, V_padded/TP]
        (no gather) instead of the gathered last column; with `first_column` (an absolute position, not in a
        ragged pass) only of the columns from there on: the output layer skips the others (the prompt's, whose
        logits nobody reads). `rows` [b]: the cache rows the b token rows
        use (default the first b). `starts` [b] (with all_columns): row r computes only its columns from
        starts[r] on (a ragged pass: `ragged_columns`); the cache keeps its entries below, the hidden states
        sent to the next stage are zero there, and the last stage returns the logits of the computed
        positions only, packed [n, V_padded/TP] in the order of `ragged_columns(...).nonzero()`."""
        b, s = tokens.shape
        if starts is not None and not all_columns:
            raise ValueError("LeanStage: a ragged pass (starts) returns every computed column: all_columns=True")
        x = self._embed(tokens, offset) if self.first else received
        ragged = None
        if starts is None:
            rope = None if self.rope is None else tuple(table[offset:offset + s].unsqueeze(1) for table in self.rope)
        else:  # position-wise work on the computed positions only, packed; attention on the padded rows
            computed = ragged_columns(starts, offset, s)
            row_index, column = computed.nonzero(as_tuple=True)
            positions = column + offset
            ragged = (computed, row_index if rows is None else rows[row_index], positions)
            x = x[computed]
            rope = None if self.rope is None else tuple(table[positions].unsqueeze(1) for table in self.rope)
        mask = None
        if s > 1:  # causal over [cached + new] keys; one new column attends to everything cached
            query_pos = torch.arange(offset, offset + s, device=x.device).unsqueeze(-1)
            mask = torch.arange(offset + s, device=x.device).unsqueeze(0) <= query_pos
            mask = mask.repeat(self.heads_per_group, 1)  # rows ordered (head in group, position)
        pass_ = _Pass(b, s, offset, rope, mask, rows, ragged)
        for index, layer in enumerate(self.layers):
            x = self._layer(index, layer, x, pass_)
        if not self.last:
            return x if ragged is None else x.new_zeros(b, s, x.shape[-1]).index_put_((ragged[0],), x)
        if all_columns and ragged is None:
            x = x[:, max(first_column - offset, 0):]
        hidden = self.gpt.decoder.final_layernorm(x if all_columns else x[:, -1])
        tied = self.gpt.share_embeddings_and_output_weights
        weight = self.gpt.shared_embedding_or_output_weight() if tied else self.gpt.output_layer.weight
        if all_columns:
            return F.linear(hidden, weight)
        return all_gather_last(_decode_logits(hidden, weight), self.tp_group)

    def _embed(self, tokens: torch.Tensor, offset: int) -> torch.Tensor:
        embedding = self.gpt.embedding
        table = embedding.word_embeddings
        if self.tp == 1:
            x = F.embedding(tokens, table.weight)
        else:  # vocab-parallel lookup: ids outside this shard contribute zeros, summed over TP
            outside = (tokens < table.vocab_start_index) | (tokens >= table.vocab_end_index)
            local_ids = (tokens - table.vocab_start_index).masked_fill(outside, 0)
            x = all_reduce(F.embedding(local_ids, table.weight).masked_fill(outside.unsqueeze(-1), 0), self.tp_group)
        if embedding.add_position_embedding:
            x = x + embedding.position_embeddings.weight[offset:offset + tokens.shape[1]]
        return x

    def _layer(self, index: int, layer, x: torch.Tensor, pass_: _Pass) -> torch.Tensor:
        """x: [b, s, h], or [n, h] (the computed positions) in a ragged pass."""
        b, s, offset, rope, ragged = pass_.batch, pass_.columns, pass_.offset, pass_.rope, pass_.ragged
        attention, mlp = layer.self_attention, layer.mlp
        qkv = F.linear(layer.input_layernorm(x), attention.linear_qkv.weight, attention.linear_qkv.bias)
        # Megatron's fused layout per query group: [q_1 .. q_{heads/groups}, k, v], each head_dim wide
        lead = x.shape[:-1]
        qkv = qkv.view(*lead, self.groups, self.heads_per_group + 2, self.head_dim)
        query_key, value = qkv[..., :-1, :], qkv[..., -1, :]
        if rope is not None:  # a group's queries and key are adjacent: one rotation for both
            cos, sin = rope  # Megatron's non-interleaved RoPE layout
            heads = query_key.reshape(*lead, -1, self.head_dim)
            first, second = heads.chunk(2, dim=-1)
            query_key = (heads * cos + torch.cat((-second, first), dim=-1) * sin).view_as(query_key)
        query, key = query_key[..., :-1, :], query_key[..., -1, :]
        # the first b cache rows (views), or scattered ones (a rescoring pass: the prefix is gathered)
        cache_rows = slice(0, b) if pass_.rows is None else pass_.rows
        keys, values = self.keys[index], self.values[index]
        if ragged is None:
            keys[cache_rows, :, offset:offset + s] = key.transpose(1, 2)
            values[cache_rows, :, offset:offset + s] = value.transpose(1, 2)
        else:  # only the computed positions: the cache below a row's start stays as it was
            computed, cache_row, position = ragged
            keys[cache_row, :, position] = key
            values[cache_row, :, position] = value
            query = query.new_zeros(b, s, *query.shape[1:]).index_put_((computed,), query)
        keys, values = keys[cache_rows, :, :offset + s], values[cache_rows, :, :offset + s]
        # [b, s, g, hpg, d] -> [b, g, hpg * s, d]: a group's heads share its keys without copies
        query = query.permute(0, 2, 3, 1, 4).reshape(b, self.groups, self.heads_per_group * s, self.head_dim)
        context = F.scaled_dot_product_attention(
            query, keys, values, attn_mask=pass_.mask,
            scale=attention.core_attention.softmax_scale)
        context = context.view(b, self.groups, self.heads_per_group, s, self.head_dim)
        context = context.permute(0, 3, 1, 2, 4).reshape(b, s, -1)
        if ragged is not None:
            context = context[ragged[0]]
        x = x + self._row_parallel(attention.linear_proj, context)
        hidden = F.linear(layer.pre_mlp_layernorm(x), mlp.linear_fc1.weight, mlp.linear_fc1.bias)
        if self.gated_mlp:
            gate, up = hidden.chunk(2, dim=-1)
            hidden = self.activation(gate) * up
        else:
            hidden = self.activation(hidden)
        return x + self._row_parallel(mlp.linear_fc2, hidden)

    def _row_parallel(self, linear, x: torch.Tensor) -> torch.Tensor:
        out = all_reduce(F.linear(x, linear.weight), self.tp_group)
        return out if linear.bias is None else out + linear.bias
