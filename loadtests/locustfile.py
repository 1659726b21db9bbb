"""Locust traffic against a running lorafleet server: many adapters, one base model.

Each user sends greedy (temperature 0) completions, and a share of chat completions, with
`model` set to one adapter of a list (or `base`), and checks every response: status 200,
the X-Lorafleet-Adapter-Version header present and naming the adapter asked for (`base`
for the base model, exactly NAME@VERSION when one was asked for), the body's `model` equal
to that header and no more completion tokens than max_tokens. Any other response counts as a
locust failure. Requests are named "<path> <model>", so the stats break down per adapter.

    locust -f loadtests/locustfile.py --headless -u 16 -r 8 -t 60s \
        --host http://127.0.0.1:3000 --adapters a0,a1,a2,base --shape zipf

Traffic shapes (--shape):
- uniform: each request picks an adapter uniformly; think time uniform in [0, --think-s].
- zipf: the k-th adapter of the list is picked with weight 1 / k**s (--zipf-s, e.g. 1.1),
  so the first adapters are hot and the tail is cold.
- bursty: all users send back to back for --burst-s, then stay quiet for --quiet-s, in step
  on the wall clock; adapters uniform. A burst asks for many adapters at once.

Churn (--churn-s N > 0, needs --api-key): one background greenlet (not a user), every N
seconds, moves the production alias of --churn-adapter: `POST /admin/promote` to
--churn-version, then `POST /admin/rollback` the next time, and so on. After each move it
sends one completion to that adapter and checks that the version the move reported serves
it (the server applies a move through its admin API before answering). Requests to that
adapter from the users may see either version.

Options (locust custom arguments; each has an environment variable):
  --adapters        LORAFLEET_ADAPTERS      comma list of models (NAME, NAME:ALIAS,
                                            NAME@VERSION or base); default base
  --shape           LORAFLEET_SHAPE         uniform | zipf | bursty; default uniform
  --zipf-s          LORAFLEET_ZIPF_S        Zipf exponent; default 1.1
  --max-tokens      LORAFLEET_MAX_TOKENS    max_tokens of each request; default 16
  --temperature     LORAFLEET_TEMPERATURE   sampling temperature; default 0 (greedy)
  --chat-share      LORAFLEET_CHAT_SHARE    share of /v1/chat/completions; default 0.2
  --think-s         LORAFLEET_THINK_S       most think time between requests, s; default 0.5
  --burst-s         LORAFLEET_BURST_S       bursty: seconds of traffic; default 5
  --quiet-s         LORAFLEET_QUIET_S       bursty: seconds of quiet; default 10
  --churn-s         LORAFLEET_CHURN_S       seconds between alias moves; 0 = off (default)
  --churn-adapter   LORAFLEET_CHURN_ADAPTER adapter whose alias moves; default the first
  --churn-version   LORAFLEET_CHURN_VERSION version promoted; default 2
  --api-key         LORAFLEET_API_KEY       the server's --api-key (prefer the variable)

Locust runs this file under gevent's monkey-patching: it imports neither torch nor the
project's packages.
"""

from __future__ import annotations

import logging
import random
import sys
import time
from typing import Any

import gevent
from locust import FastHttpUser, events, task
from locust.contrib.fasthttp import FastHttpSession
from locust.env import Environment
from locust.runners import WorkerRunner

logger = logging.getLogger(__name__)

VERSION_HEADER = "X-Lorafleet-Adapter-Version"
# A request for a cold adapter may wait up to 30 s for a slot (serving/runtime/residency.py).
NETWORK_TIMEOUT_S = 120.0
# The server (uvicorn) closes a connection idle for 5 s. A POST sent on a pooled connection
# just as it closes fails (HTTPConnectionClosed) and is not retried (POST is not idempotent),
# so whoever is about to wait this long first closes its idle connections.
IDLE_CLOSE_S = 1.0
SHAPES = ("uniform", "zipf", "bursty")
PROMPTS = (
    "The weather report for the coast says",
    "Our support team answers questions about",
    "Write one sentence about the river that",
    "A short note to the team: the release",
    "The recipe needs two cups of flour and",
    "In the first chapter the author explains",
    "Customer asked whether the order can be",
    "The museum opens at nine and the guide",
)


