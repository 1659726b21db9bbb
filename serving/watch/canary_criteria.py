"""Canary criteria: every comparison of a canary with production is a pair of one-sided
statistical tests, so noise neither rolls back a good canary nor promotes a bad one by luck.
The samples come from serving/watch/canary_stats.py (and the drift windows, the shadow
pairs); serving/watch/canary.py acts on the result. The reference, with the measured
false-alarm rates, is docs/serving.md (Canary verdict).

Each criterion has an effect (how much worse the canary looks), a tolerance on it, a test
of "the canary is worse than production" (p) and one of "the canary is within the
tolerance" (p_within). It reads fail (effect beyond the tolerance and p < its alpha), pass
(p_within < its alpha: a canary passes on evidence, never because a few samples failed to
show a difference), inconclusive (fewer samples than the minimum on a side, or neither test
significant yet: keep collecting) or skipped (nothing to compare; no part in the verdict).

- latency: median s/token canary / production <= canary_max_latency_ratio; Mann-Whitney U
  of canary > production, and of canary < tolerance x production.
- error_rate: rate increase <= canary_max_error_rate_increase; Fisher's exact (binomial
  against the allowed rate when production served nothing), and a binomial test of the
  canary's rate < production's + the increase.
- feedback: drop of the mean score <= canary_max_feedback_drop; Mann-Whitney U of canary <
  production, and of canary + drop > production.
- drift.SIGNAL: the canary's score over the period <= max(threshold, production's score
  over the same period); a bootstrap of both windows when it is above (a score within its
  limit passes as it is: resampling at every look would cost too much CPU).
- shadow: share of shadowed prompts whose outputs differ <= 1 - shadow_min_agreement;
  binomial tests above and below that share.

Minimum samples: latency and error rate need canary_min_requests on each side (fewer:
inconclusive); feedback canary_min_ratings ratings a side, shadow shadow_min_pairs pairs and
drift its own minimum (fewer: skipped).

False alarms: a canary is looked at when its requests reach canary_min_requests x 2^i (look
i = 0, 1, 2, ...), look i spending canary_alpha / ((i+1)(i+2)) (alpha/2, alpha/6, ...),
split over the k criteria tested (Bonferroni). The shares add up to canary_alpha, so a
canary no worse than production is rolled back with probability at most canary_alpha over
all its looks, however long it runs; tests/serving/test_canary_criteria.py measures it on
latencies recorded from a real server.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial

import numpy as np

from registry.loop_records import AdapterSettings
from registry.profile import CLASSIFIER_SIGNALS, GENERATION_SIGNALS
from serving.watch.canary_stats import Criterion, State, VersionStats
from serving.watch.drift_signals import DriftSettings, DriftWindow, evaluate

DRIFT_RESAMPLES = 400
"""Bootstrap resamples of a drift criterion (its smallest p-value is 1 / 401)."""
TINY = 1e-12  # equal within float rounding counts as within the tolerance


@dataclass(frozen=True)
class DriftInput:
    canary: DriftWindow
    production: DriftWindow | None
    settings: DriftSettings


@dataclass(frozen=True)
class ShadowPairs:
    """Shadowed prompts: how many were compared and on how many the outputs agreed."""

    pairs: int
    agreed: int
    mean_token_f1: float | None  # similarity of the outputs, completion data's task metric


# (statistic, p of "worse", p of "within the tolerance"), computed on demand; drift has no
# "within" test, and no "worse" one either while its score is within its limit
Tests = Callable[[], tuple[float | None, float | None, float | None]]


@dataclass(frozen=True)
class _Evidence:
    """What one criterion read, before its alpha is known."""

    name: str
    numbers: str  # the samples and the effect, e.g. "median s/token canary 0.012 vs ..."
    effect: float
    limit: float
    n: tuple[int, int]
    test: str
    tests: Tests
    too_few: str | None = None  # set: fewer samples than the minimum (inconclusive)
    meta: Mapping[str, object] | None = None


def _num(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _skipped(name: str, text: str) -> Criterion:
    return Criterion(name, "skipped", f"{name}: {text}: skipped")


def compare_stats(
    canary: VersionStats,
    production: VersionStats,
    settings: AdapterSettings,
    drift: DriftInput | None = None,
    shadow: ShadowPairs | None = None,
    *,
    look: int = 0,
) -> list[Criterion]:
    """Every criterion of look `look`, each tested at look_alpha(alpha, look) / (criteria
    tested)."""
    found: list[_Evidence | Criterion] = [
        _latency(canary, production, settings),
        _errors(canary, production, settings),
        _feedback(canary, production, settings),
        *(_drift(drift) if drift is not None else []),
    ]
    if shadow is not None or settings.shadow_share > 0:
        found.append(_shadow(shadow, settings))
    tested = sum(1 for f in found if isinstance(f, _Evidence))
    alpha = look_alpha(settings.canary_alpha, look) / max(tested, 1)
    return [f if isinstance(f, Criterion) else _judge(f, alpha) for f in found]


def look_of(requests: int, min_requests: int) -> int | None:
    """The look a canary with `requests` has reached: i for min_requests x 2^i <= requests <
    min_requests x 2^(i+1); None below min_requests."""
    if requests < min_requests:
        return None
    return (requests // min_requests).bit_length() - 1


def look_alpha(alpha: float, look: int) -> float:
    """The false-alarm rate look `look` spends: alpha / ((look + 1)(look + 2)), i.e. alpha/2,
    alpha/6, alpha/12, ... (they add up to alpha)."""
    return alpha / float((look + 1) * (look + 2))


def _judge(evidence: _Evidence, alpha: float) -> Criterion:
    worse = evidence.effect > evidence.limit + TINY
    compared = f"{evidence.numbers} {'>' if worse else '<='} {evidence.limit:.4g}"
    statistic: float | None = None
    p: float | None = None
    within: float | None = None
    test: str | None = None
    if evidence.too_few is not None:
        state: State = "inconclusive"
        text = f"{evidence.name}: {compared}: inconclusive ({evidence.too_few})"
    else:
        statistic, p, within = evidence.tests()
        test = evidence.test
        if worse and p is not None and p < alpha:
            state = "fail"
        elif within is not None and within < alpha:
            state = "pass"
        elif within is None and not worse:
            state = "pass"  # drift: a score within its limit passes as it is
        else:
            state = "inconclusive"
        stat = "" if statistic is None else f" {_num(statistic, 4 if abs(statistic) < 10 else 1)}"
        shown = "not resampled" if p is None else f"p {p:.3g}"
        shown += "" if within is None else f", within p {within:.3g}"
        text = f"{evidence.name}: {compared}; {test}{stat}, {shown} (alpha {alpha:.3g}): {state}"
    return Criterion(
        evidence.name,
        state,
        text,
        test=test,
        statistic=statistic,
        p_value=p,
        p_within=within,
        alpha=alpha,
        effect=evidence.effect,
        limit=evidence.limit,
        n=evidence.n,
        meta=dict(evidence.meta or {}),
    )


def _latency(
    canary: VersionStats, production: VersionStats, settings: AdapterSettings
) -> _Evidence | Criterion:
    c, p = canary.latencies, production.latencies
    if not p:
        return _skipped(
            "latency", f"no production latency samples in the period ({len(c)} on the canary)"
        )
    c_med, p_med = canary.median_s_per_token, production.median_s_per_token
    assert p_med is not None
    ratio = (c_med / p_med if p_med > 0 else math.inf) if c_med is not None else 0.0
    need = settings.canary_min_requests
    too_few = None
    if min(len(c), len(p)) < need:
        too_few = f"needs {need} latency samples per side"

    def tests() -> tuple[float | None, float, float | None]:
        from scipy.stats import mannwhitneyu

        worse = mannwhitneyu(c, p, alternative="greater")
        tolerated = [x * settings.canary_max_latency_ratio for x in p]
        within = mannwhitneyu(c, tolerated, alternative="less")
        return float(worse.statistic), float(worse.pvalue), float(within.pvalue)

    return _Evidence(
        "latency",
        f"median s/token canary {_num(c_med, 4)} vs production {p_med:.4f} "
        f"(n {len(c)} vs {len(p)}): ratio {ratio:.2f}",
        ratio,
        settings.canary_max_latency_ratio,
        (len(c), len(p)),
        "Mann-Whitney U",
        tests,
        too_few,
    )


def _errors(canary: VersionStats, production: VersionStats, settings: AdapterSettings) -> _Evidence:
    limit = settings.canary_max_error_rate_increase
    c_rate, p_rate = canary.error_rate or 0.0, production.error_rate or 0.0
    need = settings.canary_min_requests
    sides = [canary.requests] + ([production.requests] if production.requests else [])
    too_few = f"needs {need} requests per side" if min(sides) < need else None

    def tests() -> tuple[float | None, float, float | None]:
        from scipy.stats import binomtest, fisher_exact

        allowed = min(p_rate + limit, 1.0)
        within = (
            float(binomtest(canary.errors, canary.requests, allowed, alternative="less").pvalue)
            if allowed < 1.0
            else 0.0
        )
        if not production.requests:  # canary at weight 1: against the allowed rate
            found = binomtest(canary.errors, canary.requests, limit, alternative="greater")
            return None, float(found.pvalue), within
        table = [
            [canary.errors, canary.requests - canary.errors],
            [production.errors, production.requests - production.errors],
        ]
        odds, p = fisher_exact(table, alternative="greater")
        return float(odds), float(p), within

    return _Evidence(
        "error_rate",
        f"canary {c_rate:.3f} ({canary.errors}/{canary.requests}) vs production "
        f"{p_rate:.3f} ({production.errors}/{production.requests}): increase "
        f"{c_rate - p_rate:.3f}",
        c_rate - p_rate,
        limit,
        (canary.requests, production.requests),
        "Fisher's exact, odds ratio" if production.requests else "binomial vs the allowed rate",
        tests,
        too_few,
    )


def _feedback(
    canary: VersionStats, production: VersionStats, settings: AdapterSettings
) -> _Evidence | Criterion:
    c, p = canary.scores, production.scores
    need = settings.canary_min_ratings
    if min(len(c), len(p)) < need:
        return _skipped("feedback", f"{len(c)} vs {len(p)} ratings (needs {need} per side)")
    c_mean, p_mean = float(np.mean(c)), float(np.mean(p))

    def tests() -> tuple[float | None, float, float | None]:
        from scipy.stats import mannwhitneyu

        worse = mannwhitneyu(c, p, alternative="less")
        tolerated = [x + settings.canary_max_feedback_drop for x in c]
        within = mannwhitneyu(tolerated, p, alternative="greater")
        return float(worse.statistic), float(worse.pvalue), float(within.pvalue)

    return _Evidence(
        "feedback",
        f"mean score canary {c_mean:.3f} vs production {p_mean:.3f} (n {len(c)} vs "
        f"{len(p)}): drop {p_mean - c_mean:.3f}",
        p_mean - c_mean,
        settings.canary_max_feedback_drop,
        (len(c), len(p)),
        "Mann-Whitney U",
        tests,
    )


def _scores(window: DriftWindow, settings: DriftSettings) -> dict[str, float | None]:
    signals = evaluate(
        window.requests, window.feedback, window.profile, settings, window.classified
    )
    return {name: s.score for name, s in signals.items()}


def _drift(drift: DriftInput) -> list[_Evidence | Criterion]:
    """One criterion per drift signal: the canary's score against the larger of its
    threshold and production's score on the same period (a canary no further from its
    baseline than production is from its own is not worse)."""
    settings = drift.settings
    mine = _scores(drift.canary, settings)
    theirs = _scores(drift.production, settings) if drift.production is not None else {}
    n = (len(drift.canary.requests), len(drift.production.requests) if drift.production else 0)
    out: list[_Evidence | Criterion] = []
    profile = drift.canary.profile
    classifier = profile is not None and profile.labels is not None
    foreign = GENERATION_SIGNALS if classifier else CLASSIFIER_SIGNALS
    for signal, threshold in settings.thresholds.items():
        if signal in foreign:  # a signal of the other kind of adapter
            continue
        score, other = mine.get(signal), theirs.get(signal)
        name = f"drift.{signal}"
        if score is None:
            out.append(
                _skipped(name, f"canary not scored ({n[0]} requests; too few or no baseline)")
            )
            continue
        limit = threshold if other is None else max(threshold, other)
        out.append(
            _Evidence(
                name,
                f"canary {score:.3f} vs production {_num(other)} (threshold {threshold:g}; "
                f"n {n[0]} vs {n[1]}): {score:.3f}",
                score,
                limit,
                n,
                f"bootstrap of {DRIFT_RESAMPLES} resamples",
                partial(_drift_tests, drift, signal, threshold, score > limit + TINY),
                meta={"canary_score": score, "production_score": other, "threshold": threshold},
            )
        )
    return out


def _drift_tests(
    drift: DriftInput, signal: str, threshold: float, worse: bool
) -> tuple[None, float | None, None]:
    """Drift's "worse" p by resampling, only when its score is beyond its limit (a score
    within it passes without one)."""
    return None, _bootstrap(drift, signal, threshold) if worse else None, None


def _bootstrap(drift: DriftInput, signal: str, threshold: float) -> float:
    """p-value of "the canary's score on `signal` is above max(threshold, production's)":
    the share of resamples of both windows where it is not (with the +1 of an exact test)."""
    rng = np.random.default_rng(0)  # a verdict on the same samples is the same verdict
    settings = drift.settings

    def resample(window: DriftWindow) -> DriftWindow:
        pick = rng.integers(0, len(window.requests), len(window.requests))
        rated = rng.integers(0, len(window.feedback), len(window.feedback))
        predicted = rng.integers(0, len(window.classified), len(window.classified))
        return DriftWindow(
            [window.requests[i] for i in pick],
            [window.feedback[i] for i in rated],
            window.profile,
            [window.classified[i] for i in predicted],
        )

    not_worse = 0
    for _ in range(DRIFT_RESAMPLES):
        score = _scores(resample(drift.canary), settings).get(signal)
        other = (
            _scores(resample(drift.production), settings).get(signal)
            if drift.production is not None and drift.production.requests
            else None
        )
        limit = threshold if other is None else max(threshold, other)
        if score is None or score <= limit:
            not_worse += 1
    return (1 + not_worse) / (1 + DRIFT_RESAMPLES)


def _shadow(shadow: ShadowPairs | None, settings: AdapterSettings) -> _Evidence | Criterion:
    need = settings.shadow_min_pairs
    pairs = shadow.pairs if shadow else 0
    if pairs < need:
        return _skipped("shadow", f"{pairs} shadowed prompts (needs {need})")
    assert shadow is not None
    differ = pairs - shadow.agreed
    allowed = 1.0 - settings.shadow_min_agreement

    def tests() -> tuple[float | None, float, float | None]:
        from scipy.stats import binomtest

        worse = binomtest(differ, pairs, allowed, alternative="greater").pvalue
        within = binomtest(differ, pairs, allowed, alternative="less").pvalue if allowed < 1 else 0
        return None, float(worse), float(within)

    f1 = "" if shadow.mean_token_f1 is None else f", token F1 {shadow.mean_token_f1:.3f}"
    return _Evidence(
        "shadow",
        f"outputs agree on {shadow.agreed}/{pairs} prompts{f1}: differ {differ / pairs:.3f}",
        differ / pairs,
        allowed,
        (pairs, pairs),
        "binomial vs the allowed share",
        tests,
        meta={"agreed": shadow.agreed, "mean_token_f1": shadow.mean_token_f1},
    )
