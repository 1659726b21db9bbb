"""Validation of a PEFT LoRA adapter directory against the registry's base model.

Runs before anything is written: every failure raises a typed InvalidAdapter with the file,
the value, the limit and the fix, and the registry stays unchanged. Only the safetensors
header is read, never the tensors, and nothing is ever unpickled.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from registry.basemodel import PICKLE_SUFFIXES, BaseModelInfo
from registry.errors import (
    AdapterConfigError,
    AdapterWeightsError,
    InvalidAdapter,
    RankLimitError,
    TargetModuleError,
)
from registry.tensors import FLOAT_DTYPES, TensorInfo, read_header

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# "<module>.lora_A.weight", also with an adapter name: "<module>.lora_A.default.weight"
LORA_KEY = re.compile(r"(?P<module>.+)\.(?P<part>lora_A|lora_B)(?:\.[A-Za-z0-9_-]+)?\.weight")
EMBEDDING_KEY = re.compile(
    r"(?P<module>.+)\.(?P<part>lora_embedding_A|lora_embedding_B)(?:\.[A-Za-z0-9_-]+)?"
)
HEAD_KEY = re.compile(r"(?P<module>score|classifier)\.(?P<part>weight|bias)")
MAGNITUDE_KEY = re.compile(
    r"(?P<module>.+)\.lora_magnitude_vector(?:\.[A-Za-z0-9_-]+)?(?:\.weight)?"
)


@dataclass(frozen=True)
class AdapterReport:
    """What validation learned about an adapter; stored with its version."""

    rank: int  # the largest rank of any module (r, or a rank_pattern entry)
    alpha: float
    target_modules: list[str]  # distinct leaf names, e.g. ["k_proj", "q_proj"]
    modules: int  # number of adapted modules
    features: list[str]  # dora, rslora, modules_to_save, rank_pattern, embedding, bias, classifier
    # engine -> why it cannot serve this adapter; engines absent here can serve it
    unservable: dict[str, str] = field(default_factory=dict)
    peft_config: dict[str, object] = field(default_factory=dict)
    labels: list[str] | None = None  # a classifier's labels, in its head's row order

    @property
    def engines(self) -> list[str]:
        return [e for e in ("hf", "vllm") if e not in self.unservable]


def validate_adapter(
    adapter_dir: Path, base: BaseModelInfo, max_rank: int, labels: list[str] | None = None
) -> AdapterReport:
    """Check an adapter directory; return its report or raise an InvalidAdapter subclass.
    `labels`: a classifier's labels (lorafleet.json), which its head must have rows for."""
    _check_files(adapter_dir)
    config = _read_config(adapter_dir)
    rank, alpha = _check_rank_alpha(adapter_dir, config)
    tensors = _read_weights(adapter_dir)
    shapes = base.module_shapes()
    _check_target_modules(config, shapes, base)
    classifier = _check_head(adapter_dir, config, tensors, base, labels)
    modules, embedding = _check_tensors(tensors, config, base, rank)
    rank_pattern = config.get("rank_pattern") or {}
    assert isinstance(rank_pattern, dict)
    top_rank = max([rank, *(int(v) for v in rank_pattern.values())])
    if top_rank > max_rank:
        raise RankLimitError(
            f"adapter {adapter_dir} has rank {top_rank} > max rank {max_rank} of this registry; "
            f"retrain with r <= {max_rank}, or use a registry created with "
            f"`lorafleet registry init --max-rank {top_rank}`"
        )
    features, unservable = _features(config, embedding, classifier)
    return AdapterReport(
        rank=top_rank,
        alpha=alpha,
        target_modules=sorted({m.rsplit(".", 1)[-1] for m in modules}),
        modules=len(modules),
        features=features,
        unservable=unservable,
        peft_config=config,
        labels=labels if classifier else None,
    )


def hidden_size(base: BaseModelInfo) -> int | None:
    """The width of the base's hidden states: its token embedding's second dimension."""
    for suffix in ("embed_tokens.weight", "wte.weight", "word_embeddings.weight"):
        for name, shape in base.params.items():
            if name.endswith(suffix) and len(shape) == 2:
                return shape[1]
    return None


