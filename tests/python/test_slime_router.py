"""The installed slime_router wheel: its executables and the Python API slime calls, against a
real mock-worker on 127.0.0.1. Run by scripts/test.sh in a fresh venv holding the wheel."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
from argparse import Namespace
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

import slime_router
from slime_router import RouterError, SlimeRouter, binary_path, router_flags, run_router

TOKENIZER = Path(__file__).resolve().parents[1] / "fixtures" / "tokenizer.json"
LEGACY_RADIX = "slime.router.middleware_hub.radix_tree_middleware:RadixTreeMiddleware"
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def slime_args(**fields: Any) -> Namespace:
    """slime's Namespace as its argument parser fills it (defaults included)."""
    args = Namespace(
        sglang_router_ip="127.0.0.1",
        sglang_router_port=0,
        slime_router_middleware_paths="",
        slime_router_timeout=None,
        slime_router_max_connections=None,
        slime_router_health_check_failure_threshold=3,
        rollout_health_check_interval=30.0,
        hf_checkpoint=str(TOKENIZER),
    )
    for name, value in fields.items():
        setattr(args, name, value)
    return args


def post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    with OPENER.open(request, timeout=10) as response:
        answer: dict[str, Any] = json.loads(response.read())
        return answer


def eventually(check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


@pytest.fixture
def worker() -> Iterator[str]:
    """A mock-worker from the wheel on a free port; yields its URL."""
    proc = subprocess.Popen(
        [binary_path("mock-worker"), "--port", "0", "--tokenizer", str(TOKENIZER)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    url = proc.stdout.readline().strip()
    assert url.startswith("http://127.0.0.1:"), url
    yield url
    proc.terminate()
    proc.wait(10)


def test_the_wheel_puts_both_executables_in_this_environment() -> None:
    for name in ("slime-router", "mock-worker"):
        assert Path(binary_path(name)).parent == Path(sys.prefix) / "bin"
    listed = subprocess.run(
        [binary_path(), "--list-middleware"], capture_output=True, text=True, check=True
    ).stdout.split()
    assert listed == [
        "affinity_router",
        "api_key_auth",
        "chat_completions",
        "noop",
        "radix_tree",
        "request_id",
    ]


def test_slime_namespace_maps_to_router_flags() -> None:
    args = slime_args(
        sglang_router_port=30000,
        slime_router_middleware_paths=[LEGACY_RADIX],
        slime_router_timeout=12.5,
        slime_router_max_connections=64,
    )
    assert router_flags(args) == [
        "--sglang-router-ip", "127.0.0.1",
        "--sglang-router-port", "30000",
        "--slime-router-timeout", "12.5",
        "--slime-router-max-connections", "64",
        "--slime-router-health-check-failure-threshold", "3",
        "--rollout-health-check-interval", "30.0",
        "--slime-router-middleware-paths", LEGACY_RADIX,
        "--hf-checkpoint", str(TOKENIZER),
    ]  # fmt: skip
    # Missing fields get the router's defaults; without middleware no tokenizer is loaded.
    assert router_flags(Namespace(hf_checkpoint="/models/x")) == []


def test_slime_router_routes_through_the_builtin_radix_cache(worker: str) -> None:
    args = slime_args(slime_router_middleware_paths=[LEGACY_RADIX])
    with SlimeRouter(args) as router:
        assert router.add_worker(worker)["status"] == "success"
        assert router.list_workers() == [worker]
        answer = post(router.url + "/generate", {"text": "Hello", "return_logprob": True})
        assert answer["text"]
        # The cache recorded the trajectory: prompt tokens (mask 0) then the output (mask 1).
        full = "Hello" + answer["text"]
        cached = post(router.url + "/retrieve_from_text", {"text": full})
        assert cached["cached_tokens"] == len(cached["tokens"]) > 0
        assert 1 in cached["loss_mask"] and cached["loss_mask"][0] == 0
    assert router.returncode == 0, "SIGTERM drains and exits 0"


def test_startup_failure_raises_the_routers_own_error() -> None:
    with pytest.raises(RouterError) as failure:
        SlimeRouter(slime_args(slime_router_middleware_paths=["radix"]))
    message = str(failure.value)
    assert "exited with code 1" in message
    assert "not a built-in middleware (built-in: affinity_router," in message


def test_admin_errors_carry_the_routers_message() -> None:
    with SlimeRouter(slime_args()) as router:
        with pytest.raises(RouterError, match="400"):
            router.add_worker("not a url")


def test_run_router_returns_the_exit_code() -> None:
    assert run_router(slime_args(slime_router_middleware_paths="nope.wasm")) == 1


def test_run_router_passes_sigterm_on_and_returns_after_the_drain(worker: str) -> None:
    """As slime runs it: in a process of its own, terminated at the end of the job."""
    port = slime_router._router._free_port("127.0.0.1")
    script = (
        "import sys, argparse, slime_router\n"
        f"args = argparse.Namespace(sglang_router_port={port}, slime_router_middleware_paths='radix_tree',"
        f" hf_checkpoint={str(TOKENIZER)!r})\n"
        "sys.exit(slime_router.run_router(args, extra_args=['--worker-urls', sys.argv[1]]))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, worker])
    base = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        try:
            with OPENER.open(base + "/list_workers", timeout=1) as response:
                return bool(json.loads(response.read())["urls"] == [worker])
        except OSError:
            return False

    eventually(answers)
    assert post(base + "/generate", {"text": "Hi"})["text"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    assert not answers(), "the router stopped with its parent"
