"""Live drift statistics: how far each adapter version's traffic has moved from the prompts
it was trained on.

Per adapter version the server keeps one sliding window, bounded by count (`--drift-window`
requests, default 500) and by time (`--drift-window-s`, default 3600 s), of the requests that
finished (stop or length; cancelled and failed requests are left out): prompt token ids,
completion length, whether the completion was cut by max_tokens, and the feedback scores
given to that version's responses. The window is compared with the version's baseline
profile (registry/profile.py, written by the tuning run) on five signals:

=================  ===========================================================  =========
signal             score                                                        threshold
=================  ===========================================================  =========
prompt_length      PSI of the prompt-length histogram (profile's fixed bins)    0.25
prompt_tokens      Jensen-Shannon distance (base 2, in [0, 1]) of the prompt    0.2
                   token distribution: the profile's top ids + one "other" bin
completion_length  PSI of the completion-length histogram                       0.25
length_stop_share  share of completions stopped by max_tokens                   0.5
feedback           share of negative (< 0) feedback scores                      0.25
=================  ===========================================================  =========

PSI = sum (p - q) ln(p / q) = KL(p||q) + KL(q||p), computed with scipy's relative entropy
(``scipy.special.rel_entr``, summed: what ``scipy.stats.entropy(p, q) + entropy(q, p)``
computes, without that wrapper's 0.35 ms of argument handling per call; the tests check the
two agree). A bin empty on one side would make it infinite, so an empty bin gets probability
EPSILON = 1e-4 before both sides are renormalized (bins empty on both sides add nothing): two
histograms with no bin in common score 2 ln(1/EPSILON) ~ 18.4.

Thresholds and why:

- PSI 0.25 is the usual "significant shift" line of credit scoring (< 0.1 stable, 0.1-0.25
  moderate, > 0.25 significant). The length bins are powers of two, so a shift has to move
  prompts into another octave to count; in-distribution windows of 50 example prompts scored
  0.000 (each task's prompts fall into one octave).
- JS distance 0.2, set by measurement: windows of 50 eval prompts of each example task
  (examples/data/*/eval.jsonl, tiny base tokenizer) against a profile of the task's train
  prompts scored at most 0.095 (sentiment), 0.104 (topic), 0.104 (arithmetic) over 200
  random windows each (means 0.054-0.068); windows of another task's prompts scored at least
  0.578 (sentiment <-> topic) and 0.939 (to or from arithmetic). 0.2 is about 2x the
  in-distribution maximum and a third of the smallest full shift; a window with a quarter of
  another task's prompts scored 0.16-0.59, half of them 0.29-0.76. Sampling noise grows with
  the number of distinct tokens in the prompts: for broad prompts raise --drift-min-samples
  (the noise falls roughly as 1/sqrt(samples)) or the threshold.
- length_stop_share 0.5: training completions end with eos, so a healthy adapter stops by
  itself; when more than half of its completions are cut by max_tokens it no longer ends its
  answers as trained (or clients ask for fewer tokens than its answers take).
- feedback 0.25: one rated response in four rated negative. Feedback is sparse, so it has its
  own minimum count (--drift-min-feedback, default 20).

A score is exported only when the window holds at least --drift-min-samples requests
(default 50; feedback: --drift-min-feedback ratings); below that its gauge is absent, so a
small window never alarms. Versions without a profile (the base model, adapters registered
without one) get window sample counts and no scores.

Cost: `record` runs on the event loop when a request ends and costs O(prompt tokens) (the
ids are copied into an int32 array); scores are computed by a background thread about once a
second, only for windows that changed, and by `scores` / `report` on demand. Profiles are
read once per version and cached. Memory: 4 bytes per prompt token in a window.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from registry import Registry
from registry.errors import LorafleetError
from registry.profile import LENGTH_EDGES, BaselineProfile
from serving.config import ServeConfig
from serving.metrics import DRIFT_SCORE, DRIFT_THRESHOLD, DRIFT_WINDOW_SAMPLES

logger = logging.getLogger(__name__)

SIGNALS = ("prompt_length", "prompt_tokens", "completion_length", "length_stop_share", "feedback")
DEFAULT_THRESHOLDS: dict[str, float] = {
    "prompt_length": 0.25,
    "prompt_tokens": 0.2,
    "completion_length": 0.25,
    "length_stop_share": 0.5,
    "feedback": 0.25,
}
EPSILON = 1e-4
"""Probability given to a histogram bin that is empty on one side only (PSI is infinite
otherwise)."""

Key = tuple[str, str]  # (adapter, version) as metric labels; the base model is ("base", "0")
ProfileLoader = Callable[[str, int], BaselineProfile | None]
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


@dataclass
class Window:
    """One version's recent requests and feedback, oldest first."""

    # (monotonic time, prompt ids, completion tokens, stopped by max_tokens)
    requests: deque[tuple[float, npt.NDArray[np.int32], int, bool]]
    feedback: deque[tuple[float, float]]  # (monotonic time, score)
    generation: int = 0  # bumped on every change; results are cached per generation
    result: dict[str, Signal] | None = None
    result_generation: int = -1

    def evict(self, now: float, window_s: float) -> None:
        cutoff = now - window_s
        evicted = False
        while self.requests and self.requests[0][0] < cutoff:
            self.requests.popleft()
            evicted = True
        while self.feedback and self.feedback[0][0] < cutoff:
            self.feedback.popleft()
            evicted = True
        if evicted:
            self.generation += 1


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
CUT_LABELS = ["ended by itself", "cut by max_tokens"]
FEEDBACK_LABELS = ["score >= 0", "score < 0"]