@events.init_command_line_parser.add_listener
def add_arguments(parser: Any) -> None:
    parser.add_argument(
        "--adapters",
        env_var="LORAFLEET_ADAPTERS",
        default="base",
        help="comma list of models: NAME, NAME:ALIAS, NAME@VERSION or base",
    )
    parser.add_argument(
        "--shape",
        env_var="LORAFLEET_SHAPE",
        choices=SHAPES,
        default="uniform",
        help="uniform | zipf | bursty",
    )
    parser.add_argument(
        "--zipf-s",
        env_var="LORAFLEET_ZIPF_S",
        type=float,
        default=1.1,
        help="Zipf exponent of --shape zipf",
    )
    parser.add_argument(
        "--max-tokens",
        env_var="LORAFLEET_MAX_TOKENS",
        type=int,
        default=16,
        help="max_tokens of each request",
    )
    parser.add_argument(
        "--temperature",
        env_var="LORAFLEET_TEMPERATURE",
        type=float,
        default=0.0,
        help="sampling temperature (0: greedy)",
    )
    parser.add_argument(
        "--chat-share",
        env_var="LORAFLEET_CHAT_SHARE",
        type=float,
        default=0.2,
        help="share of requests sent to /v1/chat/completions",
    )
    parser.add_argument(
        "--think-s",
        env_var="LORAFLEET_THINK_S",
        type=float,
        default=0.5,
        help="most think time between a user's requests, seconds",
    )
    parser.add_argument(
        "--burst-s",
        env_var="LORAFLEET_BURST_S",
        type=float,
        default=5.0,
        help="--shape bursty: seconds of traffic per cycle",
    )
    parser.add_argument(
        "--quiet-s",
        env_var="LORAFLEET_QUIET_S",
        type=float,
        default=10.0,
        help="--shape bursty: seconds of quiet per cycle",
    )
    parser.add_argument(
        "--churn-s",
        env_var="LORAFLEET_CHURN_S",
        type=float,
        default=0.0,
        help="seconds between promote/rollback of --churn-adapter (0: off)",
    )
    parser.add_argument(
        "--churn-adapter",
        env_var="LORAFLEET_CHURN_ADAPTER",
        default="",
        help="adapter whose production alias moves (default: the first)",
    )
    parser.add_argument(
        "--churn-version",
        env_var="LORAFLEET_CHURN_VERSION",
        type=int,
        default=2,
        help="version --churn promotes",
    )
    parser.add_argument(
        "--api-key",
        env_var="LORAFLEET_API_KEY",
        default="",
        is_secret=True,
        help="the server's admin key (prefer $LORAFLEET_API_KEY)",
    )


def adapter_of(model: str) -> str:
    """The adapter name of a `model` field (`base` for the base model)."""
    return model.partition("@")[0].partition(":")[0]


def churn_adapter(options: Any) -> str:
    names = [adapter_of(m) for m in models(options) if m != "base"]
    return str(options.churn_adapter or (names[0] if names else ""))


def models(options: Any) -> list[str]:
    return [m.strip() for m in str(options.adapters).split(",") if m.strip()]


def problems(options: Any) -> list[str]:
    """Every invalid option at once."""
    found = []
    if not models(options):
        found.append("--adapters is empty; name at least one model (or base)")
    if options.max_tokens < 1:
        found.append(f"--max-tokens {options.max_tokens} < 1")
    if not 0.0 <= options.chat_share <= 1.0:
        found.append(f"--chat-share {options.chat_share} is outside [0, 1]")
    if options.think_s < 0:
        found.append(f"--think-s {options.think_s} < 0")
    if options.shape == "zipf" and options.zipf_s <= 0:
        found.append(f"--zipf-s {options.zipf_s} <= 0; use e.g. 1.1")
    if options.shape == "bursty" and (options.burst_s <= 0 or options.quiet_s < 0):
        found.append(f"--burst-s {options.burst_s} / --quiet-s {options.quiet_s}: need > 0 / >= 0")
    if options.churn_s < 0:
        found.append(f"--churn-s {options.churn_s} < 0; 0 turns churn off")
    if options.churn_s > 0 and not options.api_key:
        found.append("--churn-s needs the server's admin key: set LORAFLEET_API_KEY")
    if options.churn_s > 0 and not churn_adapter(options):
        found.append("--churn-s needs an adapter: name one in --adapters or --churn-adapter")
    return found


@events.init.add_listener
def check_options(environment: Environment, **_: Any) -> None:
    options = environment.parsed_options
    if options is None:  # run as a library without a command line
        return
    found = problems(options)
    if found:
        print("locustfile: " + "; ".join(found), file=sys.stderr)
        sys.exit(2)


def status_problem(response: Any) -> str:
    """A non-200 response: its status and error body, or the connection error (status 0)."""
    if response.status_code == 0:
        return f"no response: {response.error!r}"
    return f"status {response.status_code}: {(response.text or '')[:200]}"


def check(response: Any, model: str, max_tokens: int) -> str | None:
    """What is wrong with one completion response (None: nothing)."""
    if response.status_code != 200:
        return status_problem(response)
    served = response.headers.get(VERSION_HEADER)
    if not served:
        return f"no {VERSION_HEADER} header"
    adapter, _, version = served.partition("@")
    wanted = adapter_of(model)
    if model == "base" and served != "base":
        return f"asked for base, served by {served}"
    if model != "base" and (adapter != wanted or not version.isdigit()):
        return f"asked for {model}, served by {served}"
    if "@" in model and served != model:
        return f"asked for {model}, served by {served}"
    try:
        body = response.json()
        tokens = int(body["usage"]["completion_tokens"])
        choices = body["choices"]
        body_model = body["model"]
    except (ValueError, KeyError, TypeError) as err:
        return f"malformed body ({type(err).__name__}: {err}): {(response.text or '')[:200]}"
    if body_model != served:
        return f"body model {body_model!r} != {VERSION_HEADER} {served!r}"
    if len(choices) != 1 or tokens > max_tokens:
        return f"{len(choices)} choices, {tokens} completion tokens (max_tokens {max_tokens})"
    return None


