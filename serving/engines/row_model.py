"""A transformers causal LM run over the hf engine's per-row KV, through transformers' seams.

The model's own modules compute everything that differs between families (embedding scale,
norms, q/k norms, rotary variants and NoPE layers, fused projections, mixtures of experts,
residual and logit multipliers, logit soft-capping); the engine only changes where K/V live
and how attention reads them:

- `RowCache`, a `transformers.Cache`: K/V of each layer in one preallocated buffer
  (max_batch, kv_heads, max_len, head_dim). Active requests occupy rows 0..n-1 (the engine
  moves the last row into a finished one), so a decode step reads plain views `[:n, :, :L]`,
  never a gather. A prefill writes new rows after the running ones.
- `row_attention`, registered with `AttentionInterface` as "lorafleet_rows": each row
  attends over its own positions. Masks come from the step (`Step`), built once per forward
  pass and per sliding window, not from transformers' mask functions (which return nothing
  for an attention implementation they do not know). Prefill: SDPA over the right-padded
  prompts. Decode: `grouped_attention`, two batched matmuls (7x faster than SDPA's CPU path
  for a masked one-token query in bf16). A layer's sliding window (the module passes it) and
  attention soft-capping are applied as transformers' eager path does.
- The head: a forward hook on the base model keeps only the hidden states the engine needs
  (each row's last real position; every prompt position of rows asking prompt
  log-probabilities), so the model's own head, multipliers and soft-capping run on those
  alone: a vocabulary-wide matmul over whole prompts is the cost it avoids.

A warm-up pass at load checks that every layer went through the cache and the attention
function; a model that does not is refused (NotServable) instead of served wrongly.
`compiled` (serve --compile) runs decode steps through torch.compile, and `prefill_groups`
splits a prefill into passes of like lengths (docs/architecture.md on both).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch._dynamo import config as dynamo_config
from torch.fx.experimental import _config as shape_config
from transformers import AttentionInterface
from transformers.cache_utils import Cache

from registry.hardware import usable_cores
from serving.errors import NotServable

ATTENTION = "lorafleet_rows"
# Attention arguments whose meaning row_attention does not implement (attention sinks).
UNSERVED_ARGUMENTS = ("s_aux", "sinks")


@dataclass
class Step:
    """The rows of one forward pass. Prefill: rows first.. of the buffers, right-padded
    prompts of `lengths`. Decode: rows 0..n-1, one token each at position `at[i]`."""

    first: int
    lengths: torch.Tensor | None  # prefill: prompt lengths (batch,)
    at: torch.Tensor | None  # decode: each row's position (batch,)
    steps: int  # query positions per row
    layers_seen: set[int] = field(default_factory=set)
    span: int = 0  # decode: key positions attended over (the furthest row's)
    _masks: dict[int | None, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.at is not None:
            self.span = int(self.at.max()) + 1

    @property
    def prefill(self) -> bool:
        return self.lengths is not None

    def mask(self, window: int | None) -> torch.Tensor:
        """Boolean (batch, 1, queries, keys): causal within each row's own positions, the
        padding never attended, and keys within `window` of the query where given
        (transformers' sliding window: key > query - window)."""
        if window not in self._masks:
            if self.lengths is not None:
                q = torch.arange(self.steps)[:, None]
                k = torch.arange(self.steps)[None, :]
                allowed = (k <= q)[None] & (k[None] < self.lengths[:, None, None])
                if window is not None:
                    allowed = allowed & (k > q - window)[None]
                self._masks[window] = allowed[:, None]
            else:
                assert self.at is not None
                k = torch.arange(self.span)[None, :]
                at = self.at[:, None]
                allowed = k <= at
                if window is not None:
                    allowed = allowed & (k > at - window)
                self._masks[window] = allowed[:, None, None, :]
        return self._masks[window]


class RowCache(Cache):
    """Per-layer K/V buffers (max_batch, kv_heads, max_len, head_dim), allocated at the
    first update of each layer (the warm-up pass), written and read as `step` says."""

    def __init__(self, max_batch: int, max_len: int) -> None:
        super().__init__(layers=[])
        self.max_batch, self.max_len = max_batch, max_len
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.step: Step | None = None

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        step = self.step
        assert step is not None, "the engine sets the step before a forward pass"
        if layer_idx not in self.keys:
            _, kv_heads, _, dim = key_states.shape
            shape = (self.max_batch, kv_heads, self.max_len, dim)
            self.keys[layer_idx] = key_states.new_zeros(shape)
            self.values[layer_idx] = value_states.new_zeros(shape)
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        batch = key_states.shape[0]
        if step.prefill:
            rows = slice(step.first, step.first + batch)
            keys[rows, :, : step.steps] = key_states
            values[rows, :, : step.steps] = value_states
            return key_states, value_states  # a new prompt attends to itself only
        assert step.at is not None
        index = torch.arange(batch)
        keys[index, :, step.at] = key_states[:, :, 0]
        values[index, :, step.at] = value_states[:, :, 0]
        span = step.span
        return keys[:batch, :, :span], values[:batch, :, :span]

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy row `src`'s first `length` positions into row `dst`, every layer."""
        for buffers in (self.keys, self.values):
            for buffer in buffers.values():
                buffer[dst, :, :length] = buffer[src, :, :length]


def grouped_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    scale: float,
    softcap: float | None = None,
) -> torch.Tensor:
    """Grouped-query attention as two batched matmuls, softmax in fp32: q (batch, heads,
    queries, dim); keys/values (batch, kv_heads, span, dim); mask (batch, 1, queries, span).
    Returns (batch, heads, queries, dim)."""
    batch, heads, queries, dim = q.shape
    kv_heads = keys.shape[1]
    group = heads // kv_heads
    grouped = q.reshape(batch, kv_heads, group * queries, dim)  # head-major, then query
    scores = torch.matmul(grouped, keys.transpose(-1, -2)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    allowed = mask.repeat(1, 1, group, 1) if group > 1 and queries > 1 else mask
    scores = scores.float().masked_fill(~allowed, float("-inf"))
    weights = torch.softmax(scores, dim=-1).to(values.dtype)
    return torch.matmul(weights, values).view(batch, heads, queries, dim)


def row_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    lorafleet_step: Step | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The attention function of "lorafleet_rows" (see the module docstring); returns
    (batch, queries, heads, dim) as transformers' attention functions do."""
    step = lorafleet_step
    if step is None:
        raise NotServable(
            f"{type(module).__name__} does not pass the engine's attention arguments through"
        )
    unserved = [name for name in UNSERVED_ARGUMENTS if kwargs.get(name) is not None]
    if unserved:
        raise NotServable(f"{type(module).__name__} uses {', '.join(unserved)} in attention")
    step.layers_seen.add(int(getattr(module, "layer_idx", -1)))
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    mask = step.mask(sliding_window)
    if step.prefill and softcap is None:
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, scale=scale, enable_gqa=True
        )
    else:
        out = grouped_attention(query, key, value, mask, scale, softcap)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION, row_attention)


