"""``phi2tutor serve``: a trained tutor behind an OpenAI-compatible HTTP API, on LitServe.

POST /v1/chat/completions and /v1/completions (server-sent events with ``"stream": true``), GET /v1/models
and GET /health. Each answer carries the extracted final answer as an extra top-level field
``final_answer``. Requests are batched (LitServe's batched streaming loop); greedy unless the request asks
for a temperature above 0. Binds 127.0.0.1 unless told otherwise; with --api_key every request needs
``Authorization: Bearer KEY``. Malformed or over-limit requests get a 4xx JSON error in OpenAI's shape,
and never stop the server.

The tutor answers one question: the last user message of a chat (earlier turns and system messages are not
part of its prompt, as in training), or a completion's ``prompt``; the tutor's prompt template is applied.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import queue
import sys
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any

import litserve as ls
from fastapi import Depends, HTTPException, Request
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from litserve.specs.base import LitSpec
from litserve.utils import LitAPIStatus, ResponseBufferItem

from phi2tutor.errors import Phi2TutorError

CHAT_PATH = "/v1/chat/completions"
MAX_BODY_BYTES = 1_000_000  # a question is a few hundred bytes; LitServe answers larger bodies with 413
COMPLETIONS_PATH = "/v1/completions"
MODELS_PATH = "/v1/models"
# Request fields the tutor cannot honour: a request that sets them gets a 400 rather than a silent no-op.
UNSUPPORTED_FIELDS = (
    "tools",
    "functions",
    "logprobs",
    "top_logprobs",
    "stop",
    "response_format",
    "logit_bias",
    "suffix",
    "echo",
    "best_of",
)


@dataclass
class ServeLimits:
    """What one request may ask for."""

    max_tokens: int = 512
    """Largest max_tokens (max_completion_tokens) a request may set."""
    max_prompt_tokens: int = 1024
    """Longest prompt, in tokens with the template applied."""
    default_max_tokens: int = 256
    """Answer length when the request sets none (the run's max_new_tokens, capped at max_tokens)."""


def error_response(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> JSONResponse:
    """An error body in OpenAI's shape, which its clients turn into a typed exception with this message."""
    kind = {401: "authentication_error", 404: "not_found_error"}.get(status, "invalid_request_error")
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code


def _int_field(body: dict[str, Any], name: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"'{name}' must be an integer, got {json.dumps(value)}.", name)
    if not low <= value <= high:
        raise BadRequest(f"'{name}' is {value}; this server allows {low} to {high}.", name)
    return value


def _float_field(body: dict[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRequest(f"'{name}' must be a number, got {json.dumps(value)}.", name)
    if not low <= value <= high:
        raise BadRequest(f"'{name}' is {value}; it must be between {low} and {high}.", name)
    return float(value)


def _message_text(message: Any, index: int) -> str:
    if not isinstance(message, dict) or "role" not in message:
        raise BadRequest(f"messages[{index}] must be an object with 'role' and 'content'.", "messages")
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [
            part.get("text") for part in content if isinstance(part, dict) and part.get("type") == "text"
        ]
        if len(texts) != len(content) or not all(isinstance(t, str) for t in texts):
            raise BadRequest(
                f"messages[{index}].content may hold only text parts: the tutor reads text.", "messages"
            )
        return "\n".join(texts)
    raise BadRequest(f"messages[{index}].content must be a string or a list of text parts.", "messages")


class TutorSpec(LitSpec):
    """OpenAI's chat completions, completions and models endpoints over one LitServe request queue.

    The endpoints validate each request (limits, fields) before it is queued, so a bad request is answered
    at once with a 400 and never reaches the worker; the worker streams text pieces that are turned into
    OpenAI's response or server-sent-event chunks here.
    """

    def __init__(self, model_id: str, limits: ServeLimits, tokenizer_dir: str, prompt_template: str) -> None:
        super().__init__()
        self.api_path = CHAT_PATH
        self.model_id = model_id
        self.limits = limits
        self.tokenizer_dir = tokenizer_dir
        self.prompt_template = prompt_template
        self._tokenizer = None

    @property
    def stream(self) -> bool:
        return True

    def pre_setup(self, lit_api: ls.LitAPI) -> None:
        self.add_endpoint(CHAT_PATH, self.chat_completions, ["POST"])
        self.add_endpoint(COMPLETIONS_PATH, self.completions, ["POST"])
        self.add_endpoint(MODELS_PATH, self.models, ["GET"])

    def decode_request(self, request, context_kwargs=None):
        return request

    def encode_response(self, output, context_kwargs=None):
        yield from output

    # ------------------------------------------------------------------ endpoints
    async def models(self, request: Request) -> JSONResponse:
        model = {"id": self.model_id, "object": "model", "created": 0, "owned_by": "phi2tutor"}
        return JSONResponse({"object": "list", "data": [model]})

    async def chat_completions(self, request: Request):
        return await self._handle(request, chat=True)

    async def completions(self, request: Request):
        return await self._handle(request, chat=False)

    async def _handle(self, request: Request, chat: bool):
        try:
            body = await self._json_body(request)
            job = self._job(body, chat)
        except BadRequest as error:
            return error_response(error.status, error.message, error.param, error.code)
        uid = uuid.uuid4()
        pieces: deque = deque()
        event = asyncio.Event()
        self.response_buffer[uid] = ResponseBufferItem(response_queue=pieces, event=event)
        self.request_queue.put((self.response_queue_id, uid, time.monotonic(), job))
        stream = self.data_streamer(pieces, event, send_status=True)
        kind = "chat.completion" if chat else "text_completion"
        response_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:12]}"
        if body.get("stream"):
            return StreamingResponse(
                self._sse(stream, uid, chat, kind, response_id, job), media_type="text/event-stream"
            )
        return await self._whole(stream, uid, chat, kind, response_id, job)

    async def _json_body(self, request: Request) -> dict[str, Any]:
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError) as error:
            raise BadRequest(f"The request body is not valid JSON: {error}.") from None
        if not isinstance(body, dict):
            raise BadRequest("The request body must be a JSON object.")
        return body

    def _job(self, body: dict[str, Any], chat: bool) -> dict[str, Any]:
        """Validate a request against the limits; the worker's input (question and decoding settings)."""
        model = body.get("model")
        if model not in (None, "", self.model_id):
            raise BadRequest(
                f"The model '{model}' does not exist here; this server serves '{self.model_id}' (GET {MODELS_PATH}).",
                "model",
                404,
                "model_not_found",
            )
        for name in UNSUPPORTED_FIELDS:
            if body.get(name) not in (None, False, [], {}):
                raise BadRequest(f"'{name}' is not supported by the tutor; leave it out.", name)
        if body.get("n", 1) not in (1, None):
            raise BadRequest("'n' must be 1: the tutor gives one answer per request.", "n")
        if not isinstance(body.get("stream", False), bool):
            raise BadRequest("'stream' must be true or false.", "stream")
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise BadRequest(
                    "'messages' must be a non-empty list of {role, content} objects.", "messages"
                )
            texts = [
                (m.get("role") if isinstance(m, dict) else None, _message_text(m, i))
                for i, m in enumerate(messages)
            ]
            users = [text for role, text in texts if role == "user"]
            if not users:
                raise BadRequest(
                    "'messages' has no message with role 'user': there is no question to answer.", "messages"
                )
            question = users[-1]
        else:
            question = body.get("prompt")
            if isinstance(question, list) and len(question) == 1 and isinstance(question[0], str):
                question = question[0]
            if not isinstance(question, str):
                raise BadRequest("'prompt' must be a string (one question).", "prompt")
        if not question.strip():
            raise BadRequest("The question is empty.", "messages" if chat else "prompt")
        limits = self.limits
        max_tokens = _int_field(body, "max_completion_tokens", 1, limits.max_tokens)
        if max_tokens is None:
            max_tokens = _int_field(body, "max_tokens", 1, limits.max_tokens)
        prompt_tokens = self._prompt_tokens(question)
        if prompt_tokens > limits.max_prompt_tokens:
            raise BadRequest(
                f"The prompt is {prompt_tokens} tokens long; this server allows {limits.max_prompt_tokens}.",
                "messages" if chat else "prompt",
                code="context_length_exceeded",
            )
        return {
            "question": question,
            "max_new_tokens": max_tokens or limits.default_max_tokens,
            # Greedy unless asked: OpenAI's default temperature of 1 would make the tutor irreproducible.
            "temperature": _float_field(body, "temperature", 0.0, 0.0, 2.0),
            "top_p": _float_field(body, "top_p", 1.0, 1e-6, 1.0),
            "prompt_tokens": prompt_tokens,
        }

    def _prompt_tokens(self, question: str) -> int:
        from phi2tutor.prompts import format_prompt

        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_dir)
        return len(self._tokenizer(format_prompt(self.prompt_template, question))["input_ids"])

    # ------------------------------------------------------------------ responses
    async def _pieces(self, stream, uid):
        """The worker's items for one request: dicts with text, and a last one with the finish."""
        try:
            async for data, status in stream:
                if status == LitAPIStatus.ERROR:
                    detail = (
                        getattr(data, "detail", None) or "the tutor failed to answer (see the server log)"
                    )
                    raise HTTPException(getattr(data, "status_code", 500), detail)
                if status != LitAPIStatus.OK:
                    continue
                item = json.loads(data) if isinstance(data, str) else data
                if item.get("skip"):
                    continue
                yield item
        finally:
            self.response_buffer.pop(uid, None)

    def _usage(self, job, item) -> dict[str, int]:
        completion = item.get("completion_tokens", 0)
        return {
            "prompt_tokens": job["prompt_tokens"],
            "completion_tokens": completion,
            "total_tokens": job["prompt_tokens"] + completion,
        }

    async def _whole(self, stream, uid, chat, kind, response_id, job):
        texts, last = [], {}
        try:
            async for item in self._pieces(stream, uid):
                texts.append(item.get("text", ""))
                last = item
        except HTTPException as error:
            return error_response(error.status_code, str(error.detail))
        text = last.get("answer", "".join(texts).strip())
        finish = last.get("finish_reason", "stop")
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        body = {
            "id": response_id,
            "object": kind,
            "created": int(time.time()),
            "model": self.model_id,
            "choices": [choice],
            "usage": self._usage(job, last),
            "final_answer": last.get("final_answer"),
        }
        return JSONResponse(body)

    async def _sse(self, stream, uid, chat, kind, response_id, job):
        created = int(time.time())
        chunk_kind = f"{kind}.chunk" if chat else kind

        def chunk(choice: dict[str, Any], **extra: Any) -> str:
            body = {"id": response_id, "object": chunk_kind, "created": created, "model": self.model_id}
            body.update(choices=[choice], **extra)
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        try:
            if chat:
                yield chunk(
                    {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                )
            async for item in self._pieces(stream, uid):
                text = item.get("text", "")
                finish = item.get("finish_reason")
                if text:
                    delta = {"delta": {"content": text}} if chat else {"text": text, "logprobs": None}
                    yield chunk({"index": 0, **delta, "finish_reason": None})
                if finish is not None:
                    delta = {"delta": {}} if chat else {"text": "", "logprobs": None}
                    yield chunk(
                        {"index": 0, **delta, "finish_reason": finish},
                        usage=self._usage(job, item),
                        final_answer=item.get("final_answer"),
                    )
            yield "data: [DONE]\n\n"
        except HTTPException as error:
            body = {
                "error": {"message": str(error.detail), "type": "server_error", "param": None, "code": None}
            }
            yield f"data: {json.dumps(body)}\n\n"


class TutorAPI(ls.LitAPI):
    """The worker: loads the tutor once, answers batches of questions, streaming each answer's text."""

    def __init__(self, path: str, overrides: dict[str, Any], api_key: str | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.path = path
        self.overrides = overrides
        self.api_key = api_key

    def authorize(
        self, credentials: HTTPAuthorizationCredentials | None = Depends(HTTPBearer(auto_error=False))
    ):
        """With --api_key, every request must carry ``Authorization: Bearer KEY`` (as OpenAI clients send it)."""
        if self.api_key is None:
            return
        if credentials is None or credentials.credentials != self.api_key:
            raise HTTPException(
                401, "Missing or wrong API key: send 'Authorization: Bearer KEY' with the server's --api_key."
            )

    def setup(self, device: str) -> None:
        from phi2tutor.tutor import load_tutor

        self.module = load_tutor(self.path, self.overrides, device=device)

    def predict(self, jobs):
        if isinstance(jobs, dict):  # max_batch_size 1: LitServe's unbatched loop hands one request
            for step in self._answer_batch([jobs]):
                if step[0] is not None:
                    yield step[0]
            return
        yield from self._answer_batch(jobs)

    def unbatch(self, output):
        yield from output

    def encode_response(self, output):
        for item in output:
            if isinstance(item, list):
                yield [entry if entry is not None else {"skip": True} for entry in item]
            else:
                yield item

    def _answer_batch(self, jobs: list[dict[str, Any]]):
        """Per generation step, one entry per job: a text piece, its finish, or None when it has nothing new.

        Jobs with the same decoding settings generate together; the groups run one after another.
        """
        groups: dict[tuple[float, float], list[int]] = {}
        for index, job in enumerate(jobs):
            key = (job["temperature"], job["top_p"] if job["temperature"] > 0 else 1.0)
            groups.setdefault(key, []).append(index)
        for (temperature, top_p), indices in groups.items():
            for step in self._generate_group([jobs[i] for i in indices], temperature, top_p):
                entries: list[dict[str, Any] | None] = [None] * len(jobs)
                for position, entry in zip(indices, step):
                    entries[position] = entry
                yield entries

    def _generate_group(self, jobs, temperature: float, top_p: float):
        from phi2tutor.grading import extract_answer
        from phi2tutor.prompts import format_prompt
        from phi2tutor.tutor import GenerationSettings

        module = self.module
        template = module.hparams.prompt_template
        # TutorModule.generate runs a batch in order of prompt length (a stable sort): sorted here first,
        # the streamer's rows are these jobs in this order.
        order = sorted(range(len(jobs)), key=lambda i: len(format_prompt(template, jobs[i]["question"])))
        ordered = [jobs[i] for i in order]
        limits = [job["max_new_tokens"] for job in ordered]
        streamer = BatchTextStreamer(module.tokenizer, limits)
        settings = GenerationSettings(max(limits), temperature, top_p)
        results: list[list[str]] = []
        failure: list[BaseException] = []

        def run() -> None:
            try:
                results.append(
                    module.generate(
                        [job["question"] for job in ordered],
                        batch_size=len(ordered),
                        streamer=streamer,
                        stopping_criteria=streamer.stopping_criteria(),
                        **settings.generate_kwargs(),
                    )
                )
            except BaseException as error:
                failure.append(error)
            finally:
                streamer.finish()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        for step in streamer:
            yield [step[order.index(i)] for i in range(len(jobs))]
        thread.join()
        if failure:
            raise failure[0]
        answers = results[0]
        finals = []
        for row in range(len(ordered)):
            answer = answers[row]
            finals.append(
                {
                    "text": streamer.remaining(row),
                    "finish_reason": streamer.finish_reason(row),
                    "completion_tokens": streamer.count(row),
                    "answer": answer,
                    "final_answer": extract_answer(answer),
                }
            )
        yield [finals[order.index(i)] for i in range(len(jobs))]


class BatchTextStreamer:
    """A transformers streamer for a batch: per generation step, each row's newly decodable text.

    transformers' TextIteratorStreamer handles one sequence; this one keeps a token list per row, stops a
    row at EOS or at its own token limit (a per-row stopping criterion), and holds back an incomplete
    UTF-8 character until its last byte arrives.
    """

    _END = object()

    def __init__(self, tokenizer, limits: list[int]) -> None:
        self.tokenizer = tokenizer
        self.limits = limits
        self.tokens: list[list[int]] = [[] for _ in limits]
        self.sent = [0] * len(limits)  # characters already streamed per row
        self.finished: list[str | None] = [None] * len(limits)
        self.queue: queue.Queue = queue.Queue()
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:  # the first call is the prompt
            self.prompt_seen = True
            return
        ids = value.view(-1).tolist() if value.dim() <= 1 else value[:, -1].tolist()
        step: list[dict[str, Any] | None] = []
        for row, token in enumerate(ids):
            if self.finished[row] is not None:
                step.append(None)
                continue
            if token == self.tokenizer.eos_token_id:
                self.finished[row] = "stop"
                step.append(None)
                continue
            self.tokens[row].append(token)
            if len(self.tokens[row]) >= self.limits[row]:
                self.finished[row] = "length"
            text = self._printable(row)
            step.append({"text": text} if text else None)
        self.queue.put(step)

    def end(self) -> None:
        """transformers calls it when generate returns; the thread's finish() ends the iteration."""

    def finish(self) -> None:
        self.queue.put(self._END)

    def __iter__(self):
        while True:
            step = self.queue.get()
            if step is self._END:
                return
            yield step

    def _decoded(self, row: int) -> str:
        return self.tokenizer.decode(self.tokens[row], skip_special_tokens=True)

    def _printable(self, row: int) -> str:
        text = self._decoded(row)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
            return ""
        new = text[self.sent[row] :]
        self.sent[row] = len(text)
        return new

    def remaining(self, row: int) -> str:
        text = self._decoded(row)
        new = text[self.sent[row] :]
        self.sent[row] = len(text)
        return new

    def finish_reason(self, row: int) -> str:
        return self.finished[row] or "length"

    def count(self, row: int) -> int:
        return len(self.tokens[row])

    def stopping_criteria(self):
        """Stop each row once it has its own max_tokens (generate runs to the largest)."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        streamer = self

        class RowLimits(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                done = [reason is not None for reason in streamer.finished]
                return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

        return StoppingCriteriaList([RowLimits()])


def build_parser() -> argparse.ArgumentParser:
    from phi2tutor.chat import add_tutor_arguments

    parser = argparse.ArgumentParser(
        prog="phi2tutor serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_tutor_arguments(parser)
    parser.add_argument(
        "--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)"
    )
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument(
        "--api_key", default=None, help="require 'Authorization: Bearer API_KEY' on every request"
    )
    parser.add_argument(
        "--model_id", default=None, help="the model name clients use (default: the directory's name)"
    )
    parser.add_argument(
        "--device", default="auto", help="cpu, cuda or auto (default: the GPU when there is one)"
    )
    parser.add_argument(
        "--max_tokens", type=int, default=512, help="largest max_tokens a request may ask for (default 512)"
    )
    parser.add_argument(
        "--max_prompt_tokens",
        type=int,
        default=1024,
        help="longest prompt in tokens, template included (default 1024)",
    )
    parser.add_argument(
        "--max_batch_size", type=int, default=8, help="requests generated together (default 8)"
    )
    parser.add_argument(
        "--batch_timeout", type=float, default=0.05, help="seconds to wait for a batch to fill (default 0.05)"
    )
    parser.add_argument(
        "--timeout", type=float, default=120, help="seconds a request may wait in the queue (default 120)"
    )
    return parser


def build_server(args: argparse.Namespace):
    """The LitServer for parsed ``phi2tutor serve`` arguments (the model loads when it runs)."""
    from phi2tutor.chat import overrides_from
    from phi2tutor.model import TutorModule
    from phi2tutor.tutor import locate_tutor, tutor_settings

    for name in ("max_tokens", "max_prompt_tokens", "max_batch_size"):
        if getattr(args, name) < 1:
            raise Phi2TutorError(f"--{name} must be at least 1, got {getattr(args, name)}.")
    source = locate_tutor(args.path)
    overrides = overrides_from(args)
    settings = tutor_settings(source, overrides)
    # The tokenizer saved beside the adapter counts prompt tokens in the HTTP process (the worker has the model).
    prompt_template = settings.get("prompt_template") or _default(TutorModule, "prompt_template")
    max_new_tokens = settings.get("max_new_tokens") or _default(TutorModule, "max_new_tokens")
    limits = ServeLimits(args.max_tokens, args.max_prompt_tokens, min(max_new_tokens, args.max_tokens))
    model_id = args.model_id or _model_id(source)
    spec = TutorSpec(model_id, limits, str(source.adapter_dir), prompt_template)
    api = TutorAPI(
        args.path,
        overrides,
        args.api_key,
        max_batch_size=args.max_batch_size,
        batch_timeout=args.batch_timeout,
        spec=spec,
    )
    accelerator = "cpu" if args.device == "cpu" else ("cuda" if args.device.startswith("cuda") else "auto")
    server = ls.LitServer(
        api, accelerator=accelerator, devices=1, timeout=args.timeout, max_payload_size=MAX_BODY_BYTES
    )
    install_error_handlers(server.app)
    return server, model_id, limits


def _default(cls, name: str):
    import inspect

    return inspect.signature(cls.__init__).parameters[name].default


def _model_id(source) -> str:
    directory = source.run_dir or source.adapter_dir
    name = directory.resolve().name
    return f"{directory.resolve().parent.name}-{name}" if name.startswith("version_") else name


def install_error_handlers(app) -> None:
    """Errors FastAPI raises itself (wrong key, unknown path, wrong method, oversized body) in OpenAI's shape."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    async def http_error(request, error: StarletteHTTPException):
        return error_response(error.status_code, str(error.detail))

    async def validation_error(request, error: RequestValidationError):
        return error_response(400, f"Invalid request: {error.errors()[:1]}")

    async def server_error(request, error: Exception):
        return error_response(500, f"Internal error: {type(error).__name__} (see the server log).")

    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, server_error)
    app.add_exception_handler(RequestValidationError, validation_error)


def main_serve(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    server, model_id, limits = build_server(args)
    print(
        f"phi2tutor | serving {model_id!r} from {args.path} on http://{args.host}:{args.port}/v1 "
        f"(chat/completions, completions, models; GET /health) | max_tokens {limits.max_tokens}, "
        f"prompt {limits.max_prompt_tokens} tokens, batches of {args.max_batch_size}"
        + (" | API key required" if args.api_key else ""),
        file=sys.stderr,
    )
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(
            f"phi2tutor | notice: --host {args.host} accepts connections from other machines, and no --api_key is set",
            file=sys.stderr,
        )
    server.run(host=args.host, port=args.port, generate_client_file=False, num_api_servers=1)