class LorafleetUser(FastHttpUser):
    """One client: a completion or chat request, then think time (or the bursty pattern)."""

    network_timeout = NETWORK_TIMEOUT_S

    def on_start(self) -> None:
        options = self.environment.parsed_options
        self.options = options
        self.models = models(options)
        if options.shape == "zipf":
            self.weights = [1.0 / (k**options.zipf_s) for k in range(1, len(self.models) + 1)]
        else:
            self.weights = [1.0] * len(self.models)

    def wait_time(self) -> float:
        wait = self.next_wait()
        if wait >= IDLE_CLOSE_S:
            self.client.client.close()
        return wait

    def next_wait(self) -> float:
        options = self.options
        if options.shape != "bursty":
            return random.uniform(0.0, options.think_s)
        cycle = options.burst_s + options.quiet_s
        phase = (time.time() - STARTED[0]) % cycle
        if phase < options.burst_s:
            return 0.0
        # Until the next burst starts; a little jitter so the burst is not one instant.
        return cycle - phase + random.uniform(0.0, 0.05)

    @task
    def complete(self) -> None:
        model = random.choices(self.models, self.weights)[0]
        max_tokens = self.options.max_tokens
        body: dict[str, Any] = {
            "model": model,
            "max_tokens": max_tokens,
            "temperature": self.options.temperature,
        }
        prompt = random.choice(PROMPTS)
        if random.random() < self.options.chat_share:
            path = "/v1/chat/completions"
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            path = "/v1/completions"
            body["prompt"] = prompt
        with self.client.post(
            path, json=body, name=f"{path} {model}", catch_response=True
        ) as response:
            wrong = check(response, model, max_tokens)
            if wrong:
                response.failure(wrong)
            else:
                response.success()


# ---- churn --------------------------------------------------------------------------------

STARTED = [time.time()]  # when the test started; bursty users keep in step with it
CHURN: list[gevent.Greenlet] = []


def churn(environment: Environment) -> None:
    """Alternate promote / rollback of one adapter's production alias, forever."""
    options = environment.parsed_options
    adapter = churn_adapter(options)
    session = FastHttpSession(
        environment.host, environment.events.request, None, network_timeout=NETWORK_TIMEOUT_S
    )
    headers = {"Authorization": f"Bearer {options.api_key}"}
    promote_next = True
    while True:
        session.client.close()  # see IDLE_CLOSE_S
        gevent.sleep(options.churn_s)
        if promote_next:
            path, body = "/admin/promote", {"adapter": adapter, "version": options.churn_version}
        else:
            path, body = "/admin/rollback", {"adapter": adapter}
        body["reason"] = "load test churn"
        with session.post(path, json=body, headers=headers, catch_response=True) as response:
            if response.status_code != 200:
                response.failure(status_problem(response))
                continue
            move = response.json()
            response.success()
        # A promote that changed nothing (already there) has nothing to roll back.
        promote_next = not (promote_next and move["changed"])
        verify_move(session, adapter, move["version"], options.max_tokens)


def verify_move(session: FastHttpSession, adapter: str, version: int, max_tokens: int) -> None:
    """The first request after a move must be served by the version the move reported."""
    body = {"model": adapter, "prompt": PROMPTS[0], "max_tokens": max_tokens, "temperature": 0}
    name = "/v1/completions after alias move"
    with session.post("/v1/completions", json=body, name=name, catch_response=True) as response:
        wrong = check(response, adapter, max_tokens)
        served = response.headers.get(VERSION_HEADER) if response.headers else None
        if wrong is None and served != f"{adapter}@{version}":
            wrong = f"the alias moved to {adapter}@{version}, but {served} served"
        if wrong:
            response.failure(wrong)
        else:
            response.success()


@events.test_start.add_listener
def start_churn(environment: Environment, **_: Any) -> None:
    STARTED[0] = time.time()
    options = environment.parsed_options
    # One churn loop per test: on the master (or the only process), never on workers.
    if options is None or options.churn_s <= 0 or isinstance(environment.runner, WorkerRunner):
        return
    logger.info("alias churn of %s every %.1f s", churn_adapter(options), options.churn_s)
    CHURN.append(gevent.spawn(churn, environment))


@events.test_stop.add_listener
def stop_churn(**_: Any) -> None:
    while CHURN:
        CHURN.pop().kill()
