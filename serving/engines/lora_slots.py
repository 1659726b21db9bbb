"""Per-row adapter routing inside the model: the hf engine's LoRA layers.

PEFT's mixed-adapter batches (`adapter_names=`) rebuild index lists in every layer at every
step; at decode shapes that Python and operator dispatch cost more than the LoRA arithmetic
(docs/architecture.md, "Per-row LoRA routing": +27 ms per step over a 31 ms base step).
Here every adapted linear layer keeps the matrices of all resident adapters stacked,
pre-scaled, in fixed slots:

    y = base(x) + ((x @ A_all.T) * mask) @ B_all

with A_all (slots * R, in) and B_all (slots * R, out), R the engine's max rank (smaller
ranks are zero-padded), and `mask` (batch, 1, k * R) selecting each row's slot (all zeros:
the base model). The engine sets the routing once per forward pass for all layers, so a
batch mixes adapters and the base at the cost of two matmuls per adapted layer. When a batch
uses only k of the slots, each layer gathers those k slots' rows of A_all and B_all
(`index_select`, contiguous rows), so the cost follows the adapters in the batch, not the
slot count (a server with 100 slots decoding 8 adapters pays for 8). The gathered rows are
kept until the slots in use or a slot's weights change, so a steady decode gathers nothing.
When a batch uses every slot, A_all rides in the base layer's own matmul (it is stored
under the base weight, `RoutedLoRALinear.fused`): the LoRA costs the mask and one addmm per
layer. Outputs equal PEFT's per-adapter `generate`; the throughput against base only is
in docs/performance.md.

Only plain LoRA on linear layers is routed: DoRA, modules_to_save, embedding targets and
LoRA bias are refused with NotServable. A classifier (peft task_type SEQ_CLS) may also
carry its head (`score` / `classifier`), which the engine applies itself.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from serving.errors import NotServable

PEFT_PREFIX = "base_model.model."
LORA_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<part>A|B)(?:\.[A-Za-z0-9_-]+)?\.weight")
HEAD_KEY = re.compile(r"(?P<module>score|classifier)\.(?P<part>weight|bias)")
HEAD_MODULES = {"score", "classifier"}
UNROUTED_FEATURES = {
    "use_dora": "DoRA",
    "modules_to_save": "modules_to_save",
}


class Routes:
    """The routing shared by every routed layer; set by the engine before each forward."""

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None  # (batch, 1, k * R) or None: base only
        # Changes when any slot's weights change: the gathered matrices each layer keeps
        # are then stale and `AdapterSlots.set_rows` gathers them again.
        self.version = 0


class RoutedLoRALinear(nn.Module):
    """A base linear layer plus the stacked LoRA matrices of every slot.

    A_all sits under the base weight in one matrix, `fused` (out + slots * R, in): the base
    layer's weight is a view of its first `out` rows, so nothing is stored twice. When a
    batch uses every slot, one matmul with `fused` gives the base output and x @ A_all.T
    side by side (a bf16 (32 x 1024) @ (1024 x 1088) costs what the base's (1024 x 1024)
    alone does, where a separate x @ A_all.T costs a quarter of it again, measured)."""

    fused: torch.Tensor  # (out + slots * R, in): the base weight, then A_all
    lora_b: torch.Tensor  # (slots * R, out), B pre-multiplied by its scale

    def __init__(self, base: nn.Linear, routes: Routes, slots: int, max_rank: int) -> None:
        super().__init__()
        self.base = base
        self.routes = routes
        self.max_rank = max_rank
        weight, out = base.weight, base.out_features
        with torch.no_grad():
            fused = weight.new_zeros(out + slots * max_rank, base.in_features)
            fused[:out] = weight
        # Buffers, not parameters: never trained, moved and cast with the model.
        self.register_buffer("fused", fused, persistent=False)
        base.weight = nn.Parameter(fused[:out], requires_grad=False)
        self.register_buffer("lora_b", weight.new_zeros(slots * max_rank, out))
        self.fused_bias: torch.Tensor | None = None
        if base.bias is not None:
            self.fused_bias = torch.cat([base.bias.detach(), base.bias.new_zeros(slots * max_rank)])
        # A and B rows of the slots in use (set by `gather`); None: every slot is in use.
        self.gathered: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def lora_a(self) -> torch.Tensor:
        """A_all (slots * R, in): the rows of `fused` under the base weight."""
        return self.fused[self.base.out_features :]

    def gather(self, rows: torch.Tensor | None) -> None:
        """Keep the A and B rows `rows` (those of the slots in use); None: all of them."""
        if rows is None:
            self.gathered = None
        else:
            self.gathered = (self.lora_a.index_select(0, rows), self.lora_b.index_select(0, rows))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Reads tensors and None-ness only (no counters, no caches filled here), so a
        # compiled decode step (serving/engines/row_model.py) keeps one graph per routing kind.
        mask = self.routes.mask
        if mask is None:
            return self.base(x)  # type: ignore[no-any-return]
        n = self.base.out_features
        if self.gathered is None:  # every slot: base and x @ A_all.T in one matmul
            both = F.linear(x, self.fused, self.fused_bias)
            out, h, b = both[..., :n], both[..., n:], self.lora_b
        else:  # some slots: their rows of A_all and B_all only
            out = self.base(x)
            a, b = self.gathered
            h = torch.matmul(x, a.t())
        # h (batch, seq, k*R): mask keeps each row's slot. A compiled step adds h @ B out of
        # place (faster there, loadtests/NOTES.md); eager adds it in place (inference
        # only: nothing here keeps a graph). Both h and out are views of 2-D products
        # whose first two dimensions merge, so `view` never copies.
        if torch.compiler.is_compiling():
            return out + torch.matmul(h * mask, b)
        h.mul_(mask)
        out.view(-1, n).addmm_(h.view(-1, h.shape[-1]), b)
        return out

    def write_slot(
        self, slot: int, a: torch.Tensor | None, b: torch.Tensor | None, scale: float = 1.0
    ) -> None:
        """Store A (r, in) and B * scale (out, r) in `slot`; None clears the slot."""
        rows = slice(slot * self.max_rank, (slot + 1) * self.max_rank)
        self.routes.version += 1  # every gathered copy is stale
        lora_a = self.lora_a
        with torch.no_grad():
            lora_a[rows] = 0
            self.lora_b[rows] = 0
            if a is not None and b is not None:
                r = a.shape[0]
                lora_a[rows.start : rows.start + r] = a.to(lora_a.dtype)
                scaled = b.float().t() * scale
                self.lora_b[rows.start : rows.start + r] = scaled.to(self.lora_b.dtype)


@dataclass(frozen=True)
class AdapterWeights:
    """One adapter read from disk: per module, A (r, in), B (out, r) and B's scale.

    Only file reading happens here; the arithmetic (scaling, casting) runs when the slot is
    written, on the engine's thread (see `serving.engines.hf` on threads)."""

    modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]]
    rank: int
    # A classifier's head: W (labels, hidden) and its bias, if any.
    head: tuple[torch.Tensor, torch.Tensor | None] | None = None


