"""Which engines can serve a base model, decided from its config.json alone (no weights, no
engine start), so `lorafleet registry init` can say so and `lorafleet serve` can refuse a
base within seconds, before BentoML starts a worker.

- hf: the model types whose transformers modules the hf engine runs and that are tested
  token for token against transformers + peft (tests/serving/test_families.py). The list
  lives here, not in serving/, because the registry reports it too.
- vllm: the architectures vLLM registers for text generation, read from the installed
  vLLM's own model table without importing vLLM (an import takes ~16 s on 2 cores), and
  whether the model class supports LoRA.
"""

from __future__ import annotations

import ast
import importlib.util
import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

# model_type -> the transformers family it names (what a user reads in the message).
HF_FAMILIES: dict[str, str] = {
    "llama": "Llama, SmolLM2, TinyLlama",
    "mistral": "Mistral",
    "qwen2": "Qwen2, Qwen2.5",
    "qwen3": "Qwen3",
    "qwen3_moe": "Qwen3 MoE",
    "mixtral": "Mixtral",
    "gemma": "Gemma",
    "gemma2": "Gemma 2",
    "gemma3_text": "Gemma 3 (text)",
    "phi3": "Phi-3, Phi-4-mini",
    "granite": "Granite",
    "olmo2": "OLMo 2",
    "smollm3": "SmolLM3",
}
ENGINES = ("hf", "vllm")


@dataclass(frozen=True)
class Verdict:
    """Whether one engine can serve a base: `reason` is None when it can."""

    engine: str
    model_type: str
    reason: str | None

    @property
    def ok(self) -> bool:
        return self.reason is None


def read_config(base_dir: Path) -> dict[str, object]:
    """The base's config.json (an empty dict where it cannot be read: the registry's own
    validation names that problem)."""
    try:
        config = json.loads((Path(base_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def hf_verdict(config: dict[str, object]) -> Verdict:
    model_type = str(config.get("model_type", "unknown"))
    if model_type in HF_FAMILIES:
        return Verdict("hf", model_type, None)
    return Verdict(
        "hf",
        model_type,
        f"the hf engine does not serve model type {model_type!r}; it serves "
        f"{', '.join(sorted(HF_FAMILIES))}: serve this base with --engine vllm, or pick a "
        "base of one of those families",
    )


@cache
def vllm_architectures() -> dict[str, bool] | None:
    """vLLM's text-generation architectures (its own model classes and those it runs
    through its transformers backend) -> whether the class supports LoRA; None where vLLM
    is not installed or its table moved (then vLLM itself decides at start)."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or spec.origin is None:
        return None
    root = Path(spec.origin).parent
    models = root / "model_executor" / "models"
    try:
        table = {
            **_dict_literal(models / "registry.py", "_TRANSFORMERS_SUPPORTED_MODELS"),
            **_dict_literal(models / "registry.py", "_TEXT_GENERATION_MODELS"),
        }
    except (OSError, SyntaxError, ValueError):
        return None
    out = {}
    for arch, (module, cls) in table.items():
        path = _module_file(root.parent, f"vllm.model_executor.models.{module}")
        out[arch] = path is not None and _supports_lora(root.parent, path, cls, 0)
    return out


def _dict_literal(path: Path, name: str) -> dict[str, tuple[str, str]]:
    for node in ast.parse(path.read_text()).body:
        target = node.targets[0] if isinstance(node, ast.Assign) else getattr(node, "target", None)
        if isinstance(target, ast.Name) and target.id == name:
            value = ast.literal_eval(node.value)  # type: ignore[attr-defined]
            if isinstance(value, dict):
                return value
    raise ValueError(f"no dict {name} in {path}")


def _module_file(site: Path, dotted: str) -> Path | None:
    base = site.joinpath(*dotted.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


@cache
def _module_names(site: Path, path: Path) -> tuple[dict[str, set[str]], dict[str, str]]:
    """A module's classes (name -> base-class names) and imported names (-> module)."""
    try:
        tree = ast.parse(path.read_text())
    except (OSError, SyntaxError):
        return {}, {}
    package = ".".join(path.relative_to(site).with_suffix("").parts)
    if path.name == "__init__.py":
        package += ".__init__"
    classes, imports = {}, {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            classes[node.name] = {ast.unparse(b).split("[")[0] for b in node.bases}
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            source = node.module
            if node.level:  # relative: from .x import y
                parent = package.split(".")[: -node.level]
                source = ".".join([*parent, node.module])
            for alias in node.names:
                imports[alias.asname or alias.name] = source
    return classes, imports


def _supports_lora(site: Path, path: Path, cls: str, depth: int) -> bool:
    """Whether `cls` of the module at `path`, or a class it derives from (followed through
    imports within vLLM), is SupportsLoRA."""
    if depth > 8:
        return False
    classes, imports = _module_names(site, path)
    if cls not in classes:
        source = imports.get(cls)
        where = _module_file(site, source) if source and source.startswith("vllm.") else None
        return where is not None and _supports_lora(site, where, cls, depth + 1)
    return any(
        base == "SupportsLoRA" or _supports_lora(site, path, base, depth + 1)
        for base in classes[cls]
    )


def vllm_verdict(config: dict[str, object]) -> Verdict:
    model_type = str(config.get("model_type", "unknown"))
    archs = [str(a) for a in config.get("architectures") or []]  # type: ignore[attr-defined]
    table = vllm_architectures()
    if table is None:
        if importlib.util.find_spec("vllm") is None:
            return Verdict("vllm", model_type, "vLLM is not installed here (make setup-vllm-cpu)")
        return Verdict("vllm", model_type, None)
    known = [a for a in archs if a in table]
    if not known:
        return Verdict(
            "vllm",
            model_type,
            f"vLLM does not serve architecture {', '.join(archs) or '(none in config.json)'} "
            f"(model type {model_type!r}) for text generation: serve this base with "
            "--engine hf if its family is one the hf engine serves",
        )
    if not table[known[0]]:
        return Verdict(
            "vllm",
            model_type,
            f"vLLM serves {known[0]} without LoRA adapters; serve this base with --engine hf",
        )
    return Verdict("vllm", model_type, None)


def verdict(engine: str, base_dir: Path) -> Verdict:
    """Whether `engine` (hf or vllm) can serve the base in `base_dir`."""
    config = read_config(base_dir)
    return hf_verdict(config) if engine == "hf" else vllm_verdict(config)


def serving_engines(base_dir: Path) -> list[Verdict]:
    """Every engine's verdict on the base in `base_dir`."""
    return [verdict(engine, base_dir) for engine in ENGINES]