def _check_head(
    adapter_dir: Path,
    config: dict[str, object],
    tensors: dict[str, TensorInfo],
    base: BaseModelInfo,
    labels: list[str] | None,
) -> bool:
    """A sequence-classification adapter (task_type SEQ_CLS) must hold a head of one row per
    label over the base's hidden size; True when the adapter is one."""
    heads = {
        key: info
        for key, info in tensors.items()
        if HEAD_KEY.fullmatch(key.removeprefix(PEFT_PREFIX))
    }
    if str(config.get("task_type") or "").upper() != "SEQ_CLS":
        return False
    where = adapter_dir / CONFIG_FILE
    weight = next((i for k, i in heads.items() if k.endswith(".weight")), None)
    if weight is None:
        raise AdapterWeightsError(
            f"{where} has task_type SEQ_CLS but {WEIGHTS_FILE} holds no classification head "
            "(score.weight or classifier.weight); save the trained classifier with peft again"
        )
    if not labels:
        raise AdapterConfigError(
            f"classifier {adapter_dir} has no labels: its lorafleet.json needs \"labels\", "
            f"the {weight.shape[0]} class names in the head's row order (lorafleet tune writes it)"
        )
    if len(set(labels)) != len(labels):
        raise AdapterConfigError(f"classifier {adapter_dir} repeats a label in {labels}")
    hidden = hidden_size(base)
    want = (len(labels), hidden if hidden is not None else weight.shape[-1])
    if weight.shape != want:
        raise AdapterWeightsError(
            f"classification head of {adapter_dir} has shape {list(weight.shape)} but "
            f"{len(labels)} labels {labels} over the base's hidden size {hidden} need "
            f"{list(want)}; the labels in lorafleet.json or the base do not match the head"
        )
    for key, info in heads.items():
        if key.endswith(".bias") and info.shape != (len(labels),):
            raise AdapterWeightsError(
                f"tensor {key!r} has shape {list(info.shape)}; the head's bias needs "
                f"[{len(labels)}], one per label"
            )
    return True


def _check_files(adapter_dir: Path) -> None:
    if not adapter_dir.is_dir():
        raise InvalidAdapter(
            f"adapter directory {adapter_dir} does not exist or is not a directory"
        )
    for path in sorted(adapter_dir.iterdir()):
        if path.is_symlink():
            raise InvalidAdapter(
                f"adapter directory {adapter_dir} contains a symlink {path.name!r}; "
                "copy the real file into the directory"
            )
        if path.is_dir():
            raise InvalidAdapter(
                f"adapter directory {adapter_dir} contains a subdirectory {path.name!r}; "
                "register the directory that holds adapter_config.json and its weights only"
            )
        if not path.is_file():
            raise InvalidAdapter(
                f"adapter directory {adapter_dir} contains {path.name!r}, which is not a "
                "regular file (a pipe, socket or device); remove it"
            )
        if path.suffix in PICKLE_SUFFIXES:
            raise AdapterWeightsError(
                f"adapter {adapter_dir} contains pickle file {path.name!r}; lorafleet never "
                "unpickles: save the adapter with safetensors "
                "(model.save_pretrained(DIR, safe_serialization=True)) and remove the pickle"
            )


def _read_config(adapter_dir: Path) -> dict[str, object]:
    path = adapter_dir / CONFIG_FILE
    if not path.is_file():
        raise AdapterConfigError(
            f"adapter {adapter_dir} has no {CONFIG_FILE}; save the adapter with "
            "peft's model.save_pretrained(DIR)"
        )
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AdapterConfigError(
            f"{path} is not valid JSON ({err}); save the adapter again"
        ) from err
    if not isinstance(config, dict):
        raise AdapterConfigError(f"{path} is not a JSON object; save the adapter again")
    peft_type = config.get("peft_type")
    if str(peft_type).upper() != "LORA":
        raise AdapterConfigError(
            f"{path} has peft_type {peft_type!r}, not 'LORA'; lorafleet serves LoRA adapters only"
        )
    return config


