"""`lorafleet serve`: validate the server config, then run the BentoML service."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast, get_args, get_origin

if TYPE_CHECKING:
    from pydantic.fields import FieldInfo

    from serving.serve_config import ServeConfig

SERVE_HELP = """Serve one base model and the registry's adapters over an OpenAI-compatible
HTTP API (/v1/completions, /v1/chat/completions, /v1/models, /v1/feedback), with an admin
API behind --api-key and Prometheus metrics at /metrics. Alias changes in the registry (from
any process) take effect within a second."""


# Options of `lorafleet serve` that are not ServeConfig's: where BentoML listens.
LISTEN_OPTIONS = {"host": ("127.0.0.1", "listen address"), "port": (3000, "listen port")}
GROUPS = {"drift": "drift (serving/watch/drift.py)", "loop": "request log and canary verdicts"}


@dataclass(frozen=True)
class Option:
    """The command-line option of one ServeConfig field."""

    name: str  # the field
    flags: tuple[str, ...]
    kwargs: dict[str, Any]  # for argparse's add_argument
    group: str | None  # a key of GROUPS

    @property
    def dest(self) -> str:
        return str(self.kwargs.get("dest", self.name))

    def value(self, given: Any) -> Any:
        """The field's value from what argparse parsed."""
        if self.name == "drift_thresholds":
            return _thresholds(self.flags[0], given)
        if isinstance(given, Path):
            return given.resolve()
        return given


def option_of(name: str, field: FieldInfo) -> Option:
    """One flag per field: --FIELD-NAME unless the field's `cli` extra names another; its
    help is the field's docstring with the default; a bool that defaults to true is a
    --no-FLAG switch; a list or dict field takes the flag once per item."""
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    spec = cast(dict[str, Any], extra.get("cli", {}))
    flag = spec.get("flag", "--" + name.replace("_", "-"))
    annotation = field.annotation
    default = None if field.is_required() else field.get_default(call_default_factory=True)
    text = spec.get("help") or (field.description or name).split("\n")[0].rstrip(".")
    kwargs: dict[str, Any] = {"dest": name, "default": None}
    if default not in (None, [], {}, True, False):
        text += f" (default {default})"
    if spec.get("env"):
        kwargs["default"] = os.environ.get(spec["env"])
        text += f" (default ${spec['env']})"
    origin = get_origin(annotation)
    if annotation is bool:
        kwargs.update(action="store_const", const=not default)
    elif origin in (list, dict):
        kwargs.update(action="append", metavar=spec.get("metavar", "VALUE"))
        text += " (repeatable)"
    elif origin is Literal:
        kwargs.update(choices=list(get_args(annotation)))
    else:
        kinds = [a for a in (get_args(annotation) or (annotation,)) if a is not type(None)]
        kwargs.update(type=kinds[0] if kinds and kinds[0] in (int, float, Path) else str)
        if "metavar" in spec:
            kwargs["metavar"] = spec["metavar"]
    if field.is_required():
        kwargs["required"] = True
    group = (
        "drift"
        if name == "drift" or name.startswith("drift_")
        else "loop"
        if name.startswith(("request_log", "canary"))
        else None
    )
    return Option(name, (flag,), {**kwargs, "help": text}, group)


def add_serve_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Entry point: add `lorafleet serve`, one option per ServeConfig field."""
    from serving.serve_config import ServeConfig

    p = commands.add_parser(
        "serve", help="serve the base model and its adapters over HTTP", description=SERVE_HELP
    )
    groups = {key: p.add_argument_group(title) for key, title in GROUPS.items()}
    for name, (default, text) in LISTEN_OPTIONS.items():
        p.add_argument(
            f"--{name}", type=type(default), default=default, help=f"{text} (default {default})"
        )
    for name, field in ServeConfig.model_fields.items():
        option = option_of(name, field)
        where = groups.get(option.group) if option.group else None
        (where or p).add_argument(*option.flags, **option.kwargs)
    p.set_defaults(handler=cmd_serve)


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    """The ServeConfig of parsed `serve` arguments: only the options given (the defaults
    are ServeConfig's own); every problem at once, each named by its flag."""
    from pydantic import ValidationError

    from registry.errors import LorafleetError
    from registry.problems import validation_problems
    from serving.serve_config import ServeConfig

    values: dict[str, Any] = {}
    flags: dict[str, str] = {}
    for name, field in ServeConfig.model_fields.items():
        option = option_of(name, field)
        flags[name] = option.flags[0]
        given = getattr(args, option.dest, None)
        if given is not None:
            values[name] = option.value(given)
    try:
        return ServeConfig(**values)
    except ValidationError as err:
        problems = "; ".join(validation_problems(err, root="options", names=flags))
        raise LorafleetError(f"invalid serve options: {problems}") from err


def cmd_serve(args: argparse.Namespace) -> int:
    from registry.registry import Registry
    from serving.serve_config import CONFIG_ENV

    config = config_from_args(args)
    Registry(config.home).close()  # a missing registry is a one-line error here, not in a worker
    bentoml = shutil.which("bentoml", path=str(Path(sys.executable).parent)) or "bentoml"
    os.environ[CONFIG_ENV] = config.to_env()
    os.execv(
        bentoml,
        [
            bentoml,
            "serve",
            "serving.http.service:LoraFleet",
            "--host",
            args.host,
            "--port",
            str(args.port),
        ],
    )


def _thresholds(flag: str, pairs: list[str]) -> dict[str, float]:
    """SIGNAL=VALUE pairs; the signal names are checked by ServeConfig."""
    from registry.errors import LorafleetError
    from registry.problems import parse_assignment

    out: dict[str, float] = {}
    for pair in pairs:
        try:
            name, value = parse_assignment(pair)
            out[name] = float(value)
        except (ValueError, TypeError) as err:
            raise LorafleetError(
                f"{flag} {pair!r} is not SIGNAL=NUMBER; e.g. prompt_tokens=0.3"
            ) from err
    return out
