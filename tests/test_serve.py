"""phi2tutor serve through the official openai client on a free loopback port: answers equal
TutorModule.generate (plain and streamed, chat and completions), concurrent requests, limits and malformed
requests answered with 4xx JSON while the server keeps serving, and the API key."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from phi2tutor.grading import extract_answer
from phi2tutor.tutor import load_tutor
from tests.conftest import REPO
from tests.tutor_run import HELD_OUT

openai = pytest.importorskip("openai")

API_KEY = "test-key-123"
MODEL = "tiny-tutor-test"
MAX_PROMPT_TOKENS = 64


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str, key: str | None = API_KEY) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def _post(url: str, data: bytes, key: str | None = API_KEY) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(url, data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.fixture(scope="module")
def server(tiny_tutor_run):
    """`phi2tutor serve` in its own process group on 127.0.0.1; always stopped at the end (bounded waits)."""
    port = _free_port()
    command = [
        sys.executable, "-m", "phi2tutor.cli", "serve", str(tiny_tutor_run), "--port", str(port),
        "--api_key", API_KEY, "--model_id", MODEL, "--device", "cpu", "--max_tokens", "64",
        "--max_prompt_tokens", str(MAX_PROMPT_TOKENS), "--max_batch_size", "4", "--batch_timeout", "0.2",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            if process.poll() is not None:
                raise AssertionError(f"serve exited: {process.stdout.read().decode()[-3000:]}")
            try:
                if _get(f"{base}/health")[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError("serve did not become healthy in 240 s")
            time.sleep(0.5)
        yield base
    finally:
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 15)):
            if process.poll() is not None:
                break
            os.killpg(process.pid, sig)
            try:
                process.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
        if process.stdout:
            process.stdout.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference(tiny_tutor_run) -> list[str]:
    return load_tutor(tiny_tutor_run, device="cpu").generate(HELD_OUT)


def test_models_and_health(server, client) -> None:
    assert [model.id for model in client.models.list().data] == [MODEL]
    assert _get(f"{server}/health") == (200, b"ok")


def test_chat_plain_and_streamed_equal_generate_with_final_answer(client, reference) -> None:
    for question, answer in zip(HELD_OUT, reference):
        response = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": question}]
        )
        assert response.choices[0].message.content == answer
        assert response.choices[0].finish_reason == "stop"
        assert response.model_extra["final_answer"] == extract_answer(answer)
        usage = response.usage
        assert usage.prompt_tokens > 0 and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
        assert (usage.completion_tokens > 0) == bool(answer)
    system_and_earlier_turns = [
        {"role": "system", "content": "You are a tutor."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi"},
        {"role": "user", "content": HELD_OUT[1]},
    ]
    chunks = list(client.chat.completions.create(model=MODEL, messages=system_and_earlier_turns, stream=True))
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text.strip() == reference[1]
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert chunks[-1].model_extra["final_answer"] == extract_answer(reference[1])


def test_completions_plain_and_streamed(client, reference) -> None:
    response = client.completions.create(model=MODEL, prompt=HELD_OUT[0])
    assert response.choices[0].text == reference[0]
    assert response.model_extra["final_answer"] == extract_answer(reference[0])
    chunks = list(client.completions.create(model=MODEL, prompt=HELD_OUT[2], stream=True))
    assert "".join(chunk.choices[0].text for chunk in chunks).strip() == reference[2]


def test_concurrent_requests_are_all_answered_each_with_its_own_limit(client, reference) -> None:
    def ask(index: int):
        question = HELD_OUT[index % len(HELD_OUT)]
        max_tokens = 3 if index == 5 else None
        return client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": question}], max_tokens=max_tokens
        )

    with ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(pool.map(ask, range(8)))
    for index, response in enumerate(responses):
        expected = reference[index % len(HELD_OUT)]
        content = response.choices[0].message.content
        if index == 5:  # stopped at its own 3 tokens while the rest of its batch went on
            assert response.choices[0].finish_reason == "length" and response.usage.completion_tokens == 3
            assert expected.startswith(content) and len(content) < len(expected)
        else:
            assert content == expected


def test_bad_requests_get_4xx_json_saying_why_and_the_server_keeps_serving(server, client, reference) -> None:
    ask = {"model": MODEL, "messages": [{"role": "user", "content": HELD_OUT[0]}]}
    cases = [
        ({**ask, "max_tokens": 10_000}, openai.BadRequestError, "max_tokens"),
        ({**ask, "messages": []}, openai.BadRequestError, "non-empty list"),
        ({**ask, "messages": [{"role": "system", "content": "x"}]}, openai.BadRequestError, "no message with role 'user'"),
        ({**ask, "messages": [{"role": "user", "content": "ten apples " * 40}]}, openai.BadRequestError, f"allows {MAX_PROMPT_TOKENS}"),
        ({**ask, "n": 2}, openai.BadRequestError, "'n' must be 1"),
        ({**ask, "temperature": 5}, openai.BadRequestError, "temperature"),
        ({**ask, "model": "gpt-4"}, openai.NotFoundError, "does not exist here"),
    ]  # fmt: skip
    for request, error_type, message in cases:
        with pytest.raises(error_type) as error:
            client.chat.completions.create(**request)
        assert message in error.value.body["message"], error.value.body
    status, body = _post(f"{server}/v1/chat/completions", b"{not json")
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    status, body = _post(f"{server}/v1/completions", json.dumps({"prompt": 7}).encode())
    assert status == 400 and body["error"]["param"] == "prompt"
    status, body = _post(f"{server}/v1/completions", b"x" * 2_000_000)
    assert status == 413
    assert client.chat.completions.create(**ask).choices[0].message.content == reference[0]


def test_api_key_is_required_on_every_request(server) -> None:
    wrong = openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError) as error:
        wrong.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": HELD_OUT[0]}])
    assert "API key" in error.value.body["message"]
    assert _get(f"{server}/v1/models", key=None)[0] == 401
    assert _get(f"{server}/health", key=None)[0] == 401
    status, _ = _post(f"{server}/v1/completions", json.dumps({"prompt": HELD_OUT[0]}).encode(), key=None)
    assert status == 401
