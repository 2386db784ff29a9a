"""Maps slime's arguments to slime-router flags and runs the binary."""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import weakref
from types import FrameType, TracebackType
from typing import IO, Any, Callable, Optional, Sequence

# slime's Namespace field -> the router flag of the same name. A field that is missing or None
# is left out, so the router's own default applies (see the README's Flags table).
_SCALAR_FLAGS = (
    ("sglang_router_ip", "--sglang-router-ip"),
    ("sglang_router_port", "--sglang-router-port"),
    ("slime_router_timeout", "--slime-router-timeout"),
    ("slime_router_max_connections", "--slime-router-max-connections"),
    (
        "slime_router_health_check_failure_threshold",
        "--slime-router-health-check-failure-threshold",
    ),
    ("rollout_health_check_interval", "--rollout-health-check-interval"),
)

DEFAULT_IP = "127.0.0.1"
DEFAULT_PORT = 30000

_PR_SET_PDEATHSIG = 1


class RouterError(RuntimeError):
    """The router failed to start, or answered an admin call with an error."""


def binary_path(name: str = "slime-router") -> str:
    """Path of ``slime-router`` or ``mock-worker``.

    ``$SLIME_ROUTER_BIN`` overrides the router's path (e.g. ``target/release/slime-router``
    during development). Otherwise the scripts directory of this Python environment, where pip
    put the wheel's executables, wins over ``PATH``, so a venv's router is never shadowed by
    another install.
    """
    override = os.environ.get("SLIME_ROUTER_BIN")
    if name == "slime-router" and override:
        return override
    candidate = os.path.join(sysconfig.get_path("scripts"), name)
    if os.access(candidate, os.X_OK):
        return candidate
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(
            f"{name} is not installed in {sys.prefix} nor on PATH "
            "(pip install the slime_router wheel)"
        )
    return found


def router_flags(args: Any, **overrides: Any) -> list[str]:
    """The slime-router command-line flags for slime's argparse ``Namespace``.

    Fields read: ``sglang_router_ip``, ``sglang_router_port``,
    ``slime_router_middleware_paths``, ``slime_router_timeout``,
    ``slime_router_max_connections``, ``slime_router_health_check_failure_threshold``,
    ``rollout_health_check_interval`` and ``hf_checkpoint``. Missing or ``None`` fields get
    the router's defaults. ``hf_checkpoint`` is passed only with middleware: as in SlimeRouter,
    only middleware reads the tokenizer, so a router without any never needs the model dir.
    ``overrides`` replace fields of ``args`` (``sglang_router_port=0``).
    """
    flags: list[str] = []
    for field, flag in _SCALAR_FLAGS:
        value = overrides.get(field, getattr(args, field, None))
        if value is not None:
            flags += [flag, str(value)]
    middleware = _middleware(args)
    if middleware:
        flags += ["--slime-router-middleware-paths", *middleware]
        checkpoint = getattr(args, "hf_checkpoint", None)
        if checkpoint:
            flags += ["--hf-checkpoint", os.fspath(checkpoint)]
    return flags


def _middleware(args: Any) -> list[str]:
    """slime's ``--slime-router-middleware-paths``: ``nargs="+"`` with default ``""``."""
    value = getattr(args, "slime_router_middleware_paths", None)
    if not value:
        return []
    if isinstance(value, (str, os.PathLike)):
        return [os.fspath(value)]
    return [os.fspath(v) for v in value if v]


