"""Evaluation with the base model as the yardstick: eval loss and perplexity, exact match
and token F1 by greedy generation (completion data), and a forgetting check: perplexity on
general text with and without the adapter."""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from registry.scoring import exact_match, token_f1
from tuning.config import DataConfig, EvaluationConfig
from tuning.data import IGNORE, Example, chunks, pad_batch
from tuning.replay import reference_set

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@torch.no_grad()
def mean_loss(
    model: torch.nn.Module, examples: Sequence[Example], batch_size: int, pad_id: int
) -> float:
    """Token-weighted mean cross-entropy over the labelled tokens of `examples`."""
    total, count = 0.0, 0
    for group in chunks(examples, batch_size):
        batch = pad_batch(group, pad_id)
        logits = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        ).logits
        labels = batch["labels"][:, 1:]
        total += F.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]),
            labels.reshape(-1),
            ignore_index=IGNORE,
            reduction="sum",
        ).item()
        count += int((labels != IGNORE).sum())
    return total / max(count, 1)


@torch.no_grad()
def generate(
    model: Any,  # anything with transformers' generate(); PeftModel.generate is unannotated
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[list[int]],
    max_new_tokens: int,
    batch_size: int,
) -> list[str]:
    """Greedy completions of tokenized prompts (left-padded batches)."""
    out: list[str] = []
    pad = tokenizer.pad_token_id
    for start in range(0, len(prompts), batch_size):
        group = prompts[start : start + batch_size]
        width = max(len(p) for p in group)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in group])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group])
        generated = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
        )
        out += tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)
    return out


def _score(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    held_out: Sequence[Example],
    reference: Sequence[Example],
    config: EvaluationConfig,
    generation: bool,
) -> dict[str, float]:
    pad = tokenizer.pad_token_id
    loss = mean_loss(model, held_out, config.batch_size, pad)
    scores = {"eval_loss": loss, "perplexity": math.exp(min(loss, 50.0))}
    if generation:
        sample = [e for e in held_out if e.completion is not None][: config.max_examples]
        answers = generate(
            model,
            tokenizer,
            [e.prompt_ids for e in sample],
            config.max_new_tokens,
            config.batch_size,
        )
        refs = [e.completion or "" for e in sample]
        scores["exact_match"] = sum(map(exact_match, answers, refs)) / len(sample)
        scores["token_f1"] = sum(map(token_f1, answers, refs)) / len(sample)
        scores["generation_examples"] = len(sample)
    if reference:
        ref_loss = mean_loss(model, reference, config.batch_size, pad)
        scores["reference_perplexity"] = math.exp(min(ref_loss, 50.0))
    return scores


def score(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    held_out: Sequence[Example],
    data: DataConfig,
    config: EvaluationConfig,
    *,
    forgetting: bool = False,
) -> dict[str, float]:
    """The model's own scores on `held_out` (no base comparison): eval loss and perplexity,
    exact match and token F1 where `evaluate` computes them; with `forgetting`, also
    `reference_perplexity` on the general text `evaluate` uses for its forgetting check."""
    generation = config.generate and data.format == "completion"
    reference = reference_set(tokenizer, data) if forgetting else []
    was_training = model.training
    model.eval()
    try:
        return _score(model, tokenizer, held_out, reference, config, generation)
    finally:
        model.train(was_training)


def evaluate(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    held_out: Sequence[Example],
    data: DataConfig,
    config: EvaluationConfig,
) -> dict[str, Any]:
    """Scores of the adapter and of the base (same model, adapter disabled)."""
    generation = config.generate and data.format == "completion"
    reference = reference_set(tokenizer, data) if config.forgetting else []
    was_training = model.training
    model.eval()
    adapter = _score(model, tokenizer, held_out, reference, config, generation)
    disable = getattr(model, "disable_adapter", None)
    with disable() if disable else nullcontext():
        base = _score(model, tokenizer, held_out, reference, config, generation)
    model.train(was_training)
    metrics: dict[str, Any] = {k: v for k, v in adapter.items() if k != "reference_perplexity"}
    metrics["base"] = {k: v for k, v in base.items() if k != "reference_perplexity"}
    if reference:
        before, after = base["reference_perplexity"], adapter["reference_perplexity"]
        metrics["forgetting"] = {
            "base_reference_perplexity": before,
            "reference_perplexity": after,
            "change_pct": 100.0 * (after - before) / before,
        }
    return metrics
