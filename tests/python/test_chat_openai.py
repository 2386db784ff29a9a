"""/v1/chat/completions through the wheel's built-in chat_completions and radix_tree
middleware, driven by the official ``openai`` client, against ``mock-worker --chat`` on
127.0.0.1. Run by scripts/test.sh, which installs ``openai`` into the test venv."""

from __future__ import annotations

import json
import os
import subprocess
import urllib.request
from argparse import Namespace
from pathlib import Path
from typing import Any, Iterator

import openai
import pytest

from slime_router import SlimeRouter, binary_path

MODEL = Path(__file__).resolve().parents[1] / "fixtures" / "chat-model"
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


@pytest.fixture
def router() -> Iterator[SlimeRouter]:
    """A router with the chat middleware in front of one ``--chat`` mock worker."""
    worker = subprocess.Popen(
        [binary_path("mock-worker"), "--port", "0", "--chat",
         "--tokenizer", str(MODEL / "tokenizer.json")],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    assert worker.stdout is not None
    url = worker.stdout.readline().strip()
    args = Namespace(
        sglang_router_ip="127.0.0.1",
        sglang_router_port=0,
        slime_router_middleware_paths=["chat_completions", "radix_tree"],
        hf_checkpoint=str(MODEL),
    )
    try:
        with SlimeRouter(args) as running:
            running.add_worker(url)
            yield running
    finally:
        worker.terminate()
        worker.wait(10)


def client(router: SlimeRouter) -> openai.OpenAI:
    # A proxy from the environment must not see loopback traffic (the client honours NO_PROXY).
    os.environ["NO_PROXY"] = "127.0.0.1,localhost"
    return openai.OpenAI(base_url=router.url + "/v1", api_key="unused")


def test_a_two_turn_conversation_and_its_export(router: SlimeRouter) -> None:
    chat = client(router)
    messages: list[Any] = [{"role": "user", "content": "hello there"}]
    first = chat.chat.completions.create(model="m", messages=messages, max_tokens=64)
    assert first.object == "chat.completion"
    assert first.choices[0].message.content == "Reply 1: you said hello there"
    assert first.choices[0].finish_reason == "stop"
    assert first.usage is not None and first.usage.prompt_tokens > 0
    messages += [first.choices[0].message.model_dump(exclude_none=True),
                 {"role": "user", "content": "and again"}]  # fmt: skip
    second = chat.chat.completions.create(model="m", messages=messages, max_tokens=64)
    assert second.choices[0].message.content == "Reply 2: you said and again"
    messages.append(second.choices[0].message.model_dump(exclude_none=True))

    request = urllib.request.Request(
        router.url + "/retrieve_from_text",
        data=json.dumps({"messages": messages}).encode(),
        method="POST",
    )
    with OPENER.open(request, timeout=10) as response:
        exported = json.loads(response.read())
    mask = exported["loss_mask"]
    assert exported["tokens"] and len(mask) == len(exported["tokens"])
    assert exported["cached_tokens"] == len(mask) - 1, "all but the final newline was cached"
    assert mask[0] == 0 and mask[-1] == 0 and 1 in mask


def test_streaming_reasoning_content_and_usage(router: SlimeRouter) -> None:
    stream = client(router).chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "think of a fox"}],
        max_tokens=100,
        stream=True,
        stream_options={"include_usage": True},
    )
    content, reasoning, finishes, usage = "", "", [], None
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            content += choice.delta.content or ""
            reasoning += getattr(choice.delta, "reasoning_content", None) or ""
            if choice.finish_reason:
                finishes.append(choice.finish_reason)
    assert reasoning == "Turn 1 asks me to think."
    assert content == "I thought about turn 1."
    assert finishes == ["stop"]
    assert usage is not None and usage.completion_tokens > 5


def test_a_streamed_tool_call(router: SlimeRouter) -> None:
    stream = client(router).chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "what is the weather in Paris?"}],
        tools=TOOLS,
        max_tokens=100,
        stream=True,
    )
    calls, finishes = [], []
    for chunk in stream:
        for choice in chunk.choices:
            calls += choice.delta.tool_calls or []
            if choice.finish_reason:
                finishes.append(choice.finish_reason)
    assert len(calls) == 1
    assert calls[0].function is not None
    assert calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments or "") == {"city": "Paris"}
    assert finishes == ["tool_calls"]


def test_bad_input_raises_the_clients_400(router: SlimeRouter) -> None:
    with pytest.raises(openai.BadRequestError, match="only n=1"):
        client(router).chat.completions.create(
            model="m", messages=[{"role": "user", "content": "x"}], n=2
        )
