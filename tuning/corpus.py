"""Text the project generates for its offline base models: deterministic, no downloads.

The same sentences train the tiny models' tokenizer and serve as a small general-text
sample (e.g. for demos and for checking what an adapter costs outside its task).
"""

from __future__ import annotations

import random

SUBJECTS = [
    "the customer",
    "our team",
    "the model",
    "a new adapter",
    "the server",
    "every request",
    "the registry",
    "a support agent",
    "the invoice",
    "the database",
    "the training run",
    "each version",
    "the operator",
    "a user",
    "the scheduler",
    "the canary",
    "the report",
]
VERBS = [
    "reviews",
    "updates",
    "sends",
    "measures",
    "explains",
    "answers",
    "stores",
    "checks",
    "promotes",
    "rolls back",
    "loads",
    "evaluates",
    "counts",
    "routes",
    "summarises",
    "repairs",
]
OBJECTS = [
    "the order status",
    "a refund request",
    "the latency report",
    "three new tickets",
    "the weekly summary",
    "a short answer",
    "the error message",
    "the product manual",
    "a translation",
    "the shipping address",
    "the metrics",
    "a password reset",
    "the release notes",
    "two failing tests",
    "the monthly budget",
    "a friendly reply",
]
TAILS = [
    "before noon.",
    "in under a second.",
    "with care.",
    "again tomorrow.",
    "for the region.",
    "without errors.",
    "as planned.",
    "on every weekday.",
    "after the update.",
    "in detail.",
]
QUESTIONS = [
    ("What is {a} plus {b}?", "{a} plus {b} is {s}."),
    ("How many items are in {a} boxes of {b}?", "There are {p} items."),
    ("Spell the number {a}.", "The number is {a}."),
    ("Which is larger, {a} or {b}?", "{m} is larger."),
]


def sentences(count: int, seed: int = 0) -> list[str]:
    """`count` generated English sentences and Q&A lines, the same for the same seed."""
    rng = random.Random(seed)
    out: list[str] = []
    for _ in range(count):
        if rng.random() < 0.25:
            a, b = rng.randint(2, 99), rng.randint(2, 99)
            question, answer = rng.choice(QUESTIONS)
            values = {"a": a, "b": b, "s": a + b, "p": a * b, "m": max(a, b)}
            out.append(f"{question.format(**values)} {answer.format(**values)}")
        else:
            out.append(
                f"{rng.choice(SUBJECTS).capitalize()} {rng.choice(VERBS)} "
                f"{rng.choice(OBJECTS)} {rng.choice(TAILS)}"
            )
    return out


def paragraphs(count: int, seed: int = 0, per_paragraph: int = 6) -> list[str]:
    """`count` paragraphs of generated sentences."""
    lines = sentences(count * per_paragraph, seed)
    return [" ".join(lines[i : i + per_paragraph]) for i in range(0, len(lines), per_paragraph)]
