"""What the serving tests share: packages trained on tiny data, and an endpoint in this process.

`running(folder)` serves a model folder as the container would (serving.server.ModelServer, the
model loaded before the first request) on a free port of 127.0.0.1; `post` and `get` speak HTTP
to it as SageMaker does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serving.server import ModelServer
from serving.settings import Settings

# The same questions, each answered in one easily recognised way.
QUESTIONS = [f"Question {k}?" for k in range(16)]
LORA_ANSWER = "ok ok ok"


def answer_records(answer: str) -> list[dict]:
    return [{"prompt": question, "completion": answer} for question in QUESTIONS]


def train_lora(root: Path) -> Path:
    """A LoRA adapter over builtin:tiny that answers every question LORA_ANSWER (a few seconds)."""
    from tests.steps.stage_runs import run_sft

    return run_sft(root, answer_records(LORA_ANSWER), base_model="builtin:tiny",
                   peft_method="lora", learning_rate=1e-2, max_steps=60, lora_dropout=0.0,
                   logging_steps=30).model_dir


def train_prompt_tuning(root: Path, answer: str) -> Path:
    """A soft prompt of 16 tokens over builtin:tiny that answers every question `answer`."""
    from tests.steps.stage_runs import run_sft

    return run_sft(root, answer_records(answer), base_model="builtin:tiny",
                   peft_method="prompt_tuning", num_virtual_tokens=16, learning_rate=0.5,
                   max_steps=60, logging_steps=30).model_dir


@dataclass
class Endpoint:
    url: str
    server: ModelServer


@contextlib.contextmanager
def running(folder: Path, **settings: Any) -> Iterator[Endpoint]:
    """`folder` served on a free port, its model loaded; `settings` override Settings' fields."""
    server = ModelServer(Settings(model_dir=Path(folder), host="127.0.0.1", port=0, **settings))
    server.load_model()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield Endpoint(server.url, server)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def post(url: str, body: Any, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """POST /invocations; `body` is sent as JSON unless it is bytes."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(f"{url}/invocations", data=data, method="POST",
                                     headers={"Content-Type": "application/json",
                                              **(headers or {})})
    return _send(request)


def get(url: str, path: str = "/ping") -> tuple[int, bytes]:
    return _send(urllib.request.Request(f"{url}{path}"))


def _send(request: urllib.request.Request) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def chat(url: str, content: str, **fields: Any) -> dict:
    status, body = post(url, {"messages": [{"role": "user", "content": content}], **fields})
    assert status == 200, body
    return json.loads(body)


def replace_settings(endpoint: Endpoint, **changes: Any) -> None:
    """Change a running endpoint's limits (what a redeploy with other variables would give)."""
    endpoint.server.settings = dataclasses.replace(endpoint.server.settings, **changes)
    endpoint.server.generator.settings = endpoint.server.settings
