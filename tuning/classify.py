"""Classification adapters (`task: classification`): LoRA on the base plus a new head, a
(hidden size x labels) linear layer trained in full, on rows of `text` and `label`.

The model is transformers' AutoModelForSequenceClassification of the base (its `score` or
`classifier` head reads the hidden state of each row's last token that is not padding),
wrapped by peft with task_type SEQ_CLS, so the saved adapter loads back with
`PeftModel.from_pretrained`. Evaluation: accuracy, macro-F1 and the confusion matrix
against two baselines, the majority class of the training labels and a linear probe (the
same head trained on the frozen base's features).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from registry.hardware import resolve_dtype
from tuning.config import TuneConfig
from tuning.data import Example, chunks, pad_batch
from tuning.errors import ConfigError, DataError

if TYPE_CHECKING:
    from peft import PeftModel

logger = logging.getLogger(__name__)
HEAD_MODULES = ("score", "classifier")  # transformers' names of the classification head
PROBE_STEPS = 300


def label_set(
    config: TuneConfig, train: Sequence[Example], held_out: Sequence[Example]
) -> list[str]:
    """data.labels, or the training labels sorted; DataError for a row outside the set."""
    labels = config.data.labels or sorted({str(e.label) for e in train})
    if len(labels) < 2:
        raise DataError(
            f"the training data has one label ({labels[0]!r}); a classifier needs two or more"
        )
    known = set(labels)
    for where, examples in (("training", train), ("eval", held_out)):
        unknown = sorted({str(e.label) for e in examples} - known)
        if unknown:
            raise DataError(
                f"the {where} data has label(s) {', '.join(map(repr, unknown))} outside the "
                f"label set {labels}; fix the rows or list every label in data.labels"
            )
    return labels


def class_weights(
    config: TuneConfig, train: Sequence[Example], labels: list[str]
) -> torch.Tensor | None:
    """The loss weight of each class: none, balanced (n / (k x count)) or the given map."""
    setting = config.training.class_weights
    if setting == "none":
        return None
    counts = Counter(str(e.label) for e in train)
    if setting == "balanced":
        missing = [label for label in labels if not counts[label]]
        if missing:
            raise DataError(
                f"class_weights balanced: label(s) {missing} have no training rows; add rows or "
                "give the weights as a map"
            )
        total = sum(counts.values())
        return torch.tensor([total / (len(labels) * counts[label]) for label in labels])
    assert isinstance(setting, dict)
    if set(setting) != set(labels) or any(w <= 0 for w in setting.values()):
        raise ConfigError(
            f"training.class_weights names {sorted(setting)}; give a weight > 0 for each label "
            f"of {labels}"
        )
    return torch.tensor([float(setting[label]) for label in labels])


def build_classifier(config: TuneConfig, base: Path, labels: list[str], pad_id: int) -> PeftModel:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    dtype = torch.bfloat16 if resolve_dtype(config.training.dtype) == "bf16" else torch.float32
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]  # the new head and lm_head
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            str(base),
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)},
            dtype=dtype,
            use_safetensors=True,
        )
    except ValueError as err:  # a model type without a sequence-classification class
        raise ConfigError(f"task classification: {err}") from err
    finally:
        hf_logging.set_verbosity(verbosity)
    model.config.pad_token_id = pad_id
    method = config.method
    lora = LoraConfig(
        task_type="SEQ_CLS",  # adds the head to modules_to_save
        r=method.r,
        lora_alpha=method.alpha,  # type: ignore[arg-type]  # peft: int, used as alpha / r
        lora_dropout=method.dropout,
        target_modules=method.target_modules,
        use_rslora=method.use_rslora,
        use_dora=method.use_dora,
        modules_to_save=method.modules_to_save or None,
        layers_to_transform=method.layers_to_transform,
    )
    try:
        return get_peft_model(model, lora)
    except ValueError as err:
        raise ConfigError(f"method: {err}") from err


def head_of(model: torch.nn.Module) -> torch.nn.Module:
    """The classification head (peft's wrapper of it inside a PeftModel)."""
    unwrap = getattr(model, "get_base_model", None)
    inner = unwrap() if callable(unwrap) else model
    for name in HEAD_MODULES:
        if isinstance(module := getattr(inner, name, None), torch.nn.Module):
            return module
    raise ConfigError(
        f"{type(inner).__name__} has no classification head ({', '.join(HEAD_MODULES)})"
    )


@dataclass
class ClassObjective:
    """What the training loop minimises for a classifier: cross-entropy of the head's
    logits, weighted per class."""

    classes: dict[str, int]
    weight: torch.Tensor | None = None

    def loss(self, model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return F.cross_entropy(logits.float(), batch["labels"], weight=self.weight)

    def tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["attention_mask"].sum())

    @torch.no_grad()
    def eval_loss(
        self, model: torch.nn.Module, examples: Sequence[Example], batch_size: int, pad_id: int
    ) -> float:
        total, weight = 0.0, 0.0
        for group in chunks(examples, batch_size):
            batch = pad_batch(group, pad_id, self.classes)
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits
            w = self.weight[batch["labels"]] if self.weight is not None else torch.ones(len(group))
            losses = F.cross_entropy(logits.float(), batch["labels"], reduction="none")
            total += float((losses * w).sum())
            weight += float(w.sum())
        return total / max(weight, 1e-12)


@torch.no_grad()
def probabilities(
    model: torch.nn.Module, examples: Sequence[Example], batch_size: int, pad_id: int
) -> torch.Tensor:
    """(examples, labels) softmax probabilities of the model's head."""
    out = []
    for group in chunks(examples, batch_size):
        batch = pad_batch(group, pad_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        out.append(logits.float().softmax(-1))
    return torch.cat(out)


def scores(predicted: Sequence[int], true: Sequence[int], labels: list[str]) -> dict[str, Any]:
    """Accuracy, macro-F1 (every label counts, an absent one as F1 0 only if predicted) and
    the confusion matrix: rows the true label, columns the predicted one."""
    k = len(labels)
    matrix = [[0] * k for _ in range(k)]
    for p, t in zip(predicted, true, strict=True):
        matrix[t][p] += 1
    f1s = []
    for c in range(k):
        tp = matrix[c][c]
        fp = sum(matrix[r][c] for r in range(k)) - tp
        fn = sum(matrix[c]) - tp
        if tp + fp + fn:
            f1s.append(2 * tp / (2 * tp + fp + fn))
    return {
        "accuracy": sum(matrix[c][c] for c in range(k)) / max(len(true), 1),
        "macro_f1": sum(f1s) / max(len(f1s), 1),
        "confusion": {"labels": labels, "matrix": matrix},
        "examples": len(true),
    }


def last_tokens(input_ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Each row's position that the head reads: its last token that is not padding (as
    transformers' sequence-classification models pick it)."""
    positions = torch.arange(input_ids.shape[1])
    return (positions * (input_ids != pad_id)).argmax(-1)


@torch.no_grad()
def _features(
    model: torch.nn.Module, examples: Sequence[Example], batch_size: int, pad_id: int
) -> torch.Tensor:
    """The frozen base's features: the head's input at each row's last non-padding token,
    the adapter disabled."""
    head, seen = head_of(model), []
    hook = head.register_forward_hook(lambda _m, args, _out: seen.append(args[0].float()))
    rows = []
    try:
        with model.disable_adapter():  # type: ignore[operator]  # PeftModel's context manager
            for group in chunks(examples, batch_size):
                batch = pad_batch(group, pad_id)
                seen.clear()
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                last = last_tokens(batch["input_ids"], pad_id)
                rows.append(seen[-1][torch.arange(len(group)), last])
    finally:
        hook.remove()
    return torch.cat(rows)


def linear_probe(
    model: torch.nn.Module,
    train: Sequence[Example],
    held_out: Sequence[Example],
    classes: dict[str, int],
    weight: torch.Tensor | None,
    batch_size: int,
    pad_id: int,
    seed: int,
) -> list[int]:
    """Predictions on `held_out` of a head (with bias) trained alone on the frozen base's
    features: full-batch AdamW, PROBE_STEPS steps, the run's class weights."""
    x_train = _features(model, train, batch_size, pad_id)
    x_eval = _features(model, held_out, batch_size, pad_id)
    mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-6)
    y = torch.tensor([classes[str(e.label)] for e in train])
    generator = torch.Generator().manual_seed(seed)
    probe = torch.nn.Linear(x_train.shape[1], len(classes))
    with torch.no_grad():
        probe.weight.normal_(0, 0.01, generator=generator)
        probe.bias.zero_()
    optimizer = torch.optim.AdamW(probe.parameters(), lr=0.05, weight_decay=0.01)
    for _ in range(PROBE_STEPS):
        optimizer.zero_grad()
        loss = F.cross_entropy(probe((x_train - mean) / std), y, weight=weight)
        loss.backward()  # type: ignore[no-untyped-call]  # unannotated in torch
        optimizer.step()
    with torch.no_grad():
        return probe((x_eval - mean) / std).argmax(-1).tolist()  # type: ignore[no-any-return]


def evaluate_classifier(
    model: torch.nn.Module,
    train: Sequence[Example],
    held_out: Sequence[Example],
    objective: ClassObjective,
    config: TuneConfig,
    pad_id: int,
) -> dict[str, Any]:
    """The adapter's scores, its eval loss and top-probability mean, and the baselines."""
    labels = sorted(objective.classes, key=objective.classes.__getitem__)
    true = [objective.classes[str(e.label)] for e in held_out]
    was_training = model.training
    model.eval()
    batch_size = config.evaluation.batch_size
    try:
        probs = probabilities(model, held_out, batch_size, pad_id)
        metrics = scores(probs.argmax(-1).tolist(), true, labels)
        metrics["eval_loss"] = objective.eval_loss(model, held_out, batch_size, pad_id)
        metrics["mean_top_probability"] = float(probs.max(-1).values.mean())
        majority = Counter(objective.classes[str(e.label)] for e in train).most_common(1)[0][0]
        probe = linear_probe(
            model,
            train,
            held_out,
            objective.classes,
            objective.weight,
            batch_size,
            pad_id,
            config.training.seed,
        )
        metrics["baselines"] = {
            "majority": {
                k: v
                for k, v in scores([majority] * len(true), true, labels).items()
                if k != "confusion"
            }
            | {"label": labels[majority]},
            "linear_probe": scores(probe, true, labels),
        }
    finally:
        model.train(was_training)
    metrics["label_counts"] = {
        label: sum(1 for e in train if str(e.label) == label) for label in labels
    }
    return metrics
