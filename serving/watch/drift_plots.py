"""The drift plots of one version's report: a PNG per signal (baseline vs live shares per
bin, or the live share against its threshold; matplotlib Agg). Drawn for `lorafleet drift
report` (serving/cli/drift_report.py) and the dashboard (serving/http/dashboard.py)."""

from __future__ import annotations

import io
from typing import Any

from registry.profile import CLASSIFIER_SIGNALS, GENERATION_SIGNALS

TITLES = {
    "prompt_length": "Prompt length (tokens)",
    "prompt_tokens": "Prompt tokens (the baseline's most frequent ids + other)",
    "completion_length": "Completion length (tokens)",
    "length_stop_share": "Completions cut by max_tokens",
    "feedback": "Negative feedback",
    "predicted_label": "Predicted labels (a classifier)",
    "top_probability": "Mean probability of the predicted label (a classifier)",
}
KINDS = {
    "prompt_length": "PSI",
    "prompt_tokens": "Jensen-Shannon distance",
    "completion_length": "PSI",
    "length_stop_share": "share",
    "feedback": "share",
    "predicted_label": "PSI",
    "top_probability": "drop",
}
TOP_TOKENS = 20  # token bars drawn: the largest by baseline or live share
COLORS = {"baseline": "#4c72b0", "live": "#dd8452", "threshold": "#c44e52"}
VERDICTS = {
    "drifted": ("drifted", "#c44e52"),
    "not drifted": ("not drifted", "#55a868"),
    "not enough samples": ("not enough samples", "#8c8c8c"),
    "no baseline": ("no baseline profile", "#8c8c8c"),
}


def drawn(signals: dict[str, Any]) -> dict[str, Any]:
    """The signals of a report worth drawing: a classifier's (its profile names labels)
    without the completion signals, a generation version's without the classifier's."""
    classifier = bool(signals.get("predicted_label", {}).get("labels"))
    skip = GENERATION_SIGNALS if classifier else CLASSIFIER_SIGNALS
    return {name: signal for name, signal in signals.items() if name not in skip}


def plot_signal(name: str, signal: dict[str, Any]) -> bytes:
    """PNG of one signal: baseline vs live shares per bin, or the live share vs threshold."""
    from matplotlib.figure import Figure

    share = name in ("length_stop_share", "feedback", "top_probability")
    figure = Figure(figsize=(9.0, 2.0 if share else 3.6), dpi=100, layout="constrained")
    axes = figure.add_subplot()
    if name == "top_probability":
        _plot_mean(axes, signal)
    elif share:
        _plot_share(axes, signal)
    else:
        labels, baseline, live = _bars(name, signal)
        positions = list(range(len(labels)))
        width = 0.4
        if baseline is not None:
            axes.bar(
                [p - width / 2 for p in positions],
                baseline,
                width,
                label="baseline",
                color=COLORS["baseline"],
            )
        axes.bar(
            [p + width / 2 for p in positions], live, width, label="live", color=COLORS["live"]
        )
        axes.set_xticks(
            positions,
            labels,
            rotation=45 if name == "prompt_tokens" else 0,
            ha="right" if name == "prompt_tokens" else "center",
            fontsize=8,
        )
        axes.set_ylabel("share")
        axes.set_xlabel(
            {"prompt_tokens": "token", "predicted_label": "label"}.get(name, "length in tokens")
        )
        axes.legend()
    score = "not scored" if signal["score"] is None else f"{signal['score']:.3f}"
    verdict = VERDICTS.get(signal["status"], (signal["status"], ""))[0]
    axes.set_title(
        f"{TITLES.get(name, name)}: {KINDS.get(name, 'score')} {score}, "
        f"threshold {signal['threshold']:g}: {verdict}",
        fontsize=10,
    )
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _plot_mean(axes: Any, signal: dict[str, Any]) -> None:
    """The live mean top probability against the held-out evaluation's."""
    axes.barh(["live"], signal["live"], color=COLORS["live"], height=0.4)
    if signal["baseline"]:
        expected = signal["baseline"][0]
        axes.axvline(expected, color=COLORS["baseline"], label=f"held-out mean {expected:.3f}")
        axes.axvline(
            expected - signal["threshold"],
            color=COLORS["threshold"],
            linestyle="--",
            label=f"held-out mean - {signal['threshold']:g}",
        )
        axes.legend(loc="lower left")
    axes.set_xlim(0, 1)
    axes.set_xlabel(f"mean probability of the predicted label ({signal['samples']} texts)")


def _plot_share(axes: Any, signal: dict[str, Any]) -> None:
    total = sum(signal["live"])
    share = signal["live"][1] / total if total else 0.0
    axes.barh(["live"], [share], color=COLORS["live"], height=0.4)
    axes.axvline(
        signal["threshold"],
        color=COLORS["threshold"],
        linestyle="--",
        label=f"threshold {signal['threshold']:g}",
    )
    axes.set_xlim(0, 1)
    labels = signal.get("labels") or ["", "share"]
    axes.set_xlabel(f"share '{labels[1]}' ({signal['live'][1]:g} of {total:g})")
    axes.legend(loc="lower right")


def _bars(name: str, signal: dict[str, Any]) -> tuple[list[str], list[float] | None, list[float]]:
    """Labels and shares of the bins worth drawing: for lengths the span of non-empty bins,
    for tokens the TOP_TOKENS largest on either side plus "other"."""
    live = _normalize(signal["live"])
    baseline = _normalize(signal["baseline"]) if signal["baseline"] is not None else None
    either = [max(a, b) for a, b in zip(baseline or live, live, strict=True)]
    if name == "predicted_label":
        return signal["labels"], baseline, live
    if name == "prompt_tokens":
        names = signal.get("labels") or [str(b) for b in signal["bins"][:-1]] + ["other"]
        top = sorted(range(len(either) - 1), key=lambda i: -either[i])[:TOP_TOKENS]
        keep = [*sorted(top), len(either) - 1]
        labels = [repr(names[i]) if i < len(either) - 1 else "other" for i in keep]
    else:
        edges = signal["bins"]
        used = [i for i, v in enumerate(either) if v > 0] or [0]
        keep = list(range(max(0, used[0] - 1), min(len(edges), used[-1] + 2)))  # 1 bin margin
        labels = [_bin_label(edges, i) for i in keep]
    return (
        labels,
        [baseline[i] for i in keep] if baseline is not None else None,
        [live[i] for i in keep],
    )


def _bin_label(edges: list[int], i: int) -> str:
    if i + 1 == len(edges):
        return f">={edges[i]}"
    low, high = edges[i], edges[i + 1] - 1
    return str(low) if low == high else f"{low}-{high}"


def _normalize(counts: list[float]) -> list[float]:
    total = sum(counts)
    return [c / total for c in counts] if total else [0.0 for _ in counts]
