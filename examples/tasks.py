"""Synthetic tasks for the examples: `python examples/tasks.py [--out examples/data]`.

Three completion tasks whose answers cannot be confused: a sentiment label
(positive/negative), a topic label (sports/food/travel/music) and a sum of two numbers;
and the sentiment task's reviews as a classification task (`text`, `label`: the rows of
the sentiment task, same seed). Each is generated from its own seed, so the files are the
same on every machine.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from pathlib import Path

POSITIVE = "great wonderful tasty friendly lovely excellent perfect fresh amazing pleasant".split()
NEGATIVE = "awful terrible bland rude dirty slow broken stale horrible noisy".split()
THINGS = "food service room staff coffee pizza hotel screen battery music".split()
TOPICS = {
    "sports": "match goal team coach player score league ball".split(),
    "food": "pizza soup bread salad cheese pasta rice cake".split(),
    "travel": "flight hotel train beach ticket airport map tour".split(),
    "music": "song guitar album concert piano band drum melody".split(),
}
Row = dict[str, str]


def sentiment(rng: random.Random) -> Row:
    positive = rng.random() < 0.5
    words = rng.sample(POSITIVE if positive else NEGATIVE, 2)
    things = rng.sample(THINGS, 2)
    review = f"the {things[0]} was {words[0]} and the {things[1]} was {words[1]}."
    return {
        "prompt": f"Review: {review}\nSentiment:",
        "completion": " positive" if positive else " negative",
    }


def sentiment_classes(rng: random.Random) -> Row:
    row = sentiment(rng)
    review = row["prompt"].removeprefix("Review: ").removesuffix("\nSentiment:")
    return {"text": review, "label": row["completion"].strip()}


def topic(rng: random.Random) -> Row:
    name = rng.choice(sorted(TOPICS))
    words = rng.sample(TOPICS[name], 3)
    return {
        "prompt": f"Text: we talked about the {', the '.join(words[:2])} and the {words[2]}."
        "\nTopic:",
        "completion": f" {name}",
    }


def arithmetic(rng: random.Random) -> Row:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    return {"prompt": f"Add: {a} + {b} =", "completion": f" {a + b}"}


TASKS: dict[str, tuple[int, Callable[[random.Random], Row]]] = {
    "sentiment": (1, sentiment),
    "topic": (2, topic),
    "arithmetic": (3, arithmetic),
    "sentiment-classes": (1, sentiment_classes),
}


def write_task(out: Path, name: str, train: int = 1000, held_out: int = 200) -> None:
    seed, make = TASKS[name]
    rng = random.Random(seed)
    rows = [make(rng) for _ in range(train + held_out)]
    (out / name).mkdir(parents=True, exist_ok=True)
    for split, part in (("train", rows[:train]), ("eval", rows[train:])):
        with (out / name / f"{split}.jsonl").open("w") as f:
            f.writelines(json.dumps(row) + "\n" for row in part)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "data")
    args = parser.parse_args()
    for name in TASKS:
        write_task(args.out, name)
        print(f"wrote {args.out / name}/train.jsonl and eval.jsonl")


if __name__ == "__main__":
    main()
