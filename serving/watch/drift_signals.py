"""Drift signals: the statistics (PSI, Jensen-Shannon distance, shares) and the scoring of
one window against a baseline profile, with gating on the profile and the sample count.
What the signals mean and why their thresholds are what they are: serving/watch/drift.py."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from registry.profile import LENGTH_EDGES, SIGNALS, BaselineProfile
from serving.serve_config import ServeConfig

DEFAULT_THRESHOLDS: dict[str, float] = {
    "prompt_length": 0.25,
    "prompt_tokens": 0.2,
    "completion_length": 0.25,
    "length_stop_share": 0.5,
    "feedback": 0.25,
    "predicted_label": 0.25,
    "top_probability": 0.2,
}
EPSILON = 1e-4
"""Probability given to a histogram bin that is empty on one side only (PSI is infinite
otherwise)."""

Counts = npt.NDArray[np.float64]


def psi(expected: Sequence[float] | Counts, actual: Sequence[float] | Counts) -> float:
    """Population stability index of two histograms over the same bins (counts or shares)."""
    from scipy.special import rel_entr

    p, q = _shares(expected), _shares(actual)
    p, q = _shares(np.where(p == 0, EPSILON, p)), _shares(np.where(q == 0, EPSILON, q))
    # = scipy.stats.entropy(p, q) + scipy.stats.entropy(q, p), which normalize and sum
    # rel_entr the same way; called directly, its argument handling cost ~0.35 ms a call.
    return float(np.sum(rel_entr(p, q)) + np.sum(rel_entr(q, p)))


def js_distance(expected: Sequence[float] | Counts, actual: Sequence[float] | Counts) -> float:
    """Jensen-Shannon distance, base 2: 0 for equal distributions, 1 for disjoint ones."""
    from scipy.spatial.distance import jensenshannon

    return float(jensenshannon(_shares(expected), _shares(actual), base=2))


def _shares(counts: Sequence[float] | Counts) -> Counts:
    values = np.asarray(counts, dtype=np.float64)
    total = values.sum()
    if total <= 0:
        raise ValueError("a distribution needs at least one count")
    shares: Counts = values / total
    return shares


def token_counts(
    profile: BaselineProfile, prompts: Iterable[npt.NDArray[np.int32]]
) -> tuple[Counts, Counts]:
    """(baseline, live) counts over the profile's top ids plus a last "other" bin."""
    baseline = np.array([*profile.token_counts, profile.other_tokens], dtype=np.float64)
    arrays = list(prompts)
    flat = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int32)
    ids = np.asarray(profile.token_ids, dtype=np.int64)
    size = max(
        profile.vocab_size,
        int(flat.max()) + 1 if flat.size else 0,
        int(ids.max()) + 1 if ids.size else 0,
    )
    counts = np.bincount(flat, minlength=size)
    top = counts[ids].astype(np.float64)
    live = np.append(top, flat.size - top.sum())
    return baseline, live


@dataclass(frozen=True)
class DriftSettings:
    """The window bounds, gating and thresholds (set from ServeConfig)."""

    enabled: bool = True
    window: int = 500
    """Requests kept per version (the oldest leaves first)."""
    window_s: float = 3600.0
    """Seconds a request stays in the window."""
    min_samples: int = 50
    """Requests in the window before request signals are scored."""
    min_feedback: int = 20
    """Feedback ratings in the window before the feedback signal is scored."""
    max_versions: int = 256
    """Versions tracked at once; the least recently used one is dropped."""
    interval_s: float = 1.0
    """Seconds between background recomputations of changed windows."""
    thresholds: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_THRESHOLDS))

    @classmethod
    def from_config(cls, config: ServeConfig) -> DriftSettings:
        return cls(
            enabled=config.drift,
            window=config.drift_window,
            window_s=config.drift_window_s,
            min_samples=config.drift_min_samples,
            min_feedback=config.drift_min_feedback,
            thresholds={**DEFAULT_THRESHOLDS, **config.drift_thresholds},
        )


@dataclass(frozen=True)
class Signal:
    """One signal of one window: its score (None when not scored), why, and the
    distributions it compares (bins in the same order on both sides)."""

    name: str
    score: float | None
    status: str  # drifted | not drifted | not enough samples | no baseline
    threshold: float
    samples: int
    min_samples: int
    baseline: list[float] | None
    live: list[float]
    bins: list[int] | None = None  # length bin lower edges, or token ids (+ "other" last)
    labels: list[str] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "score": self.score,
            "status": self.status,
            "threshold": self.threshold,
            "samples": self.samples,
            "min_samples": self.min_samples,
            "baseline": self.baseline,
            "live": self.live,
            "bins": self.bins,
            "labels": self.labels,
        }


Request = tuple[float, npt.NDArray[np.int32], int, bool]
Classified = tuple[float, int, float]  # (time, predicted label index, its probability)


@dataclass(frozen=True)
class DriftWindow:
    """One version's drift samples over a period, with its baseline (None: no profile)."""

    requests: Sequence[Request]
    feedback: Sequence[float]
    profile: BaselineProfile | None
    classified: Sequence[Classified] = ()


CUT_LABELS = ["ended by itself", "cut by max_tokens"]
FEEDBACK_LABELS = ["score >= 0", "score < 0"]


