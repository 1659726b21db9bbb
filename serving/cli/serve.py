"""`lorafleet serve`: validate the server config and check that the engine serves the base,
then run the BentoML service as a child and watch it: a worker that fails at start-up ends
the server with its reason on one line (serving/http/service.py writes it), never a worker
restarted in a loop."""

from __future__ import annotations

import argparse
import ctypes
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast, get_args, get_origin

if TYPE_CHECKING:
    from pydantic.fields import FieldInfo

    from serving.serve_config import ServeConfig

SERVE_HELP = """Serve one base model and the registry's adapters over an OpenAI-compatible
HTTP API (/v1/completions, /v1/chat/completions, /v1/models, /v1/feedback), with an admin
API behind --api-key and Prometheus metrics at /metrics. Alias changes in the registry (from
any process) take effect within a second. A base the engine cannot serve is refused before
the server starts; a server whose start fails ends with the reason on one line."""


# Options of `lorafleet serve` that are not ServeConfig's: where BentoML listens.
LISTEN_OPTIONS = {"host": ("127.0.0.1", "listen address"), "port": (3000, "listen port")}
GROUPS = {"drift": "drift (serving/watch/drift.py)", "loop": "request log and canary verdicts"}

POLL_S = 0.2  # how often the watch looks for the worker's start-up failure file
GRACE_S = 10.0  # from SIGTERM to SIGKILL, when the server must end
PR_SET_PDEATHSIG = 1  # prctl(2) options
PR_SET_CHILD_SUBREAPER = 36


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
    from registry.arguments import add_store_options
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
    add_store_options(p)  # set in the environment the workers inherit
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
    from registry.families import verdict
    from registry.registry import Registry
    from serving.engines import engine_name
    from serving.errors import NotServable
    from serving.serve_config import CONFIG_ENV, START_FAILURE_ENV

    config = config_from_args(args)
    Registry(config.home).close()  # a missing registry is a one-line error here, not in a worker
    # A base the engine cannot serve, from its config.json: refused in seconds, before
    # BentoML and the engine start.
    check = verdict(engine_name(config), config.base)
    if check.reason is not None:
        raise NotServable(check.reason)
    bentoml = shutil.which("bentoml", path=str(Path(sys.executable).parent)) or "bentoml"
    argv = [
        bentoml,
        "serve",
        "serving.http.service:LoraFleet",
        "--host",
        args.host,
        "--port",
        str(args.port),
    ]
    with tempfile.TemporaryDirectory(prefix="lorafleet-serve-") as scratch:
        failure_file = Path(scratch) / "start-failure"
        env = {
            **os.environ,
            CONFIG_ENV: config.to_env(),
            START_FAILURE_ENV: str(failure_file),
            # BentoML keeps Prometheus' multiprocess files in $BENTOML_HOME and empties that
            # directory at every start: servers on one host sharing it would wipe and mix
            # each other's metrics. Each server gets its own.
            "BENTOML_HOME": str(Path(scratch) / "bentoml"),
        }
        return supervise(argv, env, failure_file)


def supervise(argv: list[str], env: dict[str, str], failure_file: Path) -> int:
    """Run BentoML (`argv`) in a session of its own until it exits; its exit status.

    SIGTERM and SIGINT are passed on to its process group. When its worker writes a failed
    start to `failure_file`, BentoML is stopped (SIGTERM, SIGKILL after GRACE_S) and the
    reason raised, so the server ends with one line. If this process dies, even by SIGKILL,
    BentoML gets SIGTERM (PR_SET_PDEATHSIG) and stops its worker; BentoML's worker runs in
    a session of its own, so this process is a child subreaper: whatever BentoML leaves
    behind becomes its child, and is ended before it returns.
    """
    from registry.errors import LorafleetError

    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    child = subprocess.Popen(argv, env=env, start_new_session=True, preexec_fn=_follow(os.getpid()))

    def forward(signum: int, _frame: object) -> None:
        if child.returncode is None:
            _signal_group(child.pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    failure: str | None = None
    kill_at = math.inf
    try:
        while child.poll() is None:
            if failure is None and (failure := _read_failure(failure_file)) is not None:
                _signal_group(child.pid, signal.SIGTERM)
                kill_at = time.monotonic() + GRACE_S
            elif time.monotonic() > kill_at:
                _signal_group(child.pid, signal.SIGKILL)
                kill_at = math.inf
            _reap_orphan(child.pid)
            time.sleep(POLL_S)
    finally:
        if child.poll() is None:  # this loop failed: do not leave BentoML running
            _signal_group(child.pid, signal.SIGTERM)
        _end_orphans()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    failure = failure or _read_failure(failure_file)
    if failure is not None:
        raise LorafleetError(f"the server did not start: {failure}")
    code = child.returncode
    return code if code >= 0 else 128 - code  # killed by signal N: 128 + N, as a shell says


def _read_failure(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        pass


@cache
def _libc() -> ctypes.CDLL | None:
    return ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None


def _prctl(option: int, value: int) -> None:
    libc = _libc()
    if libc is not None and libc.prctl(option, value, 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl({option}, {value}): {os.strerror(errno)}")


def _follow(parent: int) -> Callable[[], None]:
    """The child's set-up between fork and exec: SIGTERM when `parent` dies."""
    _libc()  # loaded before the fork

    def follow() -> None:
        _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # it died before the prctl
            os._exit(1)

    return follow


def _children() -> list[int]:
    """The pids whose parent is this process (on Linux, from /proc)."""
    me, found = os.getpid(), list[int]()
    if not os.path.isdir("/proc"):
        return found
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == me:  # "pid (comm) state ppid ..."
            found.append(int(entry.name))
    return found


def _reap_orphan(child: int) -> None:
    """Reap one exited process other than BentoML (`child`) that came to this subreaper."""
    try:
        ended = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return
    if ended is not None and ended.si_pid not in (0, child):
        os.waitpid(ended.si_pid, 0)


def _end_orphans() -> None:
    """End and reap BentoML's processes that outlived it (SIGTERM, SIGKILL after GRACE_S):
    as a subreaper, this process inherited them, and their own children after them."""
    deadline = time.monotonic() + GRACE_S
    signalled: set[int] = set()
    while orphans := _children():
        late = time.monotonic() > deadline
        for pid in orphans:
            try:
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    continue  # it has exited; now reaped
                if late or pid not in signalled:
                    os.kill(pid, signal.SIGKILL if late else signal.SIGTERM)
                    signalled.add(pid)
            except (ChildProcessError, ProcessLookupError):
                pass
        time.sleep(0.1)


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