def prefill_groups(lengths: list[int], pass_cost: int = 24) -> list[list[int]]:
    """Indices of `lengths` split into groups of like lengths, each prefilled in one
    right-padded pass: the split minimises the padded tokens plus `pass_cost` tokens per
    pass (what a pass costs besides its tokens: ~12 ms, ~0.45 ms a token, small base,
    bf16, 2 cores). 32 prompts of 26-43 tokens: 4 passes, 0.60 s, against 0.76 s in one
    pass over 1376 padded tokens."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    sorted_lengths = [lengths[i] for i in order]
    cost = [0] + [0] * len(order)  # cost[j]: best split of the j shortest
    cut = [0] * (len(order) + 1)
    for j in range(1, len(order) + 1):
        # a group i..j-1 pads to its longest, the j-th shortest
        cost[j], cut[j] = min(
            (cost[i] + (j - i) * sorted_lengths[j - 1] + pass_cost, i) for i in range(j)
        )
    groups, j = [], len(order)
    while j > 0:
        groups.append(order[cut[j] : j])
        j = cut[j]
    return groups[::-1]


class RowModel:
    """One causal LM over a RowCache; `forward` is one prefill or one decode step."""

    def __init__(self, model: Any, max_batch: int, max_len: int, compiled: bool = False) -> None:
        model.set_attn_implementation(ATTENTION)
        self.model = model
        # The decode step through inductor, shapes dynamic: one graph per routing kind of
        # the adapter layers (lora_slots.py) and torch thread count, which dynamo guards on.
        # Prefills stay eager (their widths vary, and a request has only one).
        self._decode = model
        if compiled:
            limit = 3 * usable_cores() + 2  # kinds x thread counts, and a margin
            dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, limit)
            # Sizes that happen to be equal (batch 8 and a mask of 8 columns) stay apart:
            # with duck shapes their equality is guarded, and a batch size would recompile.
            shape_config.use_duck_shape = False
            self._decode = torch.compile(model, dynamic=True)
        self.cache = RowCache(max_batch, max_len)
        self._keep: torch.Tensor | None = None  # (positions, 2): row, position
        self._last_step: Step | None = None  # the warm-up reads which layers it reached
        model.base_model.register_forward_hook(self._keep_hidden)
        self._warm_up()
        if compiled and max_batch > 1:  # compile the base model's step now, not at a request
            two = torch.ones((2, 1), dtype=torch.long)
            self.forward(two, torch.tensor([[1], [2]]), None)

    def _keep_hidden(self, _module: Any, _args: Any, output: Any) -> Any:
        """The base model's output, cut down to the positions the head must score."""
        if self._keep is not None:
            hidden = output.last_hidden_state
            output.last_hidden_state = hidden[self._keep[:, 0], self._keep[:, 1]][None]
        return output

    def _warm_up(self) -> None:
        """One token through row 0: allocates the buffers and checks every layer used them."""
        logits, _ = self.forward(
            torch.zeros((1, 1), dtype=torch.long),
            torch.zeros((1, 1), dtype=torch.long),
            (0, torch.ones(1, dtype=torch.long)),
        )
        layers = int(self.model.config.num_hidden_layers)
        step = self._last_step
        assert step is not None
        if len(self.cache.keys) != layers or len(step.layers_seen) != layers:
            raise NotServable(
                f"{self.model.config.model_type} model: {len(step.layers_seen)} of {layers} "
                "layers ran the engine's attention; the hf engine cannot serve it"
            )
        if logits.shape != (1, self.vocab_size):
            raise NotServable(f"unexpected logits shape {tuple(logits.shape)} from the model")

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype  # type: ignore[no-any-return]

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_output_embeddings().out_features)

    def hidden(self, ids: torch.Tensor, first: int, lengths: torch.Tensor) -> torch.Tensor:
        """The base model's final hidden states (batch, hidden) at each row's last real
        position: right-padded prompts prefilled into rows first.. (which stay free: the
        K/V written there is overwritten by the next prefill)."""
        batch, steps = ids.shape
        step = Step(first, lengths, None, steps)
        keep = torch.stack([torch.arange(batch), lengths - 1], 1)
        self.cache.step, self._keep = step, keep
        try:
            out = self.model.base_model(
                input_ids=ids,
                position_ids=torch.arange(steps).expand(batch, steps),
                past_key_values=self.cache,
                use_cache=True,
                lorafleet_step=step,
            )
        finally:
            self.cache.step, self._keep = None, None
        return out.last_hidden_state[0]  # type: ignore[no-any-return]

    def forward(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        prefill: tuple[int, torch.Tensor] | None,
        full_rows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (batch, vocab), fp32, of each row's last real position, writing the new K/V.

        Prefill (first row, prompt lengths): right-padded prompts for rows first.., each
        attending within itself. Decode: rows 0..n-1, one token each at its own position.
        `full_rows` (prefill only; indices into this batch) also returns the logits of every
        real prompt position of those rows, packed row after row (tokens, vocab)."""
        batch, steps = ids.shape
        run = self.model if prefill is not None else self._decode
        if prefill is None:
            step = Step(0, None, positions[:, 0], 1)
            last = torch.stack([torch.arange(batch), torch.zeros(batch, dtype=torch.long)], 1)
        else:
            first, lengths = prefill
            step = Step(first, lengths, None, steps)
            last = torch.stack([torch.arange(batch), lengths - 1], 1)
        keep = last
        if full_rows is not None:
            assert prefill is not None, "full-prompt logits come from a prefill"
            real = torch.arange(steps)[None, :] < prefill[1][full_rows, None]
            rows = full_rows[:, None].expand(-1, steps)[real]
            cols = torch.arange(steps)[None, :].expand(len(full_rows), -1)[real]
            keep = torch.cat([last, torch.stack([rows, cols], 1)])
        self.cache.step, self._keep, self._last_step = step, keep, step
        try:
            out = run(
                input_ids=ids,
                position_ids=positions,
                past_key_values=self.cache,
                use_cache=True,
                logits_to_keep=0,
                lorafleet_step=step,
            )
        finally:
            self.cache.step, self._keep = None, None
        logits = out.logits[0].float()  # (kept positions, vocab)
        full = logits[batch:] if full_rows is not None else None
        return logits[:batch], full