def _check_rank_alpha(adapter_dir: Path, config: dict[str, object]) -> tuple[int, float]:
    rank, alpha = config.get("r"), config.get("lora_alpha")
    path = adapter_dir / CONFIG_FILE
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise AdapterConfigError(f"{path} has r={rank!r}; the LoRA rank must be an integer >= 1")
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or alpha <= 0:
        raise AdapterConfigError(f"{path} has lora_alpha={alpha!r}; it must be a number > 0")
    for key in ("rank_pattern", "alpha_pattern"):
        pattern = config.get(key) or {}
        if not isinstance(pattern, dict) or not all(
            isinstance(v, int | float) and v > 0 for v in pattern.values()
        ):
            raise AdapterConfigError(f"{path} has {key}={pattern!r}; expected name -> number > 0")
    return rank, float(alpha)


def _read_weights(adapter_dir: Path) -> dict[str, TensorInfo]:
    path = adapter_dir / WEIGHTS_FILE
    if not path.is_file():
        raise AdapterWeightsError(
            f"adapter {adapter_dir} has no {WEIGHTS_FILE}; save the adapter with "
            "peft's model.save_pretrained(DIR) (safetensors is the default)"
        )
    tensors = read_header(path)
    if not tensors:
        raise AdapterWeightsError(f"{path} holds no tensors; save the trained adapter again")
    for name, info in tensors.items():
        if info.dtype not in FLOAT_DTYPES:
            raise AdapterWeightsError(
                f"{path}: tensor {name!r} has dtype {info.dtype}; adapter weights must be "
                "floating point (F32, F16 or BF16)"
            )
    return tensors


def _matches_module(target: str, module: str) -> bool:
    return module == target or module.endswith("." + target)


def _check_target_modules(
    config: dict[str, object], shapes: dict[str, tuple[int, ...]], base: BaseModelInfo
) -> None:
    targets = config.get("target_modules")
    leaves = sorted({m.rsplit(".", 1)[-1] for m in shapes})
    fix = f"retrain with target_modules from the base's modules: {', '.join(leaves)}"
    if isinstance(targets, str):
        if targets == "all-linear" or any(re.fullmatch(targets, m) for m in shapes):
            return
        raise TargetModuleError(
            f"target_modules pattern {targets!r} matches no module of the base "
            f"({base.model_type}, {base.fingerprint[:12]}); {fix}"
        )
    if not isinstance(targets, list) or not targets:
        raise AdapterConfigError(
            f"adapter_config.json has target_modules={targets!r}; expected a list of module "
            f"names or a regex; {fix}"
        )
    for target in targets:
        if not any(_matches_module(str(target), m) for m in shapes):
            raise TargetModuleError(
                f"target module {target!r} is not in the base "
                f"({base.model_type}, {base.fingerprint[:12]}); {fix}"
            )


def _module_rank(config: dict[str, object], module: str, rank: int) -> int:
    pattern = config.get("rank_pattern") or {}
    assert isinstance(pattern, dict)
    for key, value in pattern.items():
        if key == module or re.match(rf"(.*\.)?({key})$", module):
            return int(value)
    return rank


def _check_tensors(
    tensors: dict[str, TensorInfo], config: dict[str, object], base: BaseModelInfo, rank: int
) -> tuple[set[str], bool]:
    """Check every tensor against the base; return the adapted modules and embedding use."""
    shapes = base.module_shapes()
    saved = [str(m) for m in (config.get("modules_to_save") or [])]  # type: ignore[attr-defined]
    pairs: dict[str, dict[str, tuple[int, ...]]] = {}
    embedding = False
    for key, info in tensors.items():
        name = key.removeprefix(PEFT_PREFIX)
        match = LORA_KEY.fullmatch(name) or EMBEDDING_KEY.fullmatch(name)
        if match:
            module = match["module"]
            embedding |= match["part"].startswith("lora_embedding")
            _require_module(key, module, shapes)
            pairs.setdefault(module, {})[match["part"]] = info.shape
            continue
        if HEAD_KEY.fullmatch(name) and str(config.get("task_type") or "").upper() == "SEQ_CLS":
            continue  # the classification head: checked by _check_head
        if (magnitude := MAGNITUDE_KEY.fullmatch(name)) is not None:
            module = magnitude["module"]
            _require_module(key, module, shapes)
            _expect_shape(key, info.shape, (shapes[module][0],), f"base module {module!r}")
            continue
        if name in base.params and any(_matches_module(s, name.rsplit(".", 1)[0]) for s in saved):
            _expect_shape(key, info.shape, base.params[name], f"base parameter {name!r}")
            continue
        raise AdapterWeightsError(
            f"tensor {key!r} is neither a LoRA tensor of a base module nor a base parameter "
            "listed in modules_to_save; the weights do not belong to this base or config"
        )
    for module, parts in pairs.items():
        _check_pair(module, parts, shapes[module], _module_rank(config, module, rank))
    if not pairs:
        raise AdapterWeightsError("adapter_model.safetensors holds no lora_A/lora_B tensors")
    return set(pairs), embedding


