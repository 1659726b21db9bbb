"""The canary criteria as statistical tests: each state on known samples (numbers checked
against scipy), the Bonferroni split, drift on the same period by bootstrap, the shadow
criterion; then whole simulated canaries drawn from latencies recorded on a real server
(tests/serving/data/canary_samples.json, recorded by loadtests/canary_samples.py): an A/A
canary is rarely rolled back, a slower or failing one nearly always is."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy import stats

from registry.loop_records import AdapterSettings
from registry.profile import build_profile
from serving.watch.canary_criteria import (
    DriftInput,
    ShadowPairs,
    compare_stats,
    look_alpha,
    look_of,
)
from serving.watch.canary_stats import Comparison, Decision, VersionStats
from serving.watch.drift_signals import DriftSettings, DriftWindow

SAMPLES_FILE = Path(__file__).parent / "data" / "canary_samples.json"
SAMPLES = json.loads(SAMPLES_FILE.read_text()) if SAMPLES_FILE.exists() else {}
NO_FEEDBACK = AdapterSettings(canary_min_requests=10)


def version(
    latencies: list[float], errors: int = 0, scores: tuple[float, ...] = ()
) -> VersionStats:
    return VersionStats(len(latencies) + errors, errors, tuple(latencies), scores)


def by_name(criteria: list[Any]) -> dict[str, Any]:
    return {c.name: c for c in criteria}


def decide(
    canary: VersionStats, production: VersionStats, settings: AdapterSettings, look: int = 0
) -> Decision:
    criteria = compare_stats(canary, production, settings, look=look)
    return Comparison("a", 2, 1, "", 0.0, canary, production, criteria, None).verdict


# ---- each criterion on known samples ----------------------------------------------------------


def test_latency_worse_beyond_the_tolerance_and_significant_fails() -> None:
    rng = np.random.default_rng(1)
    slow = list(0.03 + 0.002 * rng.random(20))
    fast = list(0.01 + 0.002 * rng.random(20))
    found = by_name(compare_stats(version(slow), version(fast), NO_FEEDBACK))
    latency = found["latency"]
    expected = stats.mannwhitneyu(slow, fast, alternative="greater")
    assert latency.state == "fail"
    assert latency.statistic == pytest.approx(expected.statistic) == 400.0  # every pair slower
    assert latency.p_value == pytest.approx(expected.pvalue)
    assert latency.effect == pytest.approx(np.median(slow) / np.median(fast))
    # the first look spends alpha / 2, split with the error rate: 0.05 / 2 / 2
    assert latency.n == (20, 20) and latency.alpha == pytest.approx(0.0125)
    assert latency.text.startswith(
        f"latency: median s/token canary {np.median(slow):.4f} vs production "
        f"{np.median(fast):.4f} (n 20 vs 20): ratio {latency.effect:.2f} > 1.5; Mann-Whitney "
        "U 400.0, p "
    )
    within = stats.mannwhitneyu(slow, [x * 1.5 for x in fast], alternative="less").pvalue
    assert latency.p_within == pytest.approx(within) and within > 0.5
    assert latency.text.endswith(f", within p {within:.3g} (alpha 0.0125): fail")
    assert found["feedback"].state == "skipped"  # no ratings: not part of the verdict


def test_latency_passes_on_evidence_of_being_within_the_tolerance() -> None:
    base = [0.010 + 0.0001 * i for i in range(30)]
    slower = [x * 1.3 for x in base]
    latency = by_name(compare_stats(version(slower), version(base), NO_FEEDBACK))["latency"]
    assert latency.p_value < 0.001 and latency.effect == pytest.approx(1.3)  # slower, yes
    assert latency.p_within < 0.0125  # and significantly below 1.5 x production
    assert latency.state == "pass"
    # within the tolerance on its medians, but too noisy to show it: not a pass
    noisy = [0.002, 0.030, 0.004, 0.028, 0.006, 0.026, 0.008, 0.024, 0.010, 0.022]
    guess = by_name(compare_stats(version(noisy), version(noisy), NO_FEEDBACK))["latency"]
    assert guess.effect == 1.0 and guess.p_within > 0.0125
    assert guess.state == "inconclusive"


def test_latency_beyond_the_tolerance_but_not_significant_is_inconclusive() -> None:
    canary = [0.010, 0.011, 0.012, 0.030, 0.031, 0.032, 0.033, 0.034, 0.009, 0.008]
    production = [0.010, 0.011, 0.012, 0.013, 0.0135, 0.014, 0.015, 0.050, 0.060, 0.040]
    latency = by_name(compare_stats(version(canary), version(production), NO_FEEDBACK))["latency"]
    assert latency.effect == pytest.approx(0.021 / 0.01375)  # 1.53: the medians look worse
    assert latency.p_value == pytest.approx(0.797, abs=0.001)  # the samples do not say so
    assert latency.state == "inconclusive"
    assert decide(version(canary), version(production), NO_FEEDBACK) == "inconclusive"


def test_too_few_samples_is_inconclusive_and_no_production_traffic_is_skipped() -> None:
    settings = AdapterSettings(canary_min_requests=50)
    few = by_name(compare_stats(version([0.05] * 49), version([0.01] * 80), settings))
    assert few["latency"].state == "inconclusive" and few["latency"].p_value is None
    assert few["latency"].text.endswith("inconclusive (needs 50 latency samples per side)")
    assert few["error_rate"].state == "inconclusive"
    alone = by_name(compare_stats(version([0.05] * 60), VersionStats(0, 0), settings))
    assert alone["latency"].state == "skipped"
    assert alone["latency"].text == (
        "latency: no production latency samples in the period (60 on the canary): skipped"
    )


def test_error_rate_by_fishers_exact_and_binomial_without_production() -> None:
    canary, production = version([0.01] * 35, errors=5), version([0.01] * 60)
    errors = by_name(compare_stats(canary, production, NO_FEEDBACK))["error_rate"]
    _, p = stats.fisher_exact([[5, 35], [0, 60]], alternative="greater")
    assert errors.p_value == pytest.approx(p) and p < 0.0125
    assert (errors.effect, errors.state) == (pytest.approx(0.125), "fail")
    assert errors.text.startswith(
        "error_rate: canary 0.125 (5/40) vs production 0.000 (0/60): increase 0.125 > 0.02; "
        "Fisher's exact, odds ratio inf, p "
    )
    one_error = by_name(compare_stats(version([0.01] * 19, 1), production, NO_FEEDBACK))
    assert one_error["error_rate"].state == "inconclusive"  # 0.05 > 0.02, but p = 0.25
    alone = by_name(compare_stats(canary, VersionStats(0, 0), NO_FEEDBACK))["error_rate"]
    binomial = stats.binomtest(5, 40, 0.02, alternative="greater").pvalue
    assert alone.p_value == pytest.approx(binomial) and alone.state == "fail"
    assert alone.alpha == 0.025  # latency is skipped: the error rate is the only test
    clean = version([0.01] * 400)  # no errors: the within test of 0 errors in n is 0.98^n
    passed = by_name(compare_stats(clean, clean, NO_FEEDBACK))["error_rate"]
    assert passed.p_within == pytest.approx(0.98**400) and passed.state == "pass"
    short = by_name(compare_stats(version([0.01] * 100), clean, NO_FEEDBACK))["error_rate"]
    assert short.p_within == pytest.approx(0.98**100) and short.state == "inconclusive"


def test_feedback_by_mann_whitney_needs_its_minimum_of_ratings() -> None:
    settings = NO_FEEDBACK.model_copy(update={"canary_min_ratings": 10})
    bad, good = (-1.0,) * 6 + (0.0,) * 4, (1.0,) * 8 + (0.0,) * 2
    canary, production = version([0.01] * 20, scores=bad), version([0.01] * 20, scores=good)
    found = by_name(compare_stats(canary, production, settings))
    feedback = found["feedback"]
    expected = stats.mannwhitneyu(bad, good, alternative="less")
    assert (feedback.p_value, feedback.state) == (pytest.approx(expected.pvalue), "fail")
    assert feedback.effect == pytest.approx(0.8 - (-0.6))
    assert feedback.alpha == pytest.approx(0.025 / 3)
    few = version([0.01] * 20, scores=bad[:9])
    assert by_name(compare_stats(few, production, settings))["feedback"].text == (
        "feedback: 9 vs 10 ratings (needs 10 per side): skipped"
    )


def test_verdict_rolls_back_on_any_failure_promotes_when_every_tested_one_passes() -> None:
    steady = [0.010 + 0.00001 * i for i in range(400)]
    assert decide(version(steady), version(steady), NO_FEEDBACK) == "promoted"
    assert decide(version([x * 3 for x in steady]), version(steady), NO_FEEDBACK) == "rolled_back"
    assert decide(version(steady[:30]), version(steady), NO_FEEDBACK) == "inconclusive"


def test_looks_double_the_requests_and_spend_alpha_in_shares_that_add_up_to_it() -> None:
    assert [look_of(n, 10) for n in (9, 10, 19, 20, 39, 40, 80, 160)] == [
        None,
        0,
        0,
        1,
        1,
        2,
        3,
        4,
    ]
    assert [look_alpha(0.05, i) for i in range(3)] == [0.025, 0.05 / 6, 0.05 / 12]
    assert sum(look_alpha(0.05, i) for i in range(10_000)) == pytest.approx(0.05, rel=1e-3)
    steady = version([0.01] * 40)
    at_look_2 = by_name(compare_stats(steady, steady, NO_FEEDBACK, look=2))["latency"]
    assert at_look_2.alpha == pytest.approx(0.05 / 12 / 2)


# ---- drift over the same period, and shadow outputs -------------------------------------------

PROMPTS = [[5, 6, 7, 8], [5, 6, 9], [6, 7, 8, 9, 10]]


def window(prompts: list[list[int]], completion: int = 3) -> DriftWindow:
    profile = build_profile(PROMPTS * 10, vocab_size=64, completion_lengths=[2, 3, 3] * 10)
    requests = [(0.0, np.array(p, dtype=np.int32), completion, False) for p in prompts]
    return DriftWindow(requests, [], profile)


def test_drift_compares_the_canary_with_production_on_the_same_period() -> None:
    settings = DriftSettings(min_samples=30, interval_s=3600, enabled=False)
    same = window(PROMPTS * 12)
    shifted = window([[40, 41, 42, 43, 44, 45, 46, 47, 48]] * 36)
    steady = [0.01] * 20
    calm = compare_stats(
        version(steady), version(steady), NO_FEEDBACK, DriftInput(same, same, settings)
    )
    assert by_name(calm)["drift.prompt_tokens"].state == "pass"
    assert by_name(calm)["drift.prompt_tokens"].p_value is None  # within its limit: no resampling
    drifted = by_name(
        compare_stats(
            version(steady), version(steady), NO_FEEDBACK, DriftInput(shifted, same, settings)
        )
    )
    tokens = drifted["drift.prompt_tokens"]
    assert tokens.state == "fail" and tokens.p_value == pytest.approx(1 / 401)
    assert tokens.effect > 0.9 and tokens.limit == 0.2  # production is at 0: the threshold
    assert "bootstrap of 400 resamples" in tokens.text and tokens.n == (36, 36)
    assert drifted["drift.feedback"].state == "skipped"  # no ratings
    # production drifts as far on the same period: the canary is not worse than production
    both = by_name(
        compare_stats(
            version(steady), version(steady), NO_FEEDBACK, DriftInput(shifted, shifted, settings)
        )
    )
    assert both["drift.prompt_tokens"].state == "pass"


def test_a_classifier_canary_is_judged_on_its_predicted_labels() -> None:
    settings = DriftSettings(min_samples=30, interval_s=3600, enabled=False)
    profile = build_profile(
        PROMPTS * 10, vocab_size=64, label_counts={"neg": 15, "pos": 15}, mean_top_probability=0.9
    )

    def classified(labels: list[int], top: float) -> DriftWindow:
        requests = [(0.0, np.array(p, dtype=np.int32), 0, False) for p in PROMPTS * 12]
        return DriftWindow(requests, [], profile, [(0.0, label, top) for label in labels])

    balanced = classified([0, 1] * 18, 0.92)
    one_sided = classified([1] * 36, 0.6)
    steady = version([0.01] * 20)
    calm = by_name(
        compare_stats(steady, steady, NO_FEEDBACK, DriftInput(balanced, balanced, settings))
    )
    assert (
        calm["drift.predicted_label"].state == "pass"
        and calm["drift.top_probability"].state == "pass"
    )
    assert "drift.completion_length" not in calm and "drift.length_stop_share" not in calm
    shifted = by_name(
        compare_stats(steady, steady, NO_FEEDBACK, DriftInput(one_sided, balanced, settings))
    )
    assert shifted["drift.predicted_label"].state == "fail"  # all "pos", trained half and half
    assert shifted["drift.top_probability"].state == "fail"  # 0.6 against 0.9 held out
    generation = by_name(
        compare_stats(steady, steady, NO_FEEDBACK, DriftInput(window(PROMPTS * 12), None, settings))
    )
    assert "drift.predicted_label" not in generation and "drift.completion_length" in generation


def test_shadow_agreement_is_a_criterion_once_it_has_its_pairs() -> None:
    settings = NO_FEEDBACK.model_copy(
        update={"shadow_share": 0.2, "shadow_min_pairs": 20, "shadow_min_agreement": 0.5}
    )
    steady = version([0.01] * 20)
    few = by_name(compare_stats(steady, steady, settings, shadow=ShadowPairs(5, 0, 0.1)))
    assert few["shadow"].text == "shadow: 5 shadowed prompts (needs 20): skipped"
    agree = by_name(compare_stats(steady, steady, settings, shadow=ShadowPairs(40, 30, 0.9)))
    assert agree["shadow"].state == "pass"
    differ = by_name(compare_stats(steady, steady, settings, shadow=ShadowPairs(40, 5, 0.2)))
    p = stats.binomtest(35, 40, 0.5, alternative="greater").pvalue
    assert differ["shadow"].p_value == pytest.approx(p) and differ["shadow"].state == "fail"
    assert differ["shadow"].text.startswith(
        "shadow: outputs agree on 5/40 prompts, token F1 0.200: differ 0.875 > 0.5"
    )


# ---- whole canaries from recorded samples -------------------------------------------------


def pool(phase: str) -> list[float]:
    """Seconds per token of every recorded request of `phase`, both versions (A/A)."""
    found = SAMPLES["phases"][phase]
    return [s for rows in found.values() for s, _ in rows if s is not None]


def canary_run(
    rng: random.Random,
    canary: list[float],
    production: list[float],
    settings: AdapterSettings,
    *,
    error_rates: tuple[float, float] = (0.0, 0.0),
    weight: float = 0.5,
    max_canary_requests: int = 640,
) -> tuple[Decision, int]:
    """One canary as the server's check takes it: requests split by `weight`, a look each
    time the canary's requests reach the next look (canary_min_requests x 2^i), and at the
    max window (`max_canary_requests`) a last look; "inconclusive" if that is inconclusive
    too (canary_inconclusive then holds or rolls it back). With the canary's requests then."""
    sides: list[list[float]] = [[], []]
    errors = [0, 0]
    last = -1
    while True:
        side = 0 if rng.random() < weight else 1
        if rng.random() < error_rates[side]:
            errors[side] += 1
        else:
            sides[side].append(rng.choice(canary if side == 0 else production))
        served = len(sides[0]) + errors[0]
        expired = served >= max_canary_requests
        look = last + 1 if expired else look_of(served, settings.canary_min_requests)
        if look is not None and look > last:
            last = look
            mine, theirs = version(sides[0], errors[0]), version(sides[1], errors[1])
            verdict = decide(mine, theirs, settings, look)
            if verdict != "inconclusive" or expired:
                return verdict, served


