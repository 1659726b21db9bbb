"""Bad input (hf engine, tiny base): every case gets a 4xx naming the field and its bound,
never a 5xx; clients that leave free their request; the body size and concurrency limits
answer 413 and 503 before any route runs.

The validation cases run in process (conftest's `alpha_app`: the HTTP app over a real
Server; validation, error bodies and the upload limit are the app's own), and so does a
stream left before its first event (the ASGI calls by hand). Clients that hang up on a
socket, a 413 answered before the body is sent, and requests held open against
--max-concurrent-requests need real sockets and BentoML's /metrics: those run on
`lorafleet serve` (`bento`).
"""

from __future__ import annotations

import asyncio
import base64
import re
import select
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import httpx
import pytest

from serving.http.schemas import MAX_PROMPT_CHARS

Service = Any  # a server of conftest's `serve` or `serve_in_process`

MAX_CONCURRENT = 4
MAX_BODY = 4 * 1024 * 1024  # the default of --max-body-bytes


@pytest.fixture(scope="module")
def bento(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_base: Path,
    adapter_factory: Callable[..., Path],
    serve: Callable[..., AbstractContextManager[Service]],
    alpha_registry: Callable[..., dict[str, Path]],
) -> Iterator[Service]:
    home = tmp_path_factory.mktemp("bad-input") / "home"
    adapters = alpha_registry(home, tiny_base, adapter_factory)
    options = ("--max-len", "1024", "--max-tokens-limit", "512", "--no-canary-verdicts")
    limits = ("--max-concurrent-requests", str(MAX_CONCURRENT))
    # Its own BENTOML_HOME: BentoML keeps the metrics of every server in one directory
    # below it, and this module reads /metrics while other servers may be running.
    with pytest.MonkeyPatch.context() as env:
        env.setenv("BENTOML_HOME", str(home.parent / "bentoml"))
        with serve(home, tiny_base, adapters, *options, *limits) as running:
            yield running


def post(service: Service, body: bytes, content_type: str = "application/json") -> httpx.Response:
    return service.http.post(
        "/v1/completions", content=body, headers={"content-type": content_type}
    )


def refused(response: httpx.Response, status: int, param: str | None, *fragments: str) -> str:
    """The error message, after checking the status, the error shape and the fragments."""
    assert response.status_code == status, response.text[:500]
    error = response.json()["error"]
    assert error["code"] == status and error["param"] == param, error
    for fragment in fragments:
        assert fragment in error["message"], (fragment, error["message"][:500])
    return str(error["message"])


def metric(service: Service, name: str, **labels: str) -> float:
    """Sum of the samples of one metric whose labels include `labels`."""
    total = 0.0
    for line in service.http.get("/metrics").text.splitlines():
        match = re.fullmatch(rf"{name}(?:\{{(.*)\}})? (\S+)", line)
        if match and all(f'{k}="{v}"' in (match.group(1) or "") for k, v in labels.items()):
            total += float(match.group(2))
    return total