def _scale(config: dict[str, object], module: str, rank: int) -> float:
    alpha = float(config.get("lora_alpha", rank))  # type: ignore[arg-type]
    for key, value in (config.get("alpha_pattern") or {}).items():  # type: ignore[attr-defined]
        if key == module or re.match(rf"(.*\.)?({key})$", module):
            alpha = float(value)
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def read_adapter(directory: Path) -> AdapterWeights:
    """Read a PEFT LoRA directory (safetensors only) into per-module A, B and scale."""
    config = json.loads((directory / "adapter_config.json").read_text())
    classifier = str(config.get("task_type") or "").upper() == "SEQ_CLS"
    if classifier:  # its head is saved whole; anything else trained whole is not served
        config = {
            **config,
            "modules_to_save": sorted(set(config.get("modules_to_save") or []) - HEAD_MODULES),
        }
    for key, feature in UNROUTED_FEATURES.items():
        if config.get(key):
            raise NotServable(
                f"adapter {directory} uses {feature}, which the hf engine's routed LoRA layers "
                "do not serve; retrain without it"
            )
    if config.get("bias", "none") != "none":
        raise NotServable(
            f"adapter {directory} trains LoRA bias, which the hf engine does not serve"
        )
    tensors = load_file(directory / "adapter_model.safetensors")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    head: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        name = key.removeprefix(PEFT_PREFIX)
        if classifier and (found := HEAD_KEY.fullmatch(name)) is not None:
            head[found["part"]] = value
            continue
        match = LORA_KEY.fullmatch(name)
        if match is None:
            raise NotServable(f"adapter {directory}: tensor {key!r} is not a LoRA A/B matrix")
        parts.setdefault(match["module"], {})[match["part"]] = value
    modules = {}
    for module, ab in parts.items():
        a, b = ab["A"], ab["B"]
        rank = a.shape[0]
        modules[module] = (a, b, _scale(config, module, rank))
    if classifier and "weight" not in head:
        raise NotServable(f"classifier {directory} has no head (score.weight); save it again")
    return AdapterWeights(
        modules,
        max(a.shape[0] for a, _, _ in modules.values()),
        (head["weight"], head.get("bias")) if classifier else None,
    )