DEMO = AdapterSettings(  # examples/demo.py's
    canary_min_requests=10, canary_window_s=2, canary_weight=0.5, canary_max_error_rate_increase=0.2
)
RUNS = 200


@pytest.mark.parametrize("phase", ["quiet", "cpu_hog_on_one_core"])
@pytest.mark.parametrize(
    ("settings", "errors"),
    [(DEMO, 0.0), (DEMO, 0.03), (AdapterSettings(), 0.0), (AdapterSettings(), 0.03)],
    ids=["demo", "demo-3pct-errors", "defaults", "defaults-3pct-errors"],
)
def test_aa_canaries_are_rarely_rolled_back(
    phase: str, settings: AdapterSettings, errors: float
) -> None:
    samples, rng = pool(phase), random.Random(7)
    runs = [
        canary_run(rng, samples, samples, settings, error_rates=(errors, errors))
        for _ in range(RUNS)
    ]
    verdicts = [v for v, _ in runs]
    rate = verdicts.count("rolled_back") / RUNS
    needed = [n for v, n in runs if v == "promoted"]
    print(
        f"\nA/A {phase}, min {settings.canary_min_requests} requests, errors {errors:.0%}: "
        f"false rollbacks {rate:.3f} ({verdicts.count('rolled_back')}/{RUNS}), promoted "
        f"{len(needed)} (median {np.median(needed) if needed else 0:.0f} canary requests), "
        f"inconclusive at 640 canary requests {verdicts.count('inconclusive')} "
        f"(alpha {settings.canary_alpha})"
    )
    assert rate <= settings.canary_alpha + 0.03


@pytest.mark.parametrize("phase", ["quiet", "cpu_hog_on_one_core"])
def test_really_worse_canaries_are_rolled_back(phase: str) -> None:
    samples, rng = pool(phase), random.Random(11)
    slower = [s * 2.0 for s in samples]
    slow = [canary_run(rng, slower, samples, DEMO)[0] for _ in range(RUNS)]
    # the demo tolerates an error rate 0.2 above production's: half the requests failing is
    # beyond it
    failing = [
        canary_run(rng, samples, samples, DEMO, error_rates=(0.5, 0.0))[0] for _ in range(RUNS)
    ]
    print(
        f"\n{phase}: 2x slower canaries rolled back {slow.count('rolled_back')}/{RUNS}, "
        f"50% errors {failing.count('rolled_back')}/{RUNS}"
    )
    assert slow.count("rolled_back") >= 0.95 * RUNS
    assert failing.count("rolled_back") >= 0.95 * RUNS
    assert "promoted" not in slow + failing
