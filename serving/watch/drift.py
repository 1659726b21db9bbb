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
predicted_label    classifiers: PSI of the predicted labels against the         0.25
                   training labels (profile's label_counts)
top_probability    classifiers: drop of the mean probability of the predicted   0.2
                   label below the held-out evaluation's mean (0 if none)
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

This module holds the windows, the gauges and the background thread; the statistics and
the scoring of one window are in serving/watch/drift_signals.py.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from registry import Registry
from registry.errors import LorafleetError
from registry.names import version_model
from registry.profile import SIGNALS, BaselineProfile
from serving.metrics import DRIFT_SCORE, DRIFT_THRESHOLD, DRIFT_WINDOW_SAMPLES
from serving.watch.drift_signals import (
    DEFAULT_THRESHOLDS,
    EPSILON,
    Classified,
    DriftSettings,
    DriftWindow,
    Request,
    Signal,
    evaluate,
    js_distance,
    psi,
    token_counts,
)

__all__ = [
    "DEFAULT_THRESHOLDS",
    "EPSILON",
    "SIGNALS",
    "Drift",
    "DriftSettings",
    "Signal",
    "evaluate",
    "js_distance",
    "psi",
    "registry_profiles",
    "token_counts",
]
logger = logging.getLogger(__name__)

Key = tuple[str, str]  # (adapter, version) as metric labels; the base model is ("base", "0")
ProfileLoader = Callable[[str, int], BaselineProfile | None]


@dataclass
class Window:
    """One version's recent requests and feedback, oldest first."""

    # (monotonic time, prompt ids, completion tokens, stopped by max_tokens)
    requests: deque[Request]
    feedback: deque[tuple[float, float]]  # (monotonic time, score)
    classified: deque[Classified]  # a classifier's predictions: (time, label, probability)
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
        while self.classified and self.classified[0][0] < cutoff:
            self.classified.popleft()
            evicted = True
        if evicted:
            self.generation += 1


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

    def record_classified(
        self,
        adapter: str,
        version: str,
        prompt_ids: Sequence[int],
        label: int,
        probability: float,
    ) -> None:
        """Add one classified text: its prompt (the request signals) and its prediction."""
        if not self.settings.enabled:
            return
        ids = np.array(prompt_ids, dtype=np.int32)
        now = self.clock()
        with self._lock:
            window = self._window((adapter, version))
            window.requests.append((now, ids, 0, False))
            window.classified.append((now, label, probability))
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
        window = Window(deque(maxlen=size), deque(maxlen=size), deque(maxlen=size))
        self._windows[key] = window
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

    def since(self, adapter: str, version: int | str, start: float) -> DriftWindow:
        """The version's samples at or after `start` (unix s) with its baseline: a canary's
        drift criteria compare two versions over the same period. Off the event loop."""
        key = (adapter, str(version))
        cutoff = self.clock() - (time.time() - start)
        with self._lock:
            window = self._windows.get(key)
            requests = [r for r in window.requests if r[0] >= cutoff] if window else []
            feedback = [s for at, s in window.feedback if at >= cutoff] if window else []
            classified = [c for c in window.classified if c[0] >= cutoff] if window else []
        return DriftWindow(requests, feedback, self._profile(key), classified)

    def report(self, adapter: str, version: int | str) -> dict[str, Any]:
        """Baseline and live distributions, score, threshold and status of every signal.
        The prompt_tokens bins are the profile's top token ids, -1 standing for "other"."""
        key = (adapter, str(version))
        signals = self._evaluate(key)
        return {
            "adapter": adapter,
            "version": int(version),
            "model": version_model(adapter, version),
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
                classified = list(window.classified)
        if window is None:
            return evaluate([], [], self._profile(key), self.settings)
        signals = evaluate(requests, feedback, self._profile(key), self.settings, classified)
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
