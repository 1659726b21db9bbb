"""The Server: one engine and one registry, wired to routing, residency, hot-swap
(serving/runtime/hotswap.py), admission (admission.py), detokenization with stop strings
(detokenizer.py) and the fan-out of finished requests (outcomes.py) to the watchers in
serving/watch/. The HTTP layer (serving/http/) calls only this class.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

from registry import Registry
from registry.basemodel import inspect_base
from registry.errors import LorafleetError
from registry.faults import injected_faults
from registry.names import CANARY_ALIAS, DEFAULT_ALIAS, parse_model_ref
from serving.engines import build_engine
from serving.engines.seam import TokenEvent
from serving.errors import BadRequest, Overloaded
from serving.metrics import TTFT_SECONDS
from serving.runtime.admission import Admission, Prompt
from serving.runtime.classification import Classifier, feedback_label
from serving.runtime.detokenizer import Detokenizer
from serving.runtime.generation import Ask, Generation
from serving.runtime.hotswap import HotSwap
from serving.runtime.outcomes import Outcomes, answered
from serving.runtime.residency import Residency
from serving.runtime.routing import AliasMap, Router, Target
from serving.runtime.shadow import Shadow
from serving.serve_config import ServeConfig
from serving.watch.canary import CanaryWatch
from serving.watch.canary_shared import SharedCanaryStats
from serving.watch.canary_stats import CanaryStats
from serving.watch.drift import Drift, DriftSettings, registry_profiles
from serving.watch.request_writer import RequestLogWriter
from serving.watch.samples import DriftHistory, Traffic

logger = logging.getLogger(__name__)


def vocab_size(base: Path) -> int:
    """The width of the model's logits, from its config.json (a multimodal model's text
    config holds it)."""
    config = json.loads((base / "config.json").read_text())
    return int(config.get("text_config", config)["vocab_size"])


class Server:
    def __init__(self, config: ServeConfig) -> None:
        from transformers import AutoTokenizer

        self.config = config
        self.started = int(time.time())  # the `created` of the model objects
        self.registry = Registry(config.home)
        fingerprint = inspect_base(config.base).fingerprint
        if fingerprint != self.registry.base.fingerprint:
            raise LorafleetError(
                f"base {config.base} has fingerprint {fingerprint} but the registry at "
                f"{self.registry.home} is bound to {self.registry.base.fingerprint}; serve "
                f"{self.registry.base.path} or use the registry of this base (--home)"
            )
        self.faults = injected_faults()  # tests only: empty unless LORAFLEET_FAULTS is set
        self.tokenizer = AutoTokenizer.from_pretrained(str(config.base))
        self.vocab_size = vocab_size(config.base)
        self._token_texts: dict[int, str] = {}  # at most vocab_size entries
        self.drift = Drift(DriftSettings.from_config(config), registry_profiles(self.registry))
        self.engine_name, self.engine = build_engine(config)
        self.residency = Residency(self.engine, self.engine_name, self.registry)
        self.router = Router(AliasMap.load(self.registry))
        self.canary_stats = (  # pooled across the replicas of a shared registry
            SharedCanaryStats(self.registry, self._has_canary)
            if self.registry.shared
            else CanaryStats()
        )
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
            config,
            self.tokenizer,
            self.vocab_size,
            self.engine,
            self.router,
            self.residency,
            self.outcomes,
        )
        self.classifier = Classifier(self.tokenizer, self.vocab_size, self.admission, self.outcomes)
        self.shadow = Shadow(
            self._run_on_canary, lambda: self.hotswap.shadow_shares, self._shadow_pair
        )
        self.hotswap.start()
        self.drift_history.start()
        self.canary = CanaryWatch(
            self.registry,
            self.canary_stats,
            self._keep_resident,
            self.drift.since if self.drift.settings.enabled else None,
            self.drift.settings,
            applied=self.refresh,
            shadow=self.shadow.since,
            interval_s=config.canary_interval_s,
            enabled=config.canary_verdicts,
        )

    def close(self) -> None:
        self.hotswap.close()
        self.canary.close()
        self.canary_stats.close()
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

    def _has_canary(self, adapter: str) -> bool:
        return (adapter, CANARY_ALIAS) in self.router.map.aliases

    def _keep_resident(self, adapter: str, version: int) -> None:
        """Load `adapter@version` unless it is resident (the canary watch, before it routes)."""
        target = Target(adapter, version)
        if target.key not in self.residency.resident():
            self.residency.ensure(target)

    # ---- requests ------------------------------------------------------------------------

    def render_chat(self, messages: list[dict[str, Any]]) -> str:
        """The prompt of a conversation, by the base's chat template; BadRequest with the
        template's own message when it refuses the conversation (say, roles out of order)."""
        from jinja2 import TemplateError

        try:
            rendered = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False
            )
        except TemplateError as err:
            raise BadRequest(
                f"messages: the chat template of this base refused them: {err}"
            ) from err
        except ValueError as err:  # no chat template, or one transformers cannot use
            raise BadRequest(f"messages: {err}") from err
        return str(rendered)

    async def start(
        self, choices: list[tuple[Prompt, Ask]], *, chat: bool, session: str | None
    ) -> list[Generation]:
        """Admit a request's choices (serving/runtime/admission.py); every refusal is raised
        here, and then none of them runs."""
        return await self.admission.start(choices, chat=chat, session=session)

    async def deltas(self, generation: Generation) -> AsyncIterator[str]:
        """Text deltas as tokens arrive, never any part of a stop string; sets finish_reason.
        Cancels the engine request if the consumer goes away (client disconnect)."""
        started = time.perf_counter()
        ask = generation.ask
        text = Detokenizer(
            lambda ids: str(
                self.tokenizer.decode(ids, skip_special_tokens=ask.skip_special_tokens)
            ),
            ask.stops,
            include_stop=ask.include_stop,
        )
        generation.consumed = True
        fault = self.faults.get(generation.served) if self.faults else None
        try:
            while True:
                event = await generation.queue.get()
                if fault is not None and event.token_id is not None:
                    if fault.error:
                        self.engine.cancel(generation.id)
                        event = TokenEvent(None, finish_reason="error", error="injected fault")
                    await asyncio.sleep(fault.delay_s)
                if event.prompt_logprobs is not None:
                    generation.prompt_logprobs = event.prompt_logprobs
                if event.logprob is not None and event.token_id is not None:
                    generation.token_logprobs.append((event.token_id, event.logprob))
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
            prompt_ids = generation.prompt_ids  # finished() lets go of them
            self.outcomes.finished(generation, time.perf_counter() - started)
            self.shadow.offer(generation, prompt_ids)

    def _shadow_pair(self, adapter: str) -> tuple[int, Target] | None:
        """(production version, canary target) of `adapter` when it has both."""
        aliases = self.router.map.aliases
        production, canary = (
            aliases.get((adapter, DEFAULT_ALIAS)),
            aliases.get((adapter, CANARY_ALIAS)),
        )
        if production is None or canary is None:
            return None
        return production[0], Target(adapter, canary[0])

    async def _run_on_canary(self, target: Target, ids: list[int], production: Generation) -> str:
        """The canary's greedy output for the prompt of a production request, with its
        max_tokens and stop strings (a shadow run: serving/runtime/shadow.py)."""
        if target.key not in self.residency.resident():
            raise Overloaded(f"canary {target.key} is not resident; a shadow run never loads it")
        ask = production.ask
        limit = ask.max_tokens  # admission checked that it fits; else as admission chose:
        if limit is None:
            limit = min(self.config.max_tokens_limit, self.config.max_len - len(ids) - 1)
        params = dataclasses.replace(ask.params, max_new_tokens=limit, logprobs=None)
        request_id, queue = self.admission.submit_aside(target, ids, params)
        text = Detokenizer(
            lambda out: str(
                self.tokenizer.decode(out, skip_special_tokens=ask.skip_special_tokens)
            ),
            ask.stops,
            include_stop=ask.include_stop,
        )
        out = ""
        try:
            while True:
                event = await queue.get()
                if event.token_id is None:
                    if event.error:
                        raise Overloaded(f"shadow run on {target.key} failed: {event.error}")
                    return out + text.flush()
                out += text.add(event.token_id)
                if text.stopped:
                    return out
        finally:
            self.engine.cancel(request_id)  # a no-op once it ended

    def abandon(self, generation: Generation) -> None:
        """Free an admitted request whose output no one began to read (its client went away
        before the response started): cancel it in the engine, count it as cancelled."""
        if generation.consumed:
            return  # deltas() frees it
        generation.consumed = True
        generation.finish_reason = "cancelled"
        self.engine.cancel(generation.id)
        self.outcomes.finished(generation, None)

    def token_texts(self, ids: list[int]) -> list[str]:
        """Each token's own text (logprobs name tokens by it), decoded once per token id: a
        request with top_logprobs 5 names six tokens per generated one."""
        texts = self._token_texts
        for i in ids:
            if i not in texts:
                texts[i] = str(self.tokenizer.decode([i]))
        return [texts[i] for i in ids]

    def feedback(
        self,
        response_id: str,
        score: float | None,
        correction: str | None,
        label: str | None = None,
    ) -> int:
        """Store feedback on a response of this server, or of any replica that shares the
        registry (blocking: call it off the event loop). `label`: a classified text's true
        label (score 1 if predicted, else -1, unless a score is given)."""
        shared = self.registry.request_log if self.registry.shared else None
        found = answered(self.outcomes.recent, response_id, shared)
        if label is not None:
            judged, correction = feedback_label(found, label, self.registry)
            score = judged if score is None else score
        assert score is not None, "the schema asks for a score or a label"
        stored = self.registry.add_feedback(
            response_id,
            score,
            adapter=found.adapter,
            version=found.version,
            correction=correction,
            prompt=found.prompt,
            output=found.output,
        )
        self.drift.add_feedback(*found.labels, score)
        if found.adapter is not None and found.version is not None:
            self.canary_stats.add_feedback(found.adapter, found.version, score)
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
        """OpenAI's model objects: the base, then each adapter with its active versions and
        its aliases (NAME serves NAME:production)."""
        current = self.router.map
        return [
            self._model_object("base"),
            *(self._adapter_object(adapter, current) for adapter in sorted(current.versions)),
        ]

    def _adapter_object(self, adapter: str, current: AliasMap) -> dict[str, Any]:
        states = current.versions[adapter]
        return {
            **self._model_object(adapter),
            "versions": sorted(v for v, s in states.items() if s == "active"),
            "aliases": {a: v for (n, a), (v, _) in current.aliases.items() if n == adapter},
        }

    def model(self, name: str) -> dict[str, Any]:
        """The model object of `name` (base, NAME, NAME:ALIAS, NAME@VERSION), with the version
        it serves now (without the canary split); NotFound naming what exists."""
        ref = parse_model_ref(name)
        if ref.adapter is None:
            return self._model_object("base")
        current = self.router.map
        if name == ref.adapter and ref.adapter in current.versions:  # NAME: its list entry
            held = current.aliases.get((ref.adapter, DEFAULT_ALIAS))
            listed = self._adapter_object(ref.adapter, current)
            return {**listed, "version": held[0] if held else None}
        adapter, version = self.drift_key(name)  # NotFound naming what exists
        created = self.registry.get_version(adapter, version).created_at
        return {
            **self._model_object(name, created=int(datetime.fromisoformat(created).timestamp())),
            "adapter": adapter,
            "version": version,
        }

    def _model_object(self, name: str, *, created: int | None = None) -> dict[str, Any]:
        return {
            "id": name,
            "object": "model",
            "created": created if created is not None else self.started,
            "owned_by": "lorafleet",
        }
