"""Classification (/v1/classify): texts -> the classifier version that serves them (one
version for the whole request), made resident, each text's head logits from the engine,
and the accounting of each text as one response (metrics with its predicted label, the
drift window's predicted-label and top-probability signals, canary statistics, the request
log, feedback's lookup).

A text's tokens are the base tokenizer's (special tokens added unless the request says
otherwise), without trailing padding tokens: transformers' sequence-classification models
read the last token that is not padding, and so does the engine after this cut.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from registry import Registry
from registry.errors import LorafleetError
from registry.names import parse_model_ref
from serving.engines.seam import ClassifyRequest, ClassifyResult, Engine, SamplingParams
from serving.errors import BadRequest, Overloaded
from serving.runtime.admission import Admission
from serving.runtime.generation import Ask, Generation
from serving.runtime.outcomes import Answered, Outcomes
from serving.runtime.residency import Residency
from serving.runtime.routing import Router, Target


@dataclass(frozen=True)
class Classified:
    """One text's answer: the response that records it, its label and probabilities (raw
    logits when the request turned the activation off)."""

    generation: Generation
    label: str
    probs: list[float]


@dataclass(frozen=True)
class Classification:
    """One request's answers, the version that served it and the alias map's revision."""

    id: str
    target: Target
    revision: int
    items: list[Classified]


class Classifier:
    def __init__(
        self, tokenizer: Any, vocab_size: int, admission: Admission, outcomes: Outcomes
    ) -> None:
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self.max_len = admission.config.max_len
        self.engine: Engine = admission.engine
        self.router: Router = admission.router
        self.residency: Residency = admission.residency
        self.admission, self.outcomes = admission, outcomes
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else tokenizer.eos_token_id  # as lorafleet tune

    async def classify(
        self,
        model: str,
        inputs: Sequence[str | list[int]],
        *,
        add_special_tokens: bool = True,
        activation: bool = True,
        session: str | None = None,
    ) -> Classification:
        """Classify every text of one request; every refusal is raised before any runs."""
        prompts = [self._ids(text, add_special_tokens) for text in inputs]
        aliases = self.router.map
        target = self.router.resolve(parse_model_ref(model), session, aliases)
        if target is None:
            raise BadRequest(
                "model 'base' has no classification head; name a classifier adapter (one "
                "trained by lorafleet tune with task: classification)",
                param="model",
            )
        request_id = uuid.uuid4().hex
        started = time.perf_counter()
        try:
            with self.residency.held(target.key):
                await self.admission.resident(target)
                labels = self.residency.classifier_labels(target.key)
                if labels is None:
                    raise BadRequest(
                        f"{target.key} is a generation adapter; /v1/classify takes "
                        "classifiers: send its prompts to /v1/completions or "
                        "/v1/chat/completions",
                        param="model",
                    )
                waiting = [self._submit(target, ids) for ids in prompts]
        except LorafleetError as err:
            if not isinstance(err, BadRequest):
                self.outcomes.refused(target.adapter, target.version)
            raise
        results = await asyncio.gather(*waiting)
        seconds = time.perf_counter() - started
        items = [
            self._account(request_id, i, len(prompts), target, model, text, ids, result)
            for i, (text, ids, result) in enumerate(zip(inputs, prompts, results, strict=True))
        ]
        failed = next((r.error for r in results if r.error), None)
        for item in items:
            top = max(item.probs, default=0.0)
            index = item.probs.index(top) if item.probs else 0
            self.outcomes.classified(item.generation, None if failed else seconds, index, top)
        if failed:
            raise Overloaded(f"classification on {target.key} failed: {failed}; retry")
        if not activation:
            items = [
                Classified(c.generation, c.label, list(r.logits))
                for c, r in zip(items, results, strict=True)
            ]
        return Classification(request_id, target, aliases.revision, items)

    def _ids(self, text: str | list[int], add_special_tokens: bool) -> list[int]:
        if isinstance(text, str):
            ids: list[int] = self.tokenizer(text, add_special_tokens=add_special_tokens)[
                "input_ids"
            ]
        else:
            bad = next((i for i in text if not 0 <= i < self.vocab_size), None)
            if bad is not None:
                raise BadRequest(
                    f"input: token id {bad} is outside this model's vocabulary "
                    f"(0..{self.vocab_size - 1})",
                    param="input",
                )
            ids = list(text)
        while len(ids) > 1 and ids[-1] == self.pad_id:
            ids.pop()
        if not ids or len(ids) >= self.max_len:
            raise BadRequest(
                f"input: a text of {len(ids)} tokens; this server classifies 1 to "
                f"{self.max_len - 1} tokens (--max-len)",
                param="input",
            )
        return ids

    def _submit(self, target: Target, ids: list[int]) -> asyncio.Future[ClassifyResult]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[ClassifyResult] = loop.create_future()

        def settle(result: ClassifyResult) -> None:
            if not future.done():
                future.set_result(result)

        def done(result: ClassifyResult) -> None:  # engine thread: only hand over
            loop.call_soon_threadsafe(settle, result)

        self.engine.classify(ClassifyRequest(uuid.uuid4().hex, ids, target.key), done)
        return future

    def _account(
        self,
        request_id: str,
        index: int,
        count: int,
        target: Target,
        model: str,
        text: str | list[int],
        ids: list[int],
        result: ClassifyResult,
    ) -> Classified:
        labels = self.residency.classifier_labels(target.key) or []
        probs = _softmax(result.logits) if result.logits else []
        label = labels[probs.index(max(probs))] if probs and len(probs) == len(labels) else ""
        generation = Generation(
            request_id if count == 1 else f"{request_id}-{index}",
            target,
            text if isinstance(text, str) else str(self.tokenizer.decode(ids)),
            len(ids),
            Ask(model, SamplingParams(max_new_tokens=0)),
            asyncio.Queue(),
            text=label,
            finish_reason="stop",
            prompt_ids=ids,
            consumed=True,
            labels_of_classifier=tuple(labels),
        )
        return Classified(generation, label, probs)


def _softmax(logits: Sequence[float]) -> list[float]:
    top = max(logits)
    exps = [math.exp(x - top) for x in logits]
    total = sum(exps)
    return [e / total for e in exps]


def feedback_label(found: Answered, label: str, registry: Registry) -> tuple[float, str]:
    """(score, correction) of feedback that names a classified text's true label: 1 when the
    classifier predicted it, -1 when not; BadRequest for a label the classifier lacks."""
    labels = None
    if found.adapter is not None and found.version is not None:
        labels = registry.get_version(found.adapter, found.version).metadata.get("labels")
    if labels is None:
        raise BadRequest(
            "feedback: label is for responses of classifiers; this response is a generation: "
            "send score (and correction)",
            param="label",
        )
    if label not in labels:
        raise BadRequest(
            f"feedback: label {label!r} is not one of the classifier's labels {labels}",
            param="label",
        )
    return (1.0 if label == found.output else -1.0), label