def _die_with_parent() -> Optional[Callable[[], None]]:
    """A ``preexec_fn`` that has Linux stop the router when its parent dies.

    slime runs ``run_router`` in a ``multiprocessing.Process`` and terminates it; without this
    the router would outlive it, holding the port. Resolved before the fork, so the child only
    makes the call.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def run_router(args: Any, extra_args: Sequence[str] = ()) -> int:
    """Runs slime-router in the foreground with slime's ``args``; returns its exit code.

    SIGINT and SIGTERM sent to this process are passed on, so the router drains in-flight
    requests (up to ``--shutdown-timeout``) and exits 0, and this returns once it has.
    ``extra_args`` are more router flags, e.g. ``["--worker-urls", url]``.
    """
    command = [binary_path(), *router_flags(args), *extra_args]
    proc = subprocess.Popen(command, preexec_fn=_die_with_parent())
    forwarded = _forward_signals(proc)
    try:
        return proc.wait()
    finally:
        for signum, previous in forwarded.items():
            signal.signal(signum, previous)


def _forward_signals(proc: subprocess.Popen[bytes]) -> dict[int, Any]:
    """Passes SIGINT and SIGTERM to ``proc``; returns the handlers to restore.

    Python only lets the main thread set handlers; elsewhere nothing is forwarded, and the
    parent-death signal still stops the router if this process dies.
    """
    if threading.current_thread() is not threading.main_thread():
        return {}

    def forward(signum: int, _frame: Optional[FrameType]) -> None:
        if proc.poll() is None:
            proc.send_signal(signum)

    return {
        signum: signal.signal(signum, forward) for signum in (signal.SIGINT, signal.SIGTERM)
    }


class SlimeRouter:
    """slime-router running in the background, started from slime's ``args``.

    The constructor returns once the router answers HTTP, and raises ``RouterError`` with the
    router's own error text when it exits instead. A ``sglang_router_port`` of 0 gets a free
    port picked here, so that ``url`` is known. ``verbose=False`` keeps the router's log to
    warnings and errors; ``verbose=True`` shows its info log (listening, middleware loaded).
    Use it as a context manager, or call ``close()``; it is also stopped when garbage
    collected or at interpreter exit.
    """

    def __init__(
        self,
        args: Any,
        verbose: bool = False,
        *,
        startup_timeout: float = 60.0,
        extra_args: Sequence[str] = (),
    ) -> None:
        ip = getattr(args, "sglang_router_ip", None) or DEFAULT_IP
        port = getattr(args, "sglang_router_port", None)
        port = DEFAULT_PORT if port is None else int(port)
        if port == 0:
            port = _free_port(ip)
        self.url: str = f"http://{_connect_host(ip)}:{port}"
        """Base URL of the router, e.g. ``http://127.0.0.1:30000``."""
        flags = router_flags(args, sglang_router_ip=ip, sglang_router_port=port)
        if not verbose:
            flags += ["--log-level", "warn"]
        self._stderr: IO[bytes] = tempfile.TemporaryFile()
        self._proc = subprocess.Popen(
            [binary_path(), *flags, *extra_args], stderr=self._stderr
        )
        self._finalizer = weakref.finalize(self, _stop, self._proc, self._stderr, 5.0)
        try:
            self._wait_ready(startup_timeout)
        except BaseException:
            self._finalizer()
            raise

    def _wait_ready(self, timeout: float) -> None:
        """Polls ``/list_workers`` until it answers, the router exits, or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while True:
            code = self._proc.poll()
            if code is not None:
                raise RouterError(f"slime-router exited with code {code}: {self._error_text()}")
            try:
                self._request("GET", "/list_workers", timeout=1.0)
                return
            except (OSError, RouterError):
                pass
            if time.monotonic() > deadline:
                raise RouterError(f"slime-router did not answer on {self.url} within {timeout}s")
            time.sleep(0.02)

    def _error_text(self) -> str:
        self._stderr.seek(0)
        text = self._stderr.read().decode(errors="replace").strip()
        return text or "(no output on stderr)"

    def _request(
        self, method: str, path: str, body: Optional[bytes] = None, timeout: float = 30.0
    ) -> Any:
        """One admin call; the decoded JSON answer, or ``RouterError`` with the router's."""
        request = urllib.request.Request(self.url + path, data=body, method=method)
        key = os.environ.get("SLIME_ROUTER_ADMIN_API_KEY")
        if key:
            request.add_header("Authorization", f"Bearer {key}")
        try:
            with _OPENER.open(request, timeout=timeout) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")
            try:
                detail = json.loads(detail).get("error", detail)
            except (ValueError, AttributeError):
                pass
            raise RouterError(f"{method} {path}: {e.code} {detail}") from None

    def add_worker(self, url: str) -> dict[str, Any]:
        """Registers a worker (``POST /add_worker``); re-adding one is a no-op."""
        query = urllib.parse.urlencode({"url": url})
        answer: dict[str, Any] = self._request("POST", f"/add_worker?{query}")
        return answer

    def list_workers(self) -> list[str]:
        """The registered workers' URLs (``GET /list_workers``)."""
        return list(self._request("GET", "/list_workers")["urls"])

    @property
    def returncode(self) -> Optional[int]:
        """The router's exit code once it has exited, else None."""
        return self._proc.poll()

    def close(self, timeout: float = 30.0) -> None:
        """Stops the router: SIGTERM (it drains in-flight requests), SIGKILL after ``timeout``."""
        self._finalizer.detach()
        _stop(self._proc, self._stderr, timeout)

    def __enter__(self) -> SlimeRouter:
        return self

    def __exit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.close()


def _stop(proc: subprocess.Popen[bytes], stderr: IO[bytes], timeout: float) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    stderr.close()


def _free_port(ip: str) -> int:
    """A port free on ``ip`` right now. Another process could take it before the router
    binds; the router then fails to start and says so."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((ip, 0))
        return int(s.getsockname()[1])


def _connect_host(ip: str) -> str:
    """Where to reach a router listening on ``ip``: loopback for a wildcard address."""
    if ip in ("0.0.0.0", ""):
        return "127.0.0.1"
    if ip == "::":
        return "[::1]"
    return f"[{ip}]" if ":" in ip else ip


# Admin calls go straight to the router: an http_proxy in the environment (common on
# clusters) would otherwise receive them.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
