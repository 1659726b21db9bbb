"""The Server: one engine and one registry, wired to routing, residency, hot-swap
(serving/runtime/hotswap.py), admission (admission.py), detokenization with stop strings
(detokenizer.py) and the fan-out of finished requests (outcomes.py) to the watchers in
serving/watch/. The HTTP layer (serving/http/) calls only this class.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from registry import Registry
from registry.basemodel import inspect_base
from registry.errors import LorafleetError
from registry.names import DEFAULT_ALIAS, parse_model_ref
from serving.engines import build_engine
from serving.metrics import TTFT_SECONDS
from serving.runtime.admission import Admission
from serving.runtime.detokenizer import Detokenizer
from serving.runtime.generation import Generation, SamplingRequest
from serving.runtime.hotswap import HotSwap
from serving.runtime.outcomes import Outcomes
from serving.runtime.residency import Residency
from serving.runtime.routing import AliasMap, Router, Target
from serving.serve_config import ServeConfig
from serving.watch.canary import CanaryWatch
from serving.watch.canary_stats import CanaryStats
from serving.watch.drift import Drift, DriftSettings, registry_profiles
from serving.watch.request_writer import RequestLogWriter
from serving.watch.samples import DriftHistory, Traffic

logger = logging.getLogger(__name__)


class Server:
    def __init__(self, config: ServeConfig) -> None:
        from transformers import AutoTokenizer

        self.config = config
        self.registry = Registry(config.home)
        fingerprint = inspect_base(config.base).fingerprint
        if fingerprint != self.registry.base.fingerprint:
            raise LorafleetError(
                f"base {config.base} has fingerprint {fingerprint} but the registry at "
                f"{self.registry.home} is bound to {self.registry.base.fingerprint}; serve "
                f"{self.registry.base.path} or use the registry of this base (--home)"
            )
        self.tokenizer = AutoTokenizer.from_pretrained(str(config.base))
        self.drift = Drift(DriftSettings.from_config(config), registry_profiles(self.registry))
        self.engine_name, self.engine = build_engine(config)
        self.residency = Residency(self.engine, self.engine_name, self.registry)
        self.router = Router(AliasMap.load(self.registry))
        self.canary_stats = CanaryStats()
        self.traffic = Traffic()  # the dashboard's charts
        self.drift_history = DriftHistory(self.drift.summary)
        self.request_log = (
            RequestLogWriter(
                lambda: self.registry.request_log,
                max_rows_per_adapter=config.request_log_max_rows,
                max_age_s=config.request_log_max_age_days * 86400,
            )
            if config.request_log
            else None
        )
        self.outcomes = Outcomes(
            traffic=self.traffic,
            canary_stats=self.canary_stats,
            drift=self.drift,
            request_log=self.request_log,
        )
        self.hotswap = HotSwap(config, self.registry, self.router, self.residency, self.request_log)
        self.admission = Admission(
            config, self.tokenizer, self.engine, self.router, self.residency, self.outcomes
        )
        self.hotswap.start()
        self.drift_history.start()
        self.canary = CanaryWatch(
            self.registry,
            self.canary_stats,
            self._keep_resident,
            self.drift.scores,
            self.drift.settings.thresholds,
            applied=self.refresh,
            interval_s=config.canary_interval_s,
            enabled=config.canary_verdicts,
        )

    def close(self) -> None:
        self.hotswap.close()
        self.canary.close()
        self.drift_history.close()
        if self.request_log is not None:
            self.request_log.close()  # writes what is pending
        self.drift.close()
        self.admission.close()
        self.engine.shutdown()
        self.registry.close()

    @property
    def in_flight(self) -> int:
        """Admitted requests that have not ended."""
        return self.outcomes.in_flight

    def refresh(self) -> bool:
        """Apply the registry's current aliases now; True if the map changed."""
        return self.hotswap.refresh()

    def _keep_resident(self, adapter: str, version: int) -> None:
        """Load `adapter@version` unless it is resident (the canary watch, before it routes)."""
        target = Target(adapter, version)
        if target.key not in self.residency.resident():
            self.residency.ensure(target)

    # ---- requests ------------------------------------------------------------------------

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        return str(
            self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        )

    async def start(
        self, body: SamplingRequest, prompt: str, *, chat: bool, session: str | None
    ) -> Generation:
        """Admit a request (serving/runtime/admission.py); every refusal is raised here."""
        return await self.admission.start(body, prompt, chat=chat, session=session)

    async def deltas(self, generation: Generation) -> AsyncIterator[str]:
        """Text deltas as tokens arrive, never any part of a stop string; sets finish_reason.
        Cancels the engine request if the consumer goes away (client disconnect)."""
        started = time.perf_counter()
        text = Detokenizer(self._decode, generation.stops)
        generation.consumed = True
        try:
            while True:
                event = await generation.queue.get()
                if event.token_id is None:
                    generation.finish_reason = event.finish_reason
                    if event.error:
                        logger.error("request %s failed: %s", generation.id, event.error)
                    delta = text.flush()
                    generation.text += delta
                    if delta:
                        yield delta
                    break
                if not text.tokens:
                    TTFT_SECONDS.labels(*generation.labels).observe(time.perf_counter() - started)
                delta = text.add(event.token_id)
                generation.completion_tokens = len(text.tokens)
                if text.stopped:
                    self.engine.cancel(generation.id)
                    generation.finish_reason = "stop"
                generation.text += delta
                if delta:
                    yield delta
                if text.stopped:
                    break
        finally:
            if generation.finish_reason is None:
                self.engine.cancel(generation.id)
                generation.finish_reason = "cancelled"
            self.outcomes.finished(generation, time.perf_counter() - started)

    def abandon(self, generation: Generation) -> None:
        """Free an admitted request whose output no one began to read (its client went away
        before the response started): cancel it in the engine, count it as cancelled."""
        if generation.consumed:
            return  # deltas() frees it
        generation.consumed = True
        generation.finish_reason = "cancelled"
        self.engine.cancel(generation.id)
        self.outcomes.finished(generation, None)

    def _decode(self, tokens: list[int]) -> str:
        return str(self.tokenizer.decode(tokens, skip_special_tokens=True))

    def feedback(self, response_id: str, score: float, correction: str | None) -> int:
        generation = self.outcomes.recent.get(response_id)
        target = generation.target
        stored = self.registry.add_feedback(
            response_id,
            score,
            adapter=target.adapter if target else None,
            version=target.version if target else None,
            correction=correction,
            prompt=generation.prompt,
            output=generation.text,
        )
        self.drift.add_feedback(*generation.labels, score)
        if target is not None:
            self.canary_stats.add_feedback(target.adapter, target.version, score)
        return stored

    def drift_key(self, model: str) -> tuple[str, int]:
        """(adapter, version) that `model` names, without the canary split (NAME is
        NAME:production); ("base", 0) for the base model. NotFound naming what exists."""
        ref = parse_model_ref(model)
        if ref.adapter is None:
            return "base", 0
        if ref.version is None:
            held = self.router.map.aliases.get((ref.adapter, ref.alias or DEFAULT_ALIAS))
            if held is not None:
                return ref.adapter, held[0]
        target = self.router.resolve(ref)  # raises NotFound for what does not exist
        assert target is not None
        return target.adapter, target.version

    def spell_tokens(self, report: dict[str, Any]) -> dict[str, Any]:
        """Label the prompt_tokens bins of a `Drift.report` with their text (on the event
        loop, which owns the tokenizer)."""
        tokens = report["signals"]["prompt_tokens"]
        if tokens["bins"]:
            ids = tokens["bins"][:-1]
            tokens["labels"] = [str(self.tokenizer.decode([i])) for i in ids] + ["other"]
        return report

    def models(self) -> list[dict[str, Any]]:
        current = self.router.map
        out: list[dict[str, Any]] = [{"id": "base", "object": "model", "owned_by": "lorafleet"}]
        for adapter, states in sorted(current.versions.items()):
            aliases = {a: v for (n, a), (v, _) in current.aliases.items() if n == adapter}
            out.append(
                {
                    "id": adapter,
                    "object": "model",
                    "owned_by": "lorafleet",
                    "versions": sorted(v for v, s in states.items() if s == "active"),
                    "aliases": aliases,
                }
            )
        return out
