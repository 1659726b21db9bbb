"""The drift baseline profile: what a version's training prompts looked like.

Written by a tuning run into the adapter directory as `profile.json`, stored with the
version, read by the server, which builds the same histograms over live traffic and compares
them (PSI for the length histograms, Jensen-Shannon distance for token frequencies). The
bin edges are fixed here, for both sides, so the two histograms always line up.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

PROFILE_FILE = "profile.json"
# Token-length bins: [0,1) [1,2) [2,4) [4,8) ... [8192,16384) [16384, inf).
LENGTH_EDGES: tuple[int, ...] = (0, 1, *(2**i for i in range(1, 15)))
DEFAULT_TOP_TOKENS = 1000
# The drift signals a server scores for each version: the first four against this profile,
# feedback against a share of negative ratings (serving/watch/drift.py). Listed here because
# the server's config (--drift-threshold SIGNAL=VALUE) and the drift windows both name them.
# A classifier's versions add the predicted-label distribution and its mean top probability.
SIGNALS = (
    "prompt_length",
    "prompt_tokens",
    "completion_length",
    "length_stop_share",
    "feedback",
    "predicted_label",
    "top_probability",
)
CLASSIFIER_SIGNALS = ("predicted_label", "top_probability")  # a classifier's versions only
GENERATION_SIGNALS = ("completion_length", "length_stop_share")  # a generation adapter's only


def length_bin(length: int) -> int:
    """Index of the length bin holding `length` (the last bin is open-ended)."""
    for i in range(len(LENGTH_EDGES) - 1, -1, -1):
        if length >= LENGTH_EDGES[i]:
            return i
    raise ValueError(f"length {length} is negative")


def length_histogram(lengths: Iterable[int]) -> list[int]:
    counts = [0] * len(LENGTH_EDGES)
    for length in lengths:
        counts[length_bin(length)] += 1
    return counts


class BaselineProfile(BaseModel):
    """Histograms of the training prompts (and completions) of one adapter version."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    format: Literal["lorafleet.profile/1"] = "lorafleet.profile/1"
    samples: int = Field(ge=0)
    """Number of training examples profiled."""
    length_edges: list[int] = Field(default_factory=lambda: list(LENGTH_EDGES))
    """Lower edges of the token-length bins; the last bin is open-ended."""
    prompt_length_counts: list[int]
    """Examples per prompt-length bin."""
    completion_length_counts: list[int] | None = None
    """Examples per completion-length bin (completion and chat data), in tokens including
    the eos that ends each completion."""
    token_ids: list[int]
    """The most frequent prompt token ids, most frequent first."""
    token_counts: list[int]
    """Occurrences of each id in `token_ids`."""
    other_tokens: int = Field(ge=0)
    """Occurrences of all other token ids together."""
    vocab_size: int = Field(ge=1)
    """Size of the tokenizer's vocabulary."""
    labels: list[str] | None = None
    """A classifier's labels, in its head's order."""
    label_counts: list[int] | None = None
    """Training rows per label (a classifier)."""
    mean_top_probability: float | None = Field(None, ge=0, le=1)
    """Mean probability of the predicted label over the held-out rows (a classifier)."""

    @model_validator(mode="after")
    def _consistent(self) -> BaselineProfile:
        bins = len(self.length_edges)
        if len(self.prompt_length_counts) != bins:
            raise ValueError(f"prompt_length_counts needs {bins} bins")
        if self.completion_length_counts is not None and len(self.completion_length_counts) != bins:
            raise ValueError(f"completion_length_counts needs {bins} bins")
        if len(self.token_ids) != len(self.token_counts):
            raise ValueError("token_ids and token_counts differ in length")
        if (self.labels is None) != (self.label_counts is None) or (
            self.labels is not None and len(self.labels) != len(self.label_counts or [])
        ):
            raise ValueError("labels and label_counts go together, one count per label")
        return self

    @property
    def total_tokens(self) -> int:
        return sum(self.token_counts) + self.other_tokens

    def save(self, directory: Path) -> Path:
        path = directory / PROFILE_FILE
        path.write_text(self.model_dump_json(indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: Path) -> BaselineProfile:
        return cls.model_validate(json.loads(path.read_text()))


def build_profile(
    prompts: Iterable[Sequence[int]],
    *,
    vocab_size: int,
    completion_lengths: Iterable[int] | None = None,
    top_tokens: int = DEFAULT_TOP_TOKENS,
    label_counts: dict[str, int] | None = None,
    mean_top_probability: float | None = None,
) -> BaselineProfile:
    """Profile tokenized prompts (and, if given, completion lengths; for a classifier, the
    training rows per label in head order and the held-out mean top probability)."""
    tokens: Counter[int] = Counter()
    lengths: list[int] = []
    for ids in prompts:
        lengths.append(len(ids))
        tokens.update(ids)
    # Ties broken by id so the same data gives the same file.
    top = sorted(tokens.items(), key=lambda item: (-item[1], item[0]))[:top_tokens]
    return BaselineProfile(
        samples=len(lengths),
        prompt_length_counts=length_histogram(lengths),
        completion_length_counts=(
            length_histogram(completion_lengths) if completion_lengths is not None else None
        ),
        token_ids=[t for t, _ in top],
        token_counts=[c for _, c in top],
        other_tokens=sum(tokens.values()) - sum(c for _, c in top),
        vocab_size=vocab_size,
        labels=list(label_counts) if label_counts is not None else None,
        label_counts=list(label_counts.values()) if label_counts is not None else None,
        mean_top_probability=mean_top_probability,
    )
