"""HTTP routes (FastAPI, mounted on the BentoML service): parse, call the server, map
errors to status codes. This is the only place that knows about HTTP."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from registry.errors import (
    AliasConflict,
    CorruptArtifact,
    DuplicateContent,
    InvalidAdapter,
    InvalidName,
    LorafleetError,
    NotFound,
    RegistryBusy,
)
from registry.problems import field_path
from serving.errors import (
    AdapterTooLarge,
    BadRequest,
    EngineStopped,
    NotServable,
    Overloaded,
    Unauthorized,
)
from serving.http.access import ADMIN_REFUSAL, KeyCheck, Keys, server_of
from serving.http.admin_routes import router as admin_router
from serving.http.dashboard import router as dashboard_router
from serving.http.error_body import error_body
from serving.http.limits import RequestLimits
from serving.http.openai_request import Plan, chat_plan, completion_plan, with_prompt
from serving.http.openai_response import sse, whole_body
from serving.http.schemas import (
    ChatCompletionRequest,
    ClassifyRequest,
    CompletionRequest,
    FeedbackRequest,
)
from serving.runtime.generation import Generation
from serving.runtime.server import Server

VERSION_HEADER = "X-Lorafleet-Adapter-Version"
# The registry revision of the alias map that resolved the request's model.
REVISION_HEADER = "X-Lorafleet-Revision"
SESSION_HEADER = "X-Session-Id"
STATUS: list[tuple[type[LorafleetError], int]] = [
    (NotFound, 404),
    (InvalidName, 400),
    (BadRequest, 400),
    (NotServable, 409),
    (AliasConflict, 409),
    (CorruptArtifact, 409),
    (DuplicateContent, 409),
    (InvalidAdapter, 422),  # every validation failure of an uploaded adapter
    (AdapterTooLarge, 413),
    (Overloaded, 503),
    (RegistryBusy, 503),
    (EngineStopped, 503),
]

app = FastAPI(title="lorafleet", description="One base model, many LoRA adapters.")
app.add_middleware(RequestLimits)  # body size and requests in flight (serving/http/limits.py)


def _keys() -> Keys:
    server: Server | None = getattr(app.state, "server", None)
    if server is None:  # not started: admin refused, inference open
        return Keys(admin=None, inference=None)
    return Keys(admin=server.config.api_key, inference=server.config.inference_key)


app.add_middleware(KeyCheck, keys=_keys)  # outermost: 401 before limits, routing or body
app.include_router(dashboard_router)  # /dashboard and its /admin/dashboard data
app.include_router(admin_router)  # /admin/* (serving/http/admin_routes.py)


def error_response(status: int, message: str, kind: str, param: str | None = None) -> JSONResponse:
    headers = {"Retry-After": "1"} if status == 503 else None
    return JSONResponse(
        error_body(status, message, kind, param), status_code=status, headers=headers
    )


@app.exception_handler(RequestValidationError)
async def invalid_request(request: Request, err: RequestValidationError) -> JSONResponse:
    """422 naming each offending field (`messages[0].content: ...`) and its bound."""
    problems = list(err.errors())
    content_type = request.headers.get("content-type", "")
    described = [_problem(p, content_type) for p in problems[:10]]
    messages = [text for _, text in described]
    if len(problems) > 10:
        messages.append(f"and {len(problems) - 10} more problems")
    param = described[0][0] if described else None
    return error_response(422, "; ".join(messages), "invalid_request_error", param)


def _field(loc: Any) -> str:
    """`messages[0].content` for the loc ("body", "messages", 0, "content"); `model` for
    the query parameter ("query", "model")."""
    parts = list(loc)
    if len(parts) > 1 and parts[0] in ("body", "query", "path"):
        parts = parts[1:]
    return field_path(parts) or "body"


def _problem(problem: Any, content_type: str) -> tuple[str, str]:
    """(the field, a message naming it) of one pydantic/FastAPI validation problem."""
    loc = tuple(problem.get("loc", ()))
    if problem.get("type") == "json_invalid":
        at = f" at character {loc[1]}" if len(loc) > 1 else ""
        reason = (problem.get("ctx") or {}).get("error", "")
        return "body", f"body: invalid JSON{at}: {reason}; send one JSON object"
    field = _field(loc)
    text = f"{field}: {problem.get('msg', 'invalid')}"
    if loc == ("body",) and "json" not in content_type:
        text += f"; send a JSON object with Content-Type: application/json, not {content_type!r}"
    return field, text


@app.exception_handler(HTTPException)
async def http_error(request: Request, err: HTTPException) -> JSONResponse:
    """Starlette's own refusals (unknown route, wrong method, unparsable body) in the same
    error shape, naming the route or what was wrong with the body."""
    cause = err.__cause__
    if isinstance(cause, UnicodeDecodeError):
        message = f"body: not valid UTF-8 at byte {cause.start}; send JSON encoded as UTF-8"
    elif isinstance(cause, RecursionError):
        message = "body: JSON nested too deeply to parse; send a flatter JSON object"
    else:
        message = f"{err.detail}: {request.method} {request.url.path}"
    response = error_response(err.status_code, message, "invalid_request_error")
    response.headers.update(err.headers or {})
    return response


@app.exception_handler(LorafleetError)
async def lorafleet_error(_: Request, err: LorafleetError) -> JSONResponse:
    status = next((code for kind, code in STATUS if isinstance(err, kind)), 400)
    return error_response(status, str(err), type(err).__name__, getattr(err, "param", None))


@app.exception_handler(Unauthorized)
async def unauthorized(_: Request, __: Unauthorized) -> JSONResponse:
    response = error_response(401, ADMIN_REFUSAL, "Unauthorized")
    response.headers["WWW-Authenticate"] = "Bearer"
    return response


# ---- OpenAI-compatible --------------------------------------------------------------------


@app.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": server_of(request).models()}


@app.get("/v1/models/{model}")
async def retrieve_model(model: str, request: Request) -> dict[str, Any]:
    """OpenAI's model object of base, NAME, NAME:ALIAS or NAME@VERSION; 404 naming what
    exists."""
    return server_of(request).model(model)


@app.post("/v1/completions", response_model=None)
async def completions(body: CompletionRequest, request: Request) -> Any:
    return await _respond(request, completion_plan(body))


@app.post("/v1/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
    plan, messages = chat_plan(body)
    prompt = server_of(request).render_chat(messages)
    return await _respond(request, with_prompt(plan, prompt))


async def _respond(request: Request, plan: Plan) -> Any:
    """Admit the request's choices (errors become 4xx/503 here), then stream or answer
    whole."""
    server = server_of(request)
    generations = await server.start(
        plan.choices, chat=plan.chat, session=request.headers.get(SESSION_HEADER)
    )
    first = generations[0]
    headers = {VERSION_HEADER: first.served, REVISION_HEADER: str(first.revision)}
    if plan.stream:
        return GenerationStream(server, plan, generations, headers=headers)
    try:
        body = await whole_body(server, plan, generations)
    finally:
        for generation in generations:
            server.abandon(generation)  # a choice whose reading never began (cancelled)
    return JSONResponse(body, headers=headers)


class GenerationStream(StreamingResponse):
    """Server-sent events of one request's generations. A client that leaves before the
    first event never starts the event generator, so the requests are freed here too
    (Server.abandon)."""

    def __init__(
        self, server: Server, plan: Plan, generations: list[Generation], *, headers: dict[str, str]
    ) -> None:
        super().__init__(
            sse(server, plan, generations), media_type="text/event-stream", headers=headers
        )
        self.server, self.generations = server, generations

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            for generation in self.generations:
                self.server.abandon(generation)


@app.post("/v1/feedback")
async def feedback(body: FeedbackRequest, request: Request) -> dict[str, Any]:
    stored = await asyncio.to_thread(
        server_of(request).feedback, body.response_id, body.score, body.correction, body.label
    )
    return {"id": stored, "response_id": body.response_id, "stored": True}


@app.post("/v1/classify")
@app.post("/classify")  # vLLM's path of the same API
async def classify(body: ClassifyRequest, request: Request) -> JSONResponse:
    """vLLM's classification API on a classifier adapter: each text's label and
    probabilities (serving/runtime/classification.py)."""
    done = await server_of(request).classifier.classify(
        body.model,
        body.texts(),
        add_special_tokens=body.add_special_tokens,
        activation=body.use_activation is not False,
        session=request.headers.get(SESSION_HEADER),
    )
    tokens = sum(item.generation.prompt_tokens for item in done.items)
    data = [
        {
            "index": i,
            "id": item.generation.response_id,  # for /v1/feedback on this text
            "label": item.label,
            "probs": item.probs,
            "num_classes": len(item.probs),
        }
        for i, item in enumerate(done.items)
    ]
    body_out = {
        "id": f"classify-{done.id}",
        "object": "list",
        "created": int(time.time()),
        "model": body.model,
        "data": data,
        "usage": {
            "prompt_tokens": tokens,
            "total_tokens": tokens,
            "completion_tokens": 0,
            "prompt_tokens_details": None,
        },
    }
    headers = {VERSION_HEADER: done.target.key, REVISION_HEADER: str(done.revision)}
    return JSONResponse(body_out, headers=headers)
