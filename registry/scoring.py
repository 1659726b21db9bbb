"""Text metrics of completion tasks, shared by the tuning run's evaluation
(tuning/evaluation.py) and the server's shadow comparison of two versions' outputs
(serving/runtime/shadow.py): exact match and token F1 after whitespace normalization."""

from __future__ import annotations

from collections import Counter


def normalize(text: str) -> str:
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize(prediction) == normalize(reference))


def token_f1(prediction: str, reference: str) -> float:
    """F1 over whitespace tokens (SQuAD style, case-sensitive)."""
    pred, ref = normalize(prediction).split(), normalize(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)