def evaluate(
    requests: Sequence[Request],
    feedback: Sequence[float],
    profile: BaselineProfile | None,
    settings: DriftSettings,
) -> dict[str, Signal]:
    """Every signal of one window against `profile` (None: no scores, only counts)."""
    n, rated = len(requests), len(feedback)
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
        judge.share("length_stop_share", cut, n, settings.min_samples, CUT_LABELS),
        judge.share("feedback", negative, rated, settings.min_feedback, FEEDBACK_LABELS),
    ]
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


class Drift:
    """The windows of every tracked version, their scores and their gauges.

    Thread use: `record` and `add_feedback` are called on the event loop (cheap, never
    block on I/O); a background thread evicts by time, drops idle versions and recomputes
    changed windows about once a second; `scores`, `report` and `summary` may read a profile
    file on a version's first use, so call them off the event loop (asyncio.to_thread).
    """

    def __init__(self, settings: DriftSettings, profiles: ProfileLoader) -> None:
        self.settings = settings
        self._load_profile = profiles
        self._profiles: dict[Key, BaselineProfile | None] = {}
        self._windows: OrderedDict[Key, Window] = OrderedDict()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.clock: Callable[[], float] = time.monotonic  # seconds; tests move it
        if settings.enabled:
            import scipy.spatial.distance
            import scipy.special  # noqa: F401  imported here, not on the scoring thread's first run

            for name in SIGNALS:
                DRIFT_THRESHOLD.set((name,), settings.thresholds[name])
            self._thread = threading.Thread(target=self._run, name="drift", daemon=True)
            self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    # ---- event loop: one call per finished request or feedback ---------------------------

    def record(
        self,
        adapter: str,
        version: str,
        prompt_ids: Sequence[int],
        completion_tokens: int,
        length_stopped: bool,
    ) -> None:
        """Add one finished request to its version's window: O(prompt tokens)."""
        if not self.settings.enabled:
            return
        ids = np.array(prompt_ids, dtype=np.int32)
        now = self.clock()
        with self._lock:
            window = self._window((adapter, version))
            window.requests.append((now, ids, completion_tokens, length_stopped))
            window.evict(now, self.settings.window_s)
            window.generation += 1

    def add_feedback(self, adapter: str, version: str, score: float) -> None:
        """Add one feedback score to the window of the version that served the response."""
        if not self.settings.enabled:
            return
        now = self.clock()
        with self._lock:
            window = self._window((adapter, version))
            window.feedback.append((now, score))
            window.evict(now, self.settings.window_s)
            window.generation += 1

    def _window(self, key: Key) -> Window:
        """The window of `key`, made the most recently used (under the lock)."""
        window = self._windows.get(key)
        if window is not None:
            self._windows.move_to_end(key)
            return window
        size = self.settings.window
        window = self._windows[key] = Window(deque(maxlen=size), deque(maxlen=size))
        if len(self._windows) > self.settings.max_versions:
            oldest, _ = self._windows.popitem(last=False)
            self._forget(oldest)
        return window

    def _forget(self, key: Key) -> None:
        """Drop a version's gauges and profile (under the lock)."""
        self._profiles.pop(key, None)
        DRIFT_WINDOW_SAMPLES.remove(key)
        for name in SIGNALS:
            DRIFT_SCORE.remove((*key, name))

    # ---- off the event loop ------------------------------------------------------------

    def scores(self, adapter: str, version: int | str) -> dict[str, float | None]:
        """Current score of every signal of `adapter@version`; None where it is not scored
        (no baseline, fewer samples than the minimum, or the version is not tracked)."""
        return {n: s.score for n, s in self._evaluate((adapter, str(version))).items()}

    def report(self, adapter: str, version: int | str) -> dict[str, Any]:
        """Baseline and live distributions, score, threshold and status of every signal.
        The prompt_tokens bins are the profile's top token ids, -1 standing for "other"."""
        key = (adapter, str(version))
        signals = self._evaluate(key)
        return {
            "adapter": adapter,
            "version": int(version),
            "model": "base" if adapter == "base" else f"{adapter}@{version}",
            "baseline": signals["prompt_length"].baseline is not None,
            "samples": signals["prompt_length"].samples,
            "feedback_samples": signals["feedback"].samples,
            "window": self.settings.window,
            "window_s": self.settings.window_s,
            "signals": {name: s.to_dict() for name, s in signals.items()},
        }

    def summary(self) -> list[dict[str, Any]]:
        """Samples and scores of every tracked version, most recently used last."""
        with self._lock:
            keys = list(self._windows)
        out = []
        for adapter, version in keys:
            signals = self._evaluate((adapter, version))
            out.append(
                {
                    "adapter": adapter,
                    "version": int(version),
                    "samples": signals["prompt_length"].samples,
                    "feedback_samples": signals["feedback"].samples,
                    "scores": {n: s.score for n, s in signals.items()},
                    "drifted": [n for n, s in signals.items() if s.status == "drifted"],
                }
            )
        return out

    def update(self) -> None:
        """Evict by time, drop versions whose window emptied, recompute changed windows and
        export their gauges."""
        now = self.clock()
        with self._lock:
            for key, window in list(self._windows.items()):
                window.evict(now, self.settings.window_s)
                if not window.requests and not window.feedback:
                    del self._windows[key]
                    self._forget(key)
            changed = [k for k, w in self._windows.items() if w.result_generation != w.generation]
        for key in changed:
            signals = self._evaluate(key)
            with self._lock:
                if key not in self._windows:
                    continue  # dropped meanwhile: its gauges stay removed
                DRIFT_WINDOW_SAMPLES.set(key, signals["prompt_length"].samples)
                for name, s in signals.items():
                    if s.score is None:
                        DRIFT_SCORE.remove((*key, name))
                    else:
                        DRIFT_SCORE.set((*key, name), s.score)

    def _run(self) -> None:
        while not self._stop.wait(self.settings.interval_s):
            try:
                self.update()
            except Exception:  # keep scoring the other versions; the traceback is logged
                logger.exception("drift update failed")

    def _evaluate(self, key: Key) -> dict[str, Signal]:
        with self._lock:
            window = self._windows.get(key)
            if window is not None:
                window.evict(self.clock(), self.settings.window_s)
                if window.result_generation == window.generation:
                    assert window.result is not None
                    return window.result
                generation = window.generation
                requests = list(window.requests)
                feedback = [score for _, score in window.feedback]
        if window is None:
            return evaluate([], [], self._profile(key), self.settings)
        signals = evaluate(requests, feedback, self._profile(key), self.settings)
        with self._lock:
            if generation > window.result_generation:
                window.result, window.result_generation = signals, generation
        return signals

    def _profile(self, key: Key) -> BaselineProfile | None:
        """The version's baseline, read once (None: the base model or no profile)."""
        if key in self._profiles:
            return self._profiles[key]
        adapter, version = key
        if adapter == "base":
            return None
        try:
            profile = self._load_profile(adapter, int(version))
        except LorafleetError as err:  # e.g. registry busy: try again on the next update
            logger.warning("drift baseline of %s@%s not read: %s", adapter, version, err)
            return None
        with self._lock:
            if key in self._windows:  # untracked versions (admin look-ups) are not cached
                self._profiles[key] = profile
        return profile


def registry_profiles(registry: Registry) -> ProfileLoader:
    """Profile loader reading `drift_profile` of a version's metadata inside its artifact;
    None (logged) when the version has none or it cannot be read."""

    def load(adapter: str, version: int) -> BaselineProfile | None:
        record = registry.get_version(adapter, version)
        name = record.metadata.get("drift_profile")
        if not name:
            return None
        if not isinstance(name, str) or Path(name).name != name:
            logger.warning("%s: drift_profile %r is not a file name; no scores", record.ref, name)
            return None
        path = registry.artifact_path(record, verify=False) / name
        try:
            return BaselineProfile.load(path)
        except (OSError, ValueError) as err:
            logger.warning("%s: drift profile %s unreadable (%s); no scores", record.ref, path, err)
            return None

    return load
