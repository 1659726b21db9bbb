"""The BentoML service: one worker owns the engine; the HTTP routes (serving/http/app.py) are
mounted on it. Configured by `lorafleet serve` through LORAFLEET_SERVE_CONFIG.

A worker whose Server fails at start-up ends the server instead of being started again and
again by BentoML's supervisor (circus): it logs why on one line and, under `lorafleet serve`,
writes that line to the file named by START_FAILURE_ENV (`lorafleet serve` then stops
BentoML and prints it); under a bare `bentoml serve` it stops its parent, the circus arbiter,
as SIGTERM does, except in a Bento container, where BentoML respawns no worker and the
arbiter exits 1 by itself once the worker has exited."""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from pathlib import Path

import bentoml
from bentoml.serving import running_inside_container
from prometheus_client import generate_latest

from registry.errors import LorafleetError
from registry.hardware import cpu_info
from registry.names import DEFAULT_ALIAS
from serving.http.app import app
from serving.metrics import ENGINE_THREADS, LORA_REQUESTS_INFO, PROCESS_METRICS
from serving.runtime.server import Server
from serving.serve_config import START_FAILURE_ENV, load_serve_config

logger = logging.getLogger(__name__)

# The module BentoML runs each worker as (`python -m`); its parent is the circus arbiter.
BENTOML_WORKER = "_bentoml_impl.worker.service"
_PARENT = os.getppid()  # in a worker: the arbiter that started it


@bentoml.asgi_app(app, path="/")
@bentoml.service(
    name="lorafleet",
    workers=1,  # one engine, one process: all torch work on its engine thread
    traffic={"timeout": 600, "max_concurrency": 1024},
)
class LoraFleet:
    def __init__(self) -> None:
        try:
            self.server = Server(load_serve_config())
        except Exception as err:  # any class: the server cannot start, whatever the reason
            end_failed_start(err)
            raise
        app.state.server = self.server
        logger.info(
            "lorafleet serving %s with the %s engine",
            self.server.config.base,
            self.server.engine_name,
        )

    async def __metrics__(self, content: str) -> str:
        """BentoML's /metrics text plus the gauges kept in this process (drift scores,
        whose label sets must disappear, which multiprocess mode cannot do)."""
        export_lora_info(self.server)
        export_threads(self.server)
        return content + generate_latest(PROCESS_METRICS).decode()

    @bentoml.on_shutdown  # type: ignore[untyped-decorator]
    def shutdown(self) -> None:
        self.server.close()


def export_lora_info(server: Server) -> None:
    """The one sample of lorafleet_lora_requests_info: the resident versions (NAME@VERSION)
    and the names whose routed version is resident (requests name adapters so), the loads
    in progress, and the slots."""
    routed = {
        name: version
        for (name, alias), (version, _) in server.router.map.aliases.items()
        if alias == DEFAULT_ALIAS
    }
    resident = server.residency.resident()
    names = set()
    for key in resident:
        name, _, version = key.partition("@")
        if routed.get(name) == int(version):
            names.add(name)
    labels = (
        str(server.engine.adapter_slots),
        ",".join([*sorted(names), *sorted(resident)]),
        ",".join(server.residency.loading()),
    )
    for old in LORA_REQUESTS_INFO.labelsets():
        if old != labels:
            LORA_REQUESTS_INFO.remove(old)
    LORA_REQUESTS_INFO.set(labels, time.time())


def export_threads(server: Server) -> None:
    tuner = getattr(server.engine, "threads", None)  # the hf engine's ThreadTuner
    if tuner is not None:
        dtype = str(getattr(server.engine, "dtype_name", ""))
        ENGINE_THREADS.set((server.engine_name, dtype, cpu_info().model), tuner.current)


def failure_line(err: BaseException) -> str:
    """The one-line reason of a failed start: a LorafleetError's own message (written for
    the user), any other error's class and message."""
    text = " ".join(str(err).split())
    if isinstance(err, LorafleetError) and text:
        return text
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def end_failed_start(err: BaseException) -> None:
    """Log why the server did not start and make it end rather than restart the worker."""
    line = failure_line(err)
    logger.error("the server did not start: %s", line)
    target = os.environ.get(START_FAILURE_ENV)
    if target:
        try:
            partial = Path(f"{target}.partial")
            partial.write_text(line + "\n")
            partial.replace(target)  # `lorafleet serve` polls for it: never a half line
            return
        except OSError as write_err:
            logger.error("cannot write the start-up failure to %s: %s", target, write_err)
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is None or spec.name != BENTOML_WORKER or os.getppid() != _PARENT:
        return
    if running_inside_container():
        return  # BentoML does not respawn there: the arbiter exits 1 once this worker exits
    # Stop the arbiter as SIGTERM does (it exits 0): it stops its watchers, none respawned.
    os.kill(_PARENT, signal.SIGTERM)
