"""The BentoML service: one worker owns the engine; the HTTP routes (serving/http/app.py) are
mounted on it. Configured by `lorafleet serve` through LORAFLEET_SERVE_CONFIG."""

from __future__ import annotations

import logging

import bentoml
from prometheus_client import generate_latest

from serving.http.app import app
from serving.metrics import PROCESS_METRICS
from serving.runtime.server import Server
from serving.serve_config import load_serve_config

logger = logging.getLogger(__name__)


@bentoml.asgi_app(app, path="/")
@bentoml.service(
    name="lorafleet",
    workers=1,  # one engine, one process: all torch work on its engine thread
    traffic={"timeout": 600, "max_concurrency": 1024},
)
class LoraFleet:
    def __init__(self) -> None:
        self.server = Server(load_serve_config())
        app.state.server = self.server
        logger.info(
            "lorafleet serving %s with the %s engine",
            self.server.config.base,
            self.server.engine_name,
        )

    async def __metrics__(self, content: str) -> str:
        """BentoML's /metrics text plus the gauges kept in this process (drift scores,
        whose label sets must disappear, which multiprocess mode cannot do)."""
        return content + generate_latest(PROCESS_METRICS).decode()

    @bentoml.on_shutdown  # type: ignore[untyped-decorator]
    def shutdown(self) -> None:
        self.server.close()