class AdapterSlots:
    """The routed layers of one model and which adapter occupies which slot."""

    def __init__(self, model: nn.Module, slots: int, max_rank: int) -> None:
        self.model = model
        self.slots = slots
        self.max_rank = max_rank
        self.routes = Routes()
        self.layers: dict[str, RoutedLoRALinear] = {}
        self._modules = dict(model.named_modules())
        self._used: list[int] = []
        self._gathered_version = -1  # the routes' version the layers' gathered rows are of
        self._occupied: dict[int, set[str]] = {}  # slot -> modules written

    def _layer(self, module: str) -> RoutedLoRALinear:
        """The routed layer for `module`, wrapping the base linear on first use."""
        if module in self.layers:
            return self.layers[module]
        target = self._modules.get(module)
        if not isinstance(target, nn.Linear):
            raise NotServable(f"module {module!r} is not a linear layer of the base model")
        parent_name, _, child = module.rpartition(".")
        routed = RoutedLoRALinear(target, self.routes, self.slots, self.max_rank)
        setattr(self._modules[parent_name], child, routed)
        self.layers[module] = routed
        return routed

    def load(self, slot: int, weights: AdapterWeights) -> None:
        """Write an adapter into `slot` (clearing what was there)."""
        if not 0 <= slot < self.slots:
            raise ValueError(f"slot {slot} outside 0..{self.slots - 1}")
        if weights.rank > self.max_rank:
            raise NotServable(
                f"adapter rank {weights.rank} > max rank {self.max_rank} of this engine; "
                f"start the server with --max-rank {weights.rank}"
            )
        for module in weights.modules:
            self._layer(module)  # fail before writing anything
        self.clear(slot)
        for module, (a, b, scale) in weights.modules.items():
            self.layers[module].write_slot(slot, a, b, scale)
        self._occupied[slot] = set(weights.modules)

    def clear(self, slot: int) -> None:
        for module in self._occupied.pop(slot, set()):
            self.layers[module].write_slot(slot, None, None)

    def set_rows(self, slots: list[int | None], dtype: torch.dtype) -> None:
        """Route row i of the next forward pass to slots[i] (None: base model)."""
        used = sorted({s for s in slots if s is not None})
        if not used:
            self.routes.mask = None
            return
        r = self.max_rank
        # Other slots than the last pass, or new weights in one: gather the rows again.
        if used != self._used or self._gathered_version != self.routes.version:
            self._used, self._gathered_version = used, self.routes.version
            rows = None
            if len(used) < self.slots:
                starts = torch.tensor(used) * r
                rows = (starts[:, None] + torch.arange(r)).reshape(-1)
            for layer in self.layers.values():
                layer.gather(rows)
        position = {slot: i for i, slot in enumerate(used)}
        at = torch.tensor([-1 if s is None else position[s] for s in slots])
        mask = torch.arange(len(used) * r).div(r, rounding_mode="floor")[None, :] == at[:, None]
        self.routes.mask = mask.to(dtype)[:, None, :]