def wait_for(condition: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


# ---- in process: the HTTP app over a real Server ------------------------------------------


def test_a_1mb_prompt_is_refused_naming_the_field_and_its_limit(alpha_app: Service) -> None:
    body = {"model": "alpha", "prompt": "a" * 1_000_000}
    response = alpha_app.http.post("/v1/completions", json=body)
    refused(response, 422, "prompt", f"prompt: String should have at most {MAX_PROMPT_CHARS}")
    # Within MAX_PROMPT_CHARS but over max_len tokens: 400 naming max_len.
    body["prompt"] = "word " * 2000
    refused(alpha_app.http.post("/v1/completions", json=body), 400, None, "exceeds max_len 1024")


def test_out_of_range_sampling_fields_name_field_and_bound(alpha_app: Service) -> None:
    cases = [
        ({"max_tokens": 513}, 400, None, "max_tokens 513 > 512, the limit of this server"),
        ({"max_tokens": -1}, 422, "max_tokens", "greater than or equal to 0"),
        ({"max_tokens": 0}, 400, "max_tokens", "0 is only valid with echo"),
        ({"temperature": -0.5}, 422, "temperature", "greater than or equal to 0"),
        ({"temperature": 2.5}, 422, "temperature", "less than or equal to 2"),
        ({"seed": 2**64}, 422, "seed", "less than or equal to 9223372036854775807"),
        ({"seed": -1}, 422, "seed", "greater than or equal to 0"),
        ({"colour": "red"}, 400, "colour", "unrecognized request argument(s): colour"),
        ({"tools": [{"type": "function"}]}, 400, "tools", "unrecognized request argument(s)"),
        ({"suffix": "and so on"}, 400, "suffix", "suffix: not supported by lorafleet"),
        ({"model": "alpha@¹"}, 400, None, "version must be an integer >= 1"),
        ({"model": "@¹"}, 400, None, "version must be an integer >= 1"),
    ]
    for extra, status, param, fragment in cases:
        body = {"model": "alpha", "prompt": "x", **extra}
        refused(alpha_app.http.post("/v1/completions", json=body), status, param, fragment)


def test_admin_bodies_out_of_range_name_the_field(alpha_app: Service) -> None:
    huge = alpha_app.admin("/admin/promote", {"adapter": "alpha", "version": 2**63})
    refused(
        huge, 422, "version", "version: Input should be less than or equal to 9223372036854775807"
    )
    assert alpha_app.served("alpha")[0] == "alpha@1"


def test_nan_and_infinity_in_raw_json_are_refused(alpha_app: Service) -> None:
    for field, value in (("temperature", b"NaN"), ("top_p", b"NaN"), ("temperature", b"Infinity")):
        body = b'{"model": "alpha", "prompt": "x", "%s": %s}' % (field.encode(), value)
        refused(post(alpha_app, body), 422, field, f"{field}: Input should be a finite number")


def test_invalid_utf8_and_deep_nesting_are_4xx_naming_the_body(alpha_app: Service) -> None:
    invalid = b'{"model": "alpha", "prompt": "caf\xe9"}'
    refused(post(alpha_app, invalid), 400, None, "body: not valid UTF-8 at byte 33")
    deep = b"[" * 10_000 + b"]" * 10_000
    refused(post(alpha_app, deep), 400, None, "body: JSON nested too deeply")
    inside = b'{"model": "alpha", "prompt": ' + b"[" * 10_000 + b"]" * 10_000 + b"}"
    refused(post(alpha_app, inside), 400, None, "nested too deeply")
    refused(post(alpha_app, b'{"model": '), 422, "body", "body: invalid JSON at character 10")
    assert alpha_app.served("alpha")[0] == "alpha@1"  # and the server goes on serving


def test_empty_messages_and_empty_prompt(alpha_app: Service) -> None:
    chat = alpha_app.http.post("/v1/chat/completions", json={"model": "alpha", "messages": []})
    refused(chat, 422, "messages", "messages: List should have at least 1 item")
    bad_role = {"model": "alpha", "messages": [{"role": "robot", "content": "hi"}]}
    robot = alpha_app.http.post("/v1/chat/completions", json=bad_role)
    refused(robot, 422, "messages[0].role", "'user'")
    missing = alpha_app.http.post("/v1/completions", json={"model": "alpha"})
    refused(missing, 422, "prompt", "prompt: Field required")
    empty = alpha_app.http.post("/v1/completions", json={"model": "alpha", "prompt": ""})
    refused(empty, 400, None, "prompt is empty after tokenization")


def test_wrong_content_type_names_the_expected_one(alpha_app: Service) -> None:
    body = b'{"model": "alpha", "prompt": "x"}'
    refused(post(alpha_app, body, "text/plain"), 422, "body", "Content-Type: application/json")
    refused(post(alpha_app, b"model=alpha", "application/x-www-form-urlencoded"), 422, "body")
    refused(alpha_app.http.get("/v1/completions"), 405, None, "GET /v1/completions")
    assert alpha_app.http.get("/v1/nothing").status_code == 404  # no such route


def test_an_adapter_upload_is_bounded_by_the_adapter_limit_not_the_body_limit(
    alpha_app: Service,
) -> None:
    files = {"adapter_config.json": base64.b64encode(b"{" * (MAX_BODY + 1)).decode()}
    upload = alpha_app.admin("/admin/adapters/big", {"files": files})
    assert upload.status_code == 422, upload.text[:500]  # judged as an adapter: invalid config
    assert "--max-body-bytes" not in upload.text


def test_a_stream_left_before_its_first_event_is_freed(home: Path, tiny_base: Path) -> None:
    """The client is gone when the response starts and sending the headers yields, so
    Starlette's disconnect watcher cancels the response before its event generator ever
    runs: the request must still be cancelled and leave nothing in flight."""
    from serving.http.app import GenerationStream
    from serving.http.openai_request import completion_plan
    from serving.http.schemas import CompletionRequest
    from serving.runtime.server import Server
    from serving.serve_config import ServeConfig

    server = Server(ServeConfig(base=tiny_base, home=home, drift=False, request_log=False))
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        await asyncio.sleep(0)  # as uvicorn's does while the socket's writes are paused
        sent.append(message)

    async def leave() -> None:
        body = CompletionRequest(model="base", prompt="The customer sends", max_tokens=64)
        plan = completion_plan(body)
        (generation,) = await server.start(plan.choices, chat=False, session=None)
        assert server.in_flight == 1
        stream = GenerationStream(server, plan, [generation], headers={})
        await stream({"type": "http", "asgi": {"spec_version": "2.3"}}, receive, send)
        assert generation.finish_reason == "cancelled" and server.in_flight == 0

    try:
        asyncio.run(leave())
        assert not any(m.get("body") for m in sent)  # not one event was produced
    finally:
        server.close()


# ---- on `lorafleet serve`: real sockets, BentoML's /metrics -------------------------------


def raw_request(service: Service, head: str, body: bytes = b"") -> socket.socket:
    """A connected socket that has sent `head` (request line and headers) and `body`."""
    port = int(service.url.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
    return sock


def stream_head(length: int) -> str:
    return (
        "POST /v1/completions HTTP/1.1\nHost: test\nContent-Type: application/json\n"
        f"Content-Length: {length}\n"
    )


def test_clients_that_leave_mid_stream_free_their_request(bento: Service) -> None:
    before = metric(bento, "lorafleet_requests_total", adapter="alpha")
    body = {"model": "alpha", "prompt": "The customer sends", "max_tokens": 512, "stream": True}
    body |= {"temperature": 1.0, "seed": 7}
    for _ in range(3):  # leave after the first event
        with bento.http.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            first = next(response.iter_lines())
            assert first.startswith("data: {")
    raw = httpx.Request("POST", "/v1/completions", json=body)
    for _ in range(5):  # leave right after sending, before reading anything
        sock = raw_request(bento, stream_head(len(raw.content)), raw.content)
        sock.close()
    # Every request ends (cancelled, or finished before the disconnect was seen) and
    # leaves nothing in flight; the server goes on serving.
    wait_for(lambda: metric(bento, "lorafleet_requests_total", adapter="alpha") == before + 8)
    wait_for(lambda: metric(bento, "lorafleet_queue_depth") == 0)
    assert bento.served("alpha")[0] == "alpha@1"


def test_a_body_over_the_limit_gets_413_naming_limit_and_flag(bento: Service) -> None:
    too_big = b"x" * (MAX_BODY + 1)
    message = refused(post(bento, too_big), 413, None, f"of {MAX_BODY + 1} bytes exceeds")
    assert f"{MAX_BODY} bytes" in message and "--max-body-bytes" in message

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted while it arrives
        for _ in range(5):
            yield b"x" * (1024 * 1024)

    chunked = bento.http.post("/v1/completions", content=chunks())
    refused(chunked, 413, None, f"over {MAX_BODY} bytes", "--max-body-bytes")
    # Refused from the header alone: the server answers before any of the body is sent.
    sock = raw_request(bento, stream_head(50 * 1024 * 1024))
    with sock:
        answer = sock.recv(65536).decode()
    assert answer.startswith("HTTP/1.1 413"), answer
    # A body just within the limit is read and judged on its content.
    within = b'{"model": "alpha", "prompt": "' + b"a" * (MAX_BODY - 100) + b'"}'
    refused(post(bento, within), 422, "prompt", str(MAX_PROMPT_CHARS))


def test_requests_over_the_concurrency_limit_get_503_until_one_ends(bento: Service) -> None:
    def probe() -> int:  # cheap, and a JSON answer leaves nothing in flight once it is read
        return int(bento.http.get("/v1/models").status_code)

    held: list[socket.socket] = []

    def hold() -> None:
        """MAX_CONCURRENT requests in flight: clients that sent a part of their body. One
        that arrived while a probe was in flight was refused (503): replace it."""
        for sock in [s for s in held if select.select([s], [], [], 0)[0]]:
            held.remove(sock)
            sock.close()
        while len(held) < MAX_CONCURRENT:
            held.append(raw_request(bento, stream_head(1000), b'{"model": '))

    try:
        wait_for(lambda: hold() is None and probe() == 503)
        response = bento.http.post("/v1/completions", json={"model": "alpha", "prompt": "x"})
        message = refused(response, 503, None, f"{MAX_CONCURRENT} requests are in flight")
        assert "--max-concurrent-requests" in message
        assert response.headers["Retry-After"] == "1"
        assert not any(select.select([s], [], [], 0)[0] for s in held)  # all still held
        # Admin calls and probes are not counted against the limit.
        assert bento.admin("/admin/residency").status_code == 200
        assert bento.http.get("/metrics").status_code == 200
        held.pop().close()  # one client gives up: its request ends and frees its place
        wait_for(lambda: probe() == 200)
        assert bento.served("alpha")[0] == "alpha@1"  # with the other clients still held
    finally:
        for sock in held:
            sock.close()
    wait_for(lambda: probe() == 200)
    assert bento.served("alpha")[0] == "alpha@1"
