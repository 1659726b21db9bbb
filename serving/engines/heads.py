"""Classification on the hf engine: many classifiers, each its own head, in one pass.

A classifier is a LoRA adapter (routed per row like any other, serving/engines/lora_slots.py)
plus a head (labels x hidden) applied to the base model's final hidden state at the
prompt's last token, as transformers' sequence-classification models do. A batch of texts
for different classifiers (and adapters) runs as one right-padded prefill through the free
KV rows; each row's hidden state then meets its own head. Logits are fp32.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Sequence

import torch

from serving.engines.lora_slots import AdapterSlots
from serving.engines.row_model import RowModel
from serving.engines.seam import ClassifyRequest, ClassifyResult, OnClassified
from serving.errors import NotServable, Overloaded

logger = logging.getLogger(__name__)
Head = tuple[torch.Tensor, torch.Tensor | None]  # W (labels, hidden), bias (labels,)
Queued = tuple[ClassifyRequest, OnClassified]
Taken = tuple[ClassifyRequest, OnClassified, int, Head]  # with its adapter slot and head


class Classifications:
    """The hf engine's queued classifications and its resident classifiers' heads; every
    method runs under the engine's lock."""

    def __init__(self, max_queue: int) -> None:
        self.max_queue = max_queue
        self.queue: deque[Queued] = deque()
        self.heads: dict[str, Head] = {}  # resident key -> head
        self.largest_pass = 0  # most texts classified in one pass so far (tests, metrics)

    def add(self, request: ClassifyRequest, on_done: OnClassified, unloading: set[str]) -> None:
        if request.adapter not in self.heads or request.adapter in unloading:
            raise NotServable(f"{request.adapter} is not a classifier loaded in this engine")
        if len(self.queue) >= self.max_queue:
            raise Overloaded(f"engine queue is full ({self.max_queue} waiting); retry shortly")
        self.queue.append((request, on_done))

    def take(self, room: int, resident: dict[str, int]) -> list[Taken]:
        """Up to `room` queued classifications, each with its adapter's slot and head."""
        taken = [self.queue.popleft() for _ in range(min(len(self.queue), room))]
        self.largest_pass = max(self.largest_pass, len(taken))
        return [(r, f, resident[r.adapter], self.heads[r.adapter]) for r, f in taken]

    def loaded(self, key: str, head: Head | None) -> None:
        if head is not None:
            self.heads[key] = head

    def forget(self, keys: Sequence[str]) -> None:
        for key in keys:
            self.heads.pop(key, None)


def classify_rows(
    model: RowModel, slots: AdapterSlots, first: int, items: Sequence[Taken]
) -> list[ClassifyResult]:
    """Each item's logits, the texts prefilled together through rows first.. of the buffers."""
    lengths = torch.tensor([len(r.prompt_ids) for r, _, _, _ in items])
    ids = torch.zeros((len(items), int(lengths.max())), dtype=torch.long)
    for i, (request, _, _, _) in enumerate(items):
        ids[i, : len(request.prompt_ids)] = torch.tensor(request.prompt_ids)
    slots.set_rows([slot for _, _, slot, _ in items], model.dtype)
    hidden = model.hidden(ids, first, lengths).float()
    out: list[ClassifyResult] = []
    for row, (_, _, _, (weight, bias)) in enumerate(items):
        logits = hidden[row] @ weight.float().t()
        if bias is not None:
            logits = logits + bias.float()
        out.append(ClassifyResult(tuple(logits.tolist())))
    return out


def run_classifications(
    items: Sequence[Taken],
    model: RowModel,
    slots: AdapterSlots,
    first: int,
    let_go: Callable[[str], None],
) -> None:
    """One pass for queued classifications (on the engine thread), each answered through
    its callback; a prompt that does not fit the KV rows, or a failing pass, fails only its
    requests. `let_go(key)` runs before each answer (the adapter may be unloaded then)."""
    max_len = model.cache.max_len
    fits = [item for item in items if 0 < len(item[0].prompt_ids) < max_len]
    try:
        results = classify_rows(model, slots, first, fits) if fits else []
    except (RuntimeError, ValueError, IndexError) as err:
        logger.exception("classification pass failed")
        results = [ClassifyResult(error=f"engine error: {err}")] * len(fits)
    answers = dict(zip((id(item[0]) for item in fits), results, strict=True))
    for request, on_done, _, _ in items:
        tokens = len(request.prompt_ids)
        too_long = f"prompt has {tokens} tokens; this engine takes 1 to {max_len - 1}"
        result = answers.get(id(request), ClassifyResult(error=too_long))
        let_go(request.adapter)
        try:
            on_done(result)
        except Exception:
            logger.exception("classification callback of %s failed", request.request_id)


def refuse(items: Sequence[Taken], error: str) -> None:
    """Answer classifications with `error` (the engine is shutting down)."""
    for _, on_done, _, _ in items:
        on_done(ClassifyResult(error=error))
