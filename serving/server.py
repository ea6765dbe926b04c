"""The HTTP side of SageMaker's hosting contract: ``GET /ping`` and ``POST /invocations``.

Per "Use Your Own Inference Code with Hosting Services" (SageMaker developer guide): SageMaker
sends both to port 8080 (or SAGEMAKER_BIND_TO_PORT); /ping must answer 200 once the container can
serve, and a container that never does fails the endpoint's creation; /invocations carries the
client's body, Content-Type and Accept, and InvokeEndpoint's CustomAttributes arrive as the
``X-Amzn-SageMaker-Custom-Attributes`` header. SageMaker stops a container with SIGTERM, then
SIGKILL 30 s later.

The standard library's ThreadingHTTPServer is enough: requests wait for the one model in turn
(serving.generation), and /ping answers from its own thread meanwhile. The model loads in the
background so that /ping answers from the first second: 503 while loading, 200 when ready, 500
with the reason (also printed as an ``ERROR:`` line) when it cannot load.

Every answer other than a success is a JSON object on one line, ``{"error": "...", "error_type":
"..."}`` (TGI's shape); a failure inside generation is logged with its traceback, and the client
gets a one-line message, never the traceback.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
import traceback
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from serving import model as served_model
from serving.generation import Completion, Generator
from serving.requests import CUSTOM_ATTRIBUTES_HEADER, EVENT_STREAM, JSON, RequestError, parse
from serving.settings import Settings
from steps.common import contract
from steps.common.contract import StageError


class ModelServer(ThreadingHTTPServer):
    daemon_threads = True  # a stuck client never keeps the container from stopping

    def __init__(self, settings: Settings) -> None:
        super().__init__((settings.host, settings.port), Handler)
        self.settings = settings
        self.generator: Generator | None = None
        self.load_error: str | None = None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def load_model(self) -> None:
        """Load the model (in a background thread); what /ping reports follows."""
        started = time.perf_counter()
        try:
            served = served_model.load(self.settings)
            self.generator = Generator(served, self.settings)
        except StageError as err:
            self.load_error = " ".join(str(err).split())
        except Exception as err:  # noqa: BLE001 (a bug or a broken file: keep the traceback)
            traceback.print_exc()
            self.load_error = f"the model failed to load: {type(err).__name__}: " + " ".join(
                str(err).split())[:500]
        if self.load_error:
            log(f"ERROR: {self.load_error}")
            return
        log(f"serving {served.kind} from {self.settings.model_dir} on {served.device} "
            f"(loaded in {time.perf_counter() - started:.1f} s)"
            + (f"; tenants: {', '.join(served.tenants)}" if served.tenants else ""))


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, and chunked bodies for streamed answers
    server_version = "llm-lifecycle-serving"
    server: ModelServer

    # --- Routes ---

    def do_GET(self) -> None:
        if self.path == "/ping":
            self._ping()
        elif self.path == "/invocations":
            self._error(405, "use POST /invocations", "method")
        else:
            self._error(404, f"no route {self.path}; this container serves GET /ping and POST "
                             "/invocations", "route")

    def do_POST(self) -> None:
        if self.path == "/invocations":
            self._invocations()
        elif self.path == "/ping":
            self._error(405, "use GET /ping", "method")
        else:
            self._error(404, f"no route {self.path}; this container serves GET /ping and POST "
                             "/invocations", "route")

    def _ping(self) -> None:
        if self.server.generator is not None:
            self._send(200, b"", "text/plain")
        elif self.server.load_error is not None:
            self._error(500, self.server.load_error, "loading")
        else:
            self._error(503, "the model is loading", "loading")

    def _invocations(self) -> None:
        body = self._body()
        if body is None:
            return
        generator = self.server.generator
        if generator is None:
            if self.server.load_error is not None:
                self._error(500, self.server.load_error, "loading")
            else:
                self._error(503, "the model is loading; retry when GET /ping answers 200",
                            "loading")
            return
        try:
            request = parse(body, self.headers.get("Content-Type"), self.headers.get("Accept"),
                            self.headers.get(CUSTOM_ATTRIBUTES_HEADER), self.server.settings)
            if request.stream:
                self._stream(generator, request)
                return
            completion = generator.complete(request)
        except RequestError as err:
            self._error(err.status, str(err), "validation")
            return
        except Exception as err:  # noqa: BLE001 (logged with its traceback; the client gets a line)
            traceback.print_exc()
            self._error(500, f"generation failed ({type(err).__name__}); see the endpoint's log",
                        "generation")
            return
        answer = (_generated(request, completion) if request.api == "generate"
                  else _chat_completion(request, completion, self._model_name(request)))
        self._send(200, json.dumps(answer).encode(), JSON)

    # --- Streaming (server-sent events, as TGI sends them) ---

    def _stream(self, generator: Generator, request) -> None:
        cancelled = threading.Event()
        pieces = generator.stream(request, cancelled)
        first = next(pieces)  # refusals (prompt too long, unknown tenant) come before any byte
        self.send_response(200)
        self.send_header("Content-Type", EVENT_STREAM)
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        chat_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        name = self._model_name(request)
        try:
            for piece in _chain(first, pieces):
                if isinstance(piece, Completion):
                    for event in _final_events(request, piece, chat_id, created, name):
                        self._chunk(event)
                else:
                    self._chunk(_piece_event(request, piece, chat_id, created, name))
        except (BrokenPipeError, ConnectionResetError):
            cancelled.set()  # the client left: stop generating for it
            pieces.close()
            self.close_connection = True
            return
        except Exception as err:  # noqa: BLE001 (the status is sent already: tell it in-stream)
            traceback.print_exc()
            pieces.close()
            self._chunk({"error": f"generation failed ({type(err).__name__}); see the endpoint's "
                                  "log", "error_type": "generation"})
        self.wfile.write(b"0\r\n\r\n")

    def _chunk(self, event: dict | str) -> None:
        data = event if isinstance(event, str) else json.dumps(event)
        payload = f"data: {data}\n\n".encode()
        self.wfile.write(f"{len(payload):x}\r\n".encode() + payload + b"\r\n")
        self.wfile.flush()

    # --- Plumbing ---

    def _body(self) -> bytes | None:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self._error(411, "send the request body with a Content-Length header", "validation")
            self.close_connection = True
            return None
        limit = self.server.settings.max_payload_bytes
        if int(length) > limit:
            self._error(413, f"request body is {int(length)} bytes; the limit is {limit} "
                             "(SAGEMAKER_MAX_PAYLOAD_IN_MB)", "validation")
            self.close_connection = True  # its body was not read: the connection cannot go on
            return None
        return self.rfile.read(int(length))

    def _model_name(self, request) -> str:
        if self.server.generator and self.server.generator.served.tenants:
            return request.tenant or request.model or str(self.server.settings.model_dir)
        return str(self.server.settings.model_dir)  # what TGI reports on SageMaker: its model dir

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, message: str, error_type: str) -> None:
        self._send(status, json.dumps({"error": message, "error_type": error_type}).encode(), JSON)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        # SageMaker pings every few seconds: a line per healthy ping would bury everything else.
        if not (self.path == "/ping" and str(code) == "200"):
            log(f'"{self.requestline}" {code}')

    def log_message(self, format: str, *args) -> None:
        log(format % args)


# --- Answers --------------------------------------------------------------------------------------


def _generated(request, completion: Completion) -> list[dict]:
    text = (request.inputs + completion.text) if request.return_full_text else completion.text
    answer: dict = {"generated_text": text}
    if request.details:
        answer["details"] = _details(completion)
    return [answer]


def _details(completion: Completion) -> dict:
    return {"finish_reason": completion.finish_reason,
            "generated_tokens": completion.completion_tokens, "seed": completion.seed}


def _finish_reason(completion: Completion) -> str:
    return "length" if completion.finish_reason == "length" else "stop"  # OpenAI's two


def _usage(completion: Completion) -> dict:
    return {"prompt_tokens": completion.prompt_tokens,
            "completion_tokens": completion.completion_tokens,
            "total_tokens": completion.prompt_tokens + completion.completion_tokens}


def _chat_completion(request, completion: Completion, name: str) -> dict:
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
            "created": int(time.time()), "model": name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": completion.text},
                         "logprobs": None, "finish_reason": _finish_reason(completion)}],
            "usage": _usage(completion)}


def _piece_event(request, piece: str, chat_id: str, created: int, name: str) -> dict:
    if request.api == "generate":
        return {"token": {"text": piece}, "generated_text": None, "details": None}
    return {"id": chat_id, "object": "chat.completion.chunk", "created": created, "model": name,
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": piece},
                         "logprobs": None, "finish_reason": None}]}


def _final_events(request, completion: Completion, chat_id: str, created: int,
                  name: str) -> list[dict | str]:
    if request.api == "generate":
        text = (request.inputs + completion.text) if request.return_full_text else completion.text
        return [{"token": {"text": ""}, "generated_text": text, "details": _details(completion)}]
    return [{"id": chat_id, "object": "chat.completion.chunk", "created": created, "model": name,
             "choices": [{"index": 0, "delta": {}, "logprobs": None,
                          "finish_reason": _finish_reason(completion)}],
             "usage": _usage(completion)}, "[DONE]"]


def _chain(first, rest):
    yield first
    yield from rest


# --- The entry point ------------------------------------------------------------------------------


def log(message: str) -> None:
    print(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def serve(settings: Settings) -> None:
    """Listen, load the model in the background, answer until SIGTERM."""
    contract.set_load_policy(contract.LoadPolicy(
        allow_unsafe_weights=settings.allow_unsafe_weights,
        trust_remote_code=settings.trust_remote_code))
    _quiet_libraries()
    try:
        server = ModelServer(settings)
    except OSError as err:
        raise StageError(f"cannot listen on {settings.host}:{settings.port} ({err.strerror}); "
                         "set SAGEMAKER_BIND_TO_PORT to a free port") from None
    log(f"listening on {server.url}; loading the model from {settings.model_dir}")
    threading.Thread(target=server.load_model, name="load-model", daemon=True).start()

    def stop(signum, frame) -> None:
        log("SIGTERM: stopping")
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()


def _quiet_libraries() -> None:
    # The container's log is CloudWatch's: no progress bars, no notices nobody can act on.
    import warnings

    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="transformers")
