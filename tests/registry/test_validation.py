"""The validation corpus: every kind of broken adapter is refused at `register` with its
own one-line message (exit 2), and the registry is left exactly as it was."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from registry import Registry

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def edit_config(adapter: Path, **changes: object) -> None:
    config = json.loads((adapter / CONFIG).read_text())
    config.update(changes)
    (adapter / CONFIG).write_text(json.dumps(config))


def edit_tensors(adapter: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(adapter / WEIGHTS)
    change(tensors)
    save_file(tensors, adapter / WEIGHTS, metadata={"format": "pt"})


def snapshot(home: Path) -> tuple[int, list[str], list[str]]:
    registry = Registry(home)
    try:
        state = (
            registry.revision(),
            sorted(registry.artifacts.digests()),
            registry.artifacts.leftovers(),
        )
    finally:
        registry.close()
    return state


def missing_config(a: Path) -> None:
    (a / CONFIG).unlink()


def unparseable_config(a: Path) -> None:
    (a / CONFIG).write_text('{"peft_type": "LORA", "r": 4,')


def not_lora(a: Path) -> None:
    edit_config(a, peft_type="PREFIX_TUNING")


def weights_missing(a: Path) -> None:
    (a / WEIGHTS).unlink()


def pickle_weights(a: Path) -> None:
    torch.save(load_file(a / WEIGHTS), a / "adapter_model.bin")
    (a / WEIGHTS).unlink()


def corrupt_header(a: Path) -> None:
    data = (a / WEIGHTS).read_bytes()
    (a / WEIGHTS).write_bytes(data[:8] + b"{not json" + data[17:])


def truncated_weights(a: Path) -> None:
    data = (a / WEIGHTS).read_bytes()
    (a / WEIGHTS).write_bytes(data[: len(data) // 2])


def rank_mismatch(a: Path) -> None:
    edit_config(a, r=8)


def base_dimension_mismatch(a: Path) -> None:
    def widen(tensors: dict[str, torch.Tensor]) -> None:
        for key in list(tensors):
            if key.endswith("q_proj.lora_A.weight"):
                tensors[key] = torch.zeros(4, 96)

    edit_tensors(a, widen)


def absent_target_module(a: Path) -> None:
    edit_config(a, target_modules=["qkv_proj"])


def foreign_tensor(a: Path) -> None:
    edit_tensors(a, lambda t: t.update({"base_model.model.extra.weight": torch.zeros(2, 2)}))


def bad_metadata(a: Path) -> None:
    (a / "lorafleet.json").write_text(json.dumps({"seed": "abc", "colour": "blue"}))


def symlink_inside(a: Path) -> None:
    (a / "notes.txt").symlink_to("/etc/passwd")


CORPUS = [
    (missing_config, "has no adapter_config.json"),
    (unparseable_config, "is not valid JSON"),
    (not_lora, "peft_type 'PREFIX_TUNING', not 'LORA'"),
    (weights_missing, "has no adapter_model.safetensors"),
    (pickle_weights, "contains pickle file 'adapter_model.bin'"),
    (corrupt_header, "corrupt safetensors header"),
    (truncated_weights, "outside the"),
    (rank_mismatch, "rank r=8 from adapter_config.json needs"),
    (base_dimension_mismatch, "trained on a base with other dimensions"),
    (absent_target_module, "target module 'qkv_proj' is not in the base"),
    (foreign_tensor, "is neither a LoRA tensor"),
    (bad_metadata, "lorafleet.json does not follow the metadata schema: seed"),
    (symlink_inside, "contains a symlink 'notes.txt'"),
]


@pytest.mark.parametrize(("breakage", "message"), CORPUS, ids=[c[0].__name__ for c in CORPUS])
def test_broken_adapter_is_refused_and_nothing_changes(
    breakage: Callable[[Path], None],
    message: str,
    home: Path,
    tiny_base: Path,
    adapter_factory: Callable[..., Path],
    copy_adapter: Callable[[Path], Path],
    cli: Callable[..., object],
) -> None:
    adapter = copy_adapter(adapter_factory(tiny_base))
    breakage(adapter)
    before = snapshot(home)
    result = cli("registry", "register", "support", str(adapter), home=home)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("lorafleet: error: ")
    assert "Traceback" not in result.stderr
    assert snapshot(home) == before
    assert cli("registry", "list", "--json", home=home).stdout.strip() == "[]"


def test_every_breakage_has_its_own_message() -> None:
    messages = [m for _, m in CORPUS]
    assert len(set(messages)) == len(messages)


def test_other_base_is_refused_naming_both_fingerprints(
    request: pytest.FixtureRequest,
    backend: str,
    home: Path,
    other_base: Path,
    tiny_base: Path,
    adapter_factory: Callable[..., Path],
    cli: Callable[..., object],
) -> None:
    registry = Registry(home)
    ours = registry.base.fingerprint
    registry.close()
    # another registry: another home, and another database where the records are shared
    other_url = request.getfixturevalue("postgres").new_database() if backend != "sqlite" else None
    theirs = Registry.create(home.parent / "other", other_base, url=other_url).base.fingerprint
    assert theirs != ours
    before = snapshot(home)
    result = cli("registry", "register", "support", str(adapter_factory(other_base)), home=home)
    assert result.returncode == 2
    assert f"trained on base {theirs}" in result.stderr
    assert f"bound to base {ours}" in result.stderr
    assert snapshot(home) == before


def test_rank_above_limit(
    home: Path, tiny_base: Path, adapter_factory: Callable[..., Path], cli: Callable[..., object]
) -> None:
    result = cli("registry", "register", "big", str(adapter_factory(tiny_base, rank=32)), home=home)
    assert result.returncode == 2
    assert "has rank 32 > max rank 16 of this registry" in result.stderr
    assert "--max-rank 32" in result.stderr
    # Raising the limit on the same base lets it in.
    assert (
        cli("registry", "init", "--base", str(tiny_base), "--max-rank", "32", home=home).returncode
        == 0
    )
    ok = cli("registry", "register", "big", str(adapter_factory(tiny_base, rank=32)), home=home)
    assert ok.returncode == 0, ok.stderr


@pytest.mark.parametrize("name", ["Bad", "../evil", "a/b", "base", "_x"])
def test_bad_adapter_name(
    name: str,
    home: Path,
    tiny_base: Path,
    adapter_factory: Callable[..., Path],
    cli: Callable[..., object],
) -> None:
    before = snapshot(home)
    result = cli("registry", "register", name, str(adapter_factory(tiny_base)), home=home)
    assert result.returncode == 2
    assert "invalid adapter name" in result.stderr
    assert snapshot(home) == before


def test_duplicate_content_names_the_version(
    home: Path, tiny_base: Path, adapter_factory: Callable[..., Path], cli: Callable[..., object]
) -> None:
    adapter = str(adapter_factory(tiny_base))
    assert cli("registry", "register", "support", adapter, home=home).returncode == 0
    before = snapshot(home)
    result = cli("registry", "register", "support", adapter, home=home)
    assert result.returncode == 2
    assert "adapter 'support' version 1 (active) already has this content" in result.stderr
    assert snapshot(home) == before
    # The same content under another name shares the stored artifact.
    assert cli("registry", "register", "other", adapter, home=home).returncode == 0
    assert len(snapshot(home)[1]) == 1


def test_hub_base_needs_assume_base(
    home: Path,
    tiny_base: Path,
    adapter_factory: Callable[..., Path],
    copy_adapter: Callable[[Path], Path],
    cli: Callable[..., object],
) -> None:
    adapter = copy_adapter(adapter_factory(tiny_base))
    edit_config(adapter, base_model_name_or_path="meta-llama/Llama-3.2-1B")
    refused = cli("registry", "register", "support", str(adapter), home=home)
    assert refused.returncode == 2
    assert "pass --assume-base" in refused.stderr
    ok = cli("registry", "register", "support", str(adapter), "--assume-base", home=home)
    assert ok.returncode == 0, ok.stderr


def test_peft_adapter_registers_with_its_report(
    home: Path, tiny_base: Path, adapter_factory: Callable[..., Path]
) -> None:
    adapter = adapter_factory(tiny_base, rank=8, targets=("q_proj", "k_proj", "v_proj", "o_proj"))
    registry = Registry(home)
    record = registry.register("support", adapter, actor="alice", reason="first")
    assert (record.ref, record.rank, record.alpha) == ("support@1", 8, 16.0)
    assert record.target_modules == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert record.engines == ["hf", "vllm"]
    assert record.metadata["base_fingerprint"] == registry.base.fingerprint
    stored = registry.artifact_path(record)
    assert sorted(p.name for p in stored.iterdir()) == sorted(p.name for p in adapter.iterdir())
    assert (stored / WEIGHTS).read_bytes() == (adapter / WEIGHTS).read_bytes()


def test_dora_is_recorded_as_not_servable(
    home: Path, tiny_base: Path, copy_adapter: Callable[[Path], Path], tmp_path: Path
) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_base))
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    model.save_pretrained(tmp_path / "dora")
    record = Registry(home).register("dora", tmp_path / "dora")
    assert "dora" in record.features
    assert record.engines == []
    assert record.unservable == {
        "hf": "hf does not serve DoRA adapters",
        "vllm": "vllm does not serve DoRA adapters",
    }


def test_base_fingerprint_follows_an_edit_of_the_weights_in_place(tmp_path: Path) -> None:
    """Base weight digests are cached by file identity and times; a rewrite of the same
    size is still seen."""
    from registry.basemodel import inspect_base
    from tuning.tinymodel import build_base_model

    base = build_base_model(tmp_path / "base", size="tiny", seed=0)
    before = inspect_base(base).fingerprint
    assert inspect_base(base).fingerprint == before
    weights = next(base.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, other content
    weights.write_bytes(bytes(data))
    assert inspect_base(base).fingerprint != before
