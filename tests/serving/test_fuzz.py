"""Generated requests (schemathesis, from the app's OpenAPI schema) against every route,
valid and invalid, with and without the admin key: no 5xx, and every 4xx says what was
wrong, naming the field of a 422.

All in process (conftest's `serve_in_process`: the HTTP app over a real Server and hf
engine, called through schemathesis's ASGI transport): validation, error bodies and status
codes are the app's own, so no `lorafleet serve` is started; the routes BentoML adds
(/readyz, /metrics) are not in the schema."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.generation import GenerationMode

from serving.http.app import app

Service = Any  # the server of conftest's `serve_in_process`

EXAMPLES = 15  # per route, mode and key: 19 routes x 2 x 2 x 15, less where fewer exist
MIN_REQUESTS = 500


@pytest.fixture(scope="module")
def service(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_base: Path,
    adapter_factory: Callable[..., Path],
    serve_in_process: Callable[..., AbstractContextManager[Service]],
    alpha_registry: Callable[..., dict[str, Path]],
) -> Iterator[Service]:
    home = tmp_path_factory.mktemp("fuzz") / "home"
    adapters = alpha_registry(home, tiny_base, adapter_factory)
    options = {"max_len": 128, "max_tokens_limit": 16, "canary_verdicts": False}
    with serve_in_process(home, tiny_base, adapters, **options) as running:
        yield running


def check_response(case: Any, response: Any, fields: set[str]) -> None:
    """No 5xx; a 4xx has the error shape with a message, and a 422 of request validation
    names its field (other 422s, e.g. an adapter refused by the registry, name the problem)."""
    where = f"{case.method} {case.path} {case.query or ''} {str(case.body)[:300]!r}"
    assert response.status_code < 500, (where, response.status_code, response.text[:500])
    if response.status_code < 400:
        return
    kind = str(response.headers.get("content-type", ""))  # a list in schemathesis
    assert "application/json" in kind, (where, response.status_code, response.text[:500])
    error = response.json()["error"]
    assert error["message"] and error["code"] == response.status_code, (where, error)
    if error["type"] == "invalid_request_error" and response.status_code == 422:
        param = error["param"]
        assert param and param in error["message"], (where, error)
        top = re.split(r"[.\[]", param)[0]
        sent = set(case.body) if isinstance(case.body, dict) else set()
        assert top in sent | set(case.query or {}) | fields | {"body"}, (where, error)


def schema_fields(raw: dict[str, Any]) -> set[str]:
    """Every body field and query parameter the schema defines."""
    fields = {p for s in raw["components"]["schemas"].values() for p in s.get("properties", {})}
    for route in raw["paths"].values():
        for operation in route.values():
            fields |= {p["name"] for p in operation.get("parameters", [])}
    return fields


def fuzz(
    operation: Any, mode: GenerationMode, headers: dict[str, str], examples: int
) -> Counter[int]:
    """`examples` derandomized cases of one route: status counts after checking each."""
    statuses: Counter[int] = Counter()
    fields = schema_fields(operation.schema.raw_schema)

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=examples,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def run(case: Any) -> None:
        response = case.call(headers=headers, timeout=60)
        statuses[response.status_code] += 1
        check_response(case, response, fields)

    try:
        run()
    except Unsatisfiable:  # a route without parameters or body has no invalid form
        assert mode is GenerationMode.NEGATIVE and not statuses
    return statuses


def test_generated_requests_get_no_5xx_and_4xx_name_the_field(service: Service) -> None:
    statuses = fuzz_every_route(service, EXAMPLES)
    assert sum(statuses.values()) >= MIN_REQUESTS, statuses


@pytest.mark.chaos
def test_ten_times_more_generated_requests(service: Service) -> None:
    """`make chaos`: about 7,000 requests, the same checks."""
    statuses = fuzz_every_route(service, 10 * EXAMPLES)
    assert sum(statuses.values()) >= 10 * MIN_REQUESTS, statuses


def fuzz_every_route(service: Service, examples: int) -> Counter[int]:
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)  # serving `service`'s Server
    operations = [result.ok() for result in schema.get_all_operations()]
    paths = {op.path for op in operations}
    assert {"/v1/completions", "/v1/chat/completions", "/admin/promote"} <= paths
    statuses: Counter[int] = Counter()
    admin = {"Authorization": f"Bearer {service.admin_key}"}
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            for headers in (admin, {}):
                statuses += fuzz(operation, mode, headers, examples)
    total = sum(statuses.values())
    print(f"{total} generated requests over {len(operations)} routes: {dict(statuses)}")
    assert statuses[422] > 0 and statuses[401] > 0 and statuses[200] > 0, statuses
    return statuses
