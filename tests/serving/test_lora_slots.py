"""Routed LoRA layers: a batch mixing adapters and the base gives, row by row, the logits
PEFT gives for each adapter alone (fp32), for different ranks, targets and scalings."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from serving.engines.lora_slots import AdapterSlots, read_adapter
from serving.errors import NotServable


@pytest.fixture(scope="module")
def adapters(tiny_base: Path, adapter_factory: Callable[..., Path]) -> list[Path]:
    return [
        adapter_factory(tiny_base, rank=4, seed=1, targets=("q_proj", "v_proj")),
        adapter_factory(
            tiny_base, rank=8, seed=2, targets=("q_proj", "k_proj", "o_proj", "down_proj")
        ),
        adapter_factory(tiny_base, rank=2, seed=3, targets=("gate_proj", "up_proj")),
    ]


def peft_logits(base: Path, adapter: Path | None, ids: torch.Tensor) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(str(base))
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_mixed_batch_equals_peft_per_adapter(tiny_base: Path, adapters: list[Path]) -> None:
    ids = torch.randint(10, 500, (5, 12), generator=torch.Generator().manual_seed(0))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_base)).eval()
    slots = AdapterSlots(model, slots=4, max_rank=8)
    # Slots in another order than the list, and one slot left empty.
    for slot, adapter in zip((2, 0, 3), adapters, strict=True):
        slots.load(slot, read_adapter(adapter))
    rows: list[int | None] = [2, None, 0, 3, 2]
    expected = [
        peft_logits(tiny_base, None if s is None else adapters[(2, 0, 3).index(s)], ids[i : i + 1])[
            0
        ]
        for i, s in enumerate(rows)
    ]
    slots.set_rows(rows, torch.float32)
    with torch.no_grad():
        got = model(input_ids=ids).logits
    for row in range(len(rows)):
        torch.testing.assert_close(got[row], expected[row], atol=2e-5, rtol=1e-4)
    # The adapters change the output: routing is not a no-op.
    assert not torch.allclose(got[0], got[1], atol=1e-3)


def test_clearing_a_slot_restores_the_base(tiny_base: Path, adapters: list[Path]) -> None:
    ids = torch.randint(10, 500, (1, 8), generator=torch.Generator().manual_seed(1))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_base)).eval()
    slots = AdapterSlots(model, slots=2, max_rank=8)
    slots.load(1, read_adapter(adapters[1]))
    slots.clear(1)
    slots.set_rows([1], torch.float32)
    with torch.no_grad():
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, peft_logits(tiny_base, None, ids))


def test_rslora_and_alpha_pattern_scaling(
    tiny_base: Path, adapters: list[Path], copy_adapter: Callable[[Path], Path]
) -> None:
    adapter = copy_adapter(adapters[0])
    config = json.loads((adapter / "adapter_config.json").read_text())
    config.update(use_rslora=True, alpha_pattern={"v_proj": 3.0})
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    ids = torch.randint(10, 500, (1, 8), generator=torch.Generator().manual_seed(2))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_base)).eval()
    slots = AdapterSlots(model, slots=1, max_rank=8)
    slots.load(0, read_adapter(adapter))
    slots.set_rows([0], torch.float32)
    with torch.no_grad():
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, peft_logits(tiny_base, adapter, ids), atol=2e-5, rtol=1e-4)


def test_unservable_adapters_are_refused(
    tiny_base: Path, adapters: list[Path], copy_adapter: Callable[[Path], Path]
) -> None:
    adapter = copy_adapter(adapters[0])
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(NotServable, match="DoRA"):
        read_adapter(adapter)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_base))
    with pytest.raises(
        NotServable, match="max rank 4 of this engine; start the server with --max-rank 8"
    ):
        AdapterSlots(model, slots=1, max_rank=4).load(0, read_adapter(adapters[1]))


def test_gathered_and_fused_matrices_follow_the_slots_in_use_and_their_contents(
    tiny_base: Path, adapters: list[Path]
) -> None:
    """Every slot in use (A_all in the base matmul) and some (gathered rows, kept while the
    slots in use stay the same): other slots, or new weights in a slot, are picked up at the
    next pass."""
    ids = torch.randint(10, 500, (3, 8), generator=torch.Generator().manual_seed(3))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_base)).eval()
    slots = AdapterSlots(model, slots=3, max_rank=8)
    slots.load(0, read_adapter(adapters[0]))
    slots.load(1, read_adapter(adapters[1]))

    def run(rows: list[int | None]) -> torch.Tensor:
        slots.set_rows(rows, torch.float32)
        with torch.no_grad():
            return model(input_ids=ids).logits

    want: dict[int | None, torch.Tensor] = {
        i: peft_logits(tiny_base, a, ids) for i, a in enumerate(adapters)
    }
    want[None] = peft_logits(tiny_base, None, ids)

    def check(rows: list[int | None], contents: dict[int, int]) -> None:
        got = run(rows)
        for row, slot in enumerate(rows):
            expected = want[None if slot is None or slot not in contents else contents[slot]]
            torch.testing.assert_close(got[row], expected[row], atol=2e-5, rtol=1e-4)

    for rows in ([0, 1, None], [0, 1, None], [1, None, 1], [0, 1, 2], [0, 0, 0]):
        check(rows, {0: 0, 1: 1})  # slot 2 empty: the base
    slots.load(2, read_adapter(adapters[2]))  # every slot in use: the fused matmul
    check([2, 0, 1], {0: 0, 1: 1, 2: 2})
    check([0, 0, None], {0: 0})
    slots.load(0, read_adapter(adapters[2]))  # same slots in use as before, new weights
    check([0, 0, None], {0: 2})
    check([0, 1, 2], {0: 2, 1: 1, 2: 2})
    # A_all lies under the base weight: the base layer's weight is a view of `fused`.
    layer = slots.layers["model.layers.0.self_attn.q_proj"]
    assert layer.base.weight.data_ptr() == layer.fused.data_ptr()