def evaluate(
    requests: Sequence[Request],
    feedback: Sequence[float],
    profile: BaselineProfile | None,
    settings: DriftSettings,
    classified: Sequence[Classified] = (),
) -> dict[str, Signal]:
    """Every signal of one window against `profile` (None: no scores, only counts)."""
    n, rated = len(requests), len(feedback)
    labels = profile.labels if profile else None
    edges = list(profile.length_edges if profile else LENGTH_EDGES)
    cut = sum(1 for r in requests if r[3])
    negative = sum(1 for score in feedback if score < 0)
    judge = _Judge(profile is not None, settings)
    signals = [
        judge.histogram(
            "prompt_length",
            profile.prompt_length_counts if profile else None,
            _histogram([r[1].size for r in requests], edges),
            n,
            edges,
        ),
        judge.histogram(
            "completion_length",
            profile.completion_length_counts if profile else None,
            _histogram([r[2] for r in requests], edges),
            n,
            edges,
        ),
        judge.share("feedback", negative, rated, settings.min_feedback, FEEDBACK_LABELS),
        *_classifier_signals(judge, profile, classified),
    ]
    if labels is None:  # a classifier generates nothing to stop
        signals.append(judge.share("length_stop_share", cut, n, settings.min_samples, CUT_LABELS))
    else:
        empty = np.zeros(0)
        signals.append(judge.signal("length_stop_share", n, None, empty, lambda: 0.0))
    if profile is None:
        signals.append(judge.signal("prompt_tokens", n, None, np.zeros(0), lambda: 0.0))
    else:
        base, live = token_counts(profile, (r[1] for r in requests))
        ids = list(profile.token_ids)
        signals.append(
            judge.signal(
                "prompt_tokens",
                n,
                base,
                live,
                lambda: js_distance(base, live),
                bins=[*ids, -1],
            )
        )
    return {name: s for name in SIGNALS for s in signals if s.name == name}


def _classifier_signals(
    judge: _Judge, profile: BaselineProfile | None, classified: Sequence[Classified]
) -> list[Signal]:
    """predicted_label: PSI of the predicted labels against the training labels;
    top_probability: how far the mean probability of the predicted label fell below the
    held-out mean (0 when it did not). No baseline unless the profile is a classifier's."""
    labels = profile.labels if profile else None
    n = len(classified)
    if labels is None or profile is None or profile.label_counts is None:
        empty = np.zeros(0)
        return [
            judge.signal("predicted_label", n, None, empty, lambda: 0.0),
            judge.signal("top_probability", n, None, empty, lambda: 0.0),
        ]
    base = np.asarray(profile.label_counts, np.float64)
    predicted = np.asarray([c[1] for c in classified], dtype=np.int64)
    live: Counts = np.bincount(predicted, minlength=len(labels))[: len(labels)].astype(np.float64)
    expected = profile.mean_top_probability
    mean = float(np.mean([c[2] for c in classified])) if classified else 0.0
    return [
        judge.signal("predicted_label", n, base, live, lambda: psi(base, live), labels=labels),
        judge.signal(
            "top_probability",
            n,
            None if expected is None else np.array([expected]),
            np.array([mean]),
            lambda: max(0.0, (expected or 0.0) - mean),
            labels=["mean top probability"],
        ),
    ]


@dataclass(frozen=True)
class _Judge:
    """Gates a score on the baseline and the sample count, and compares it with its
    threshold."""

    has_profile: bool
    settings: DriftSettings

    def signal(
        self,
        name: str,
        samples: int,
        baseline: Counts | None,
        live: Counts,
        score: Callable[[], float],
        *,
        minimum: int | None = None,
        needs_baseline: bool = True,
        bins: list[int] | None = None,
        labels: list[str] | None = None,
    ) -> Signal:
        threshold = self.settings.thresholds[name]
        minimum = self.settings.min_samples if minimum is None else minimum
        value: float | None = None
        if not self.has_profile or (needs_baseline and baseline is None):
            status = "no baseline"
        elif samples < minimum:
            status = "not enough samples"
        else:
            value = score()
            status = "drifted" if value > threshold else "not drifted"
        base = None if baseline is None else baseline.tolist()
        return Signal(
            name, value, status, threshold, samples, minimum, base, live.tolist(), bins, labels
        )

    def histogram(
        self, name: str, baseline: list[int] | None, live: Counts, samples: int, edges: list[int]
    ) -> Signal:
        """A length histogram on the profile's bins, scored by PSI."""
        base = None if baseline is None else np.asarray(baseline, np.float64)

        def score() -> float:
            assert base is not None  # only called with a baseline
            return psi(base, live)

        return self.signal(name, samples, base, live, score, bins=edges)

    def share(self, name: str, hits: int, samples: int, minimum: int, labels: list[str]) -> Signal:
        live = np.array([samples - hits, hits], np.float64)
        return self.signal(
            name,
            samples,
            None,
            live,
            lambda: hits / samples,
            minimum=minimum,
            needs_baseline=False,
            labels=labels,
        )


def _histogram(lengths: list[int], edges: list[int]) -> Counts:
    """Counts per bin; bin i holds edges[i] <= length < edges[i + 1], the last is open."""
    if not lengths:
        return np.zeros(len(edges), np.float64)
    index = np.searchsorted(np.asarray(edges), np.asarray(lengths), side="right") - 1
    return np.bincount(np.maximum(index, 0), minlength=len(edges)).astype(np.float64)