def _require_module(key: str, module: str, shapes: dict[str, tuple[int, ...]]) -> None:
    if module not in shapes:
        raise TargetModuleError(
            f"tensor {key!r} adapts module {module!r}, which the base does not have; "
            "the adapter was trained on another base model"
        )


def _expect_shape(key: str, got: tuple[int, ...], want: tuple[int, ...], what: str) -> None:
    if got != want:
        raise AdapterWeightsError(
            f"tensor {key!r} has shape {list(got)} but {what} needs {list(want)}; "
            "the adapter was trained on another base model or its files are mixed up"
        )


def _check_pair(
    module: str, parts: dict[str, tuple[int, ...]], base_shape: tuple[int, ...], rank: int
) -> None:
    out_features, in_features = base_shape
    if "lora_A" in parts or "lora_B" in parts:
        expected = {"lora_A": (rank, in_features), "lora_B": (out_features, rank)}
    else:  # embedding: base weight is (num_embeddings, dim)
        expected = {
            "lora_embedding_A": (rank, out_features),
            "lora_embedding_B": (in_features, rank),
        }
    for part, want in expected.items():
        if part not in parts:
            raise AdapterWeightsError(
                f"module {module!r} has no {part} tensor; the weights file is incomplete: "
                "save the adapter again"
            )
        got = parts[part]
        if got == want:
            continue
        if len(got) == 2 and (got[0] == want[0] or got[1] == want[1]) and rank not in got:
            raise AdapterWeightsError(
                f"{module}.{part} has shape {list(got)} but rank r={rank} from "
                f"adapter_config.json needs {list(want)}; the config and weights come from "
                "different runs: save the adapter again"
            )
        raise AdapterWeightsError(
            f"{module}.{part} has shape {list(got)} but the base module {module!r} with weight "
            f"{list(base_shape)} and r={rank} needs {list(want)}; the adapter was trained on "
            "a base with other dimensions"
        )


def _features(
    config: dict[str, object], embedding: bool, classifier: bool = False
) -> tuple[list[str], dict[str, str]]:
    """Options beyond plain LoRA on linear layers, and the engines that cannot serve them
    (the hf engine routes stacked A/B matrices per row; vLLM's LoRA kernels likewise)."""
    features: list[str] = []
    unservable: dict[str, str] = {}

    def refuse(feature: str, what: str) -> None:
        features.append(feature)
        for engine in ("hf", "vllm"):
            unservable.setdefault(engine, f"{engine} does not serve {what}")

    if config.get("use_dora"):
        refuse("dora", "DoRA adapters")
    if config.get("use_rslora"):
        features.append("rslora")
    saved = set(config.get("modules_to_save") or [])  # type: ignore[call-overload]
    if classifier:
        features.append("classifier")
        unservable["vllm"] = "the vllm engine does not serve classification adapters"
        saved -= {"score", "classifier"}  # the head: served by the hf engine at /v1/classify
    if saved:
        refuse("modules_to_save", "modules_to_save")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        features.append("rank_pattern")
    if embedding:
        refuse("embedding", "LoRA on embeddings")
    if config.get("bias", "none") != "none":
        refuse("bias", "LoRA bias")
    return features, unservable
