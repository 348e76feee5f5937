"""Support for the fault and bad-input suites (`test_faults.py`, `test_bad_inputs.py`): a toy FOCUS layout, and a
local OpenAI-compatible chat server with scripted behaviour per class.

`FakeOpenAI`: `generate_prompts.py --base-url http://127.0.0.1:{port}/v1` talks to it through the real `openai`
SDK, so the tests exercise the real client code (retries, error mapping, key handling) without a network. The
server reads the class a request is about from the user message ("... must contain the words "{class}"") and
answers by the behaviour set for that class:

    ok        a numbered list of captions that name the class (deterministic in class, seed and count)
    nonsense  an answer without any caption
    error500  HTTP 500 every time, with the Authorization header echoed into the error text (a leaky server)
    hang      no answer until `release()` (or the server stops); `hung` is set when such a request arrives
"""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from semantic_aug.datasets.focus import FOCUS_CLASSES
from semantic_aug.core.embeddings import save_tokens, token_name

CLASS_IN_REQUEST = re.compile(r'must contain the words "([^"]+)"')
COUNT_IN_REQUEST = re.compile(r"Now write (\d+) new captions")
CAPTION_TEMPLATES = (
    "a photo of a {cls} in the snow", "a photo of a red {cls} at night", "a photo of a small {cls} on a beach",
    "a photo of an old {cls} in a kitchen", "a photo of a {cls} in the rain at dawn",
    "a photo of a shiny {cls} in a forest", "a photo of a {cls} on a busy street", "a photo of a dark {cls} indoors",
    "a photo of a wooden {cls} in a garden", "a photo of a {cls} in the desert at noon",
)
HANG_LIMIT_S = 60.0  # a hanging request gives up after this long, so a forgotten release cannot block a test run
RETRY_AFTER_MS = "5"  # tells the SDK to retry after 5 ms instead of its 0.5 s exponential backoff
TINY_TEXT_WIDTH = 32  # the embedded tiny SD's text encoder width
TOY_IMAGE_SHAPE = (24, 32, 3)  # height, width, channels of the random toy pictures


def write_focus_layout(root: Path, train_val_per_class: int = 9, test_per_class: int = 1, seed: int = 0) -> Path:
    """FOCUS's folder layout under `root` with random 32x24 JPEGs: by default 9 train-val images per class (8 in
    the training pool, 1 for validation) and 1 test image. Returns `root`."""
    rng = np.random.default_rng(seed)
    for split, count in (("train-val", train_val_per_class), ("test", test_per_class)):
        for name in FOCUS_CLASSES:
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 256, TOY_IMAGE_SHAPE, dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.jpg")
    return root


def write_focus_tokens(path: Path, classes=FOCUS_CLASSES, width: int = TINY_TEXT_WIDTH, seed: int = 0) -> Path:
    """A token file `<class>` -> random vector for `classes`, as aggregate_embeddings.py writes it. Returns `path`."""
    generator = torch.Generator().manual_seed(seed)
    save_tokens({token_name(name): torch.randn(width, generator=generator) for name in classes}, path)
    return path


class FakeOpenAI:
    """Start with `with FakeOpenAI() as server:`; `server.base_url` goes to `--base-url`.

    Attributes:
        behaviour: class name (as the model reads it, spaces not `_`) -> `ok` | `nonsense` | `error500` | `hang`;
            classes not listed get `default`.
        requests: (class name, Authorization header) of every chat request, in arrival order.
        hung: set when a `hang` request has arrived.
    """

    def __init__(self, default: str = "ok", behaviour: dict[str, str] | None = None):
        self.default = default
        self.behaviour = dict(behaviour or {})
        self.requests: list[tuple[str, str]] = []
        self.hung = threading.Event()
        self._release = threading.Event()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def requests_for(self, class_name: str) -> int:
        with self._lock:
            return sum(1 for name, _ in self.requests if name == class_name)

    def release(self) -> None:
        """Let hanging requests go on (they then answer like `ok`)."""
        self._release.set()

    def __enter__(self) -> "FakeOpenAI":
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._release.set()
        self._server.shutdown()
        self._server.server_close()

    def answer(self, class_name: str, count: int, seed: int) -> str:
        """The `ok` answer: `count` numbered captions, rotated by the seed so that different tries differ."""
        start = seed % len(CAPTION_TEMPLATES)
        lines = [CAPTION_TEMPLATES[(start + i) % len(CAPTION_TEMPLATES)].format(cls=class_name) for i in range(count)]
        return "\n".join(f"{i}. {line}" for i, line in enumerate(lines, start=1))

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep the test output clean
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                text = " ".join(str(m.get("content", "")) for m in body.get("messages", []))
                class_match, count_match = CLASS_IN_REQUEST.search(text), COUNT_IN_REQUEST.search(text)
                class_name = class_match.group(1) if class_match else ""
                authorization = self.headers.get("Authorization", "")
                with server._lock:
                    server.requests.append((class_name, authorization))
                behaviour = server.behaviour.get(class_name, server.default)
                if behaviour == "hang":
                    server.hung.set()
                    server._release.wait(HANG_LIMIT_S)
                if behaviour == "error500":
                    self._send(500, {"error": {"message": f"internal error while serving {authorization}",
                                               "type": "server_error"}})
                    return
                content = ("I am sorry, I only talk about the weather." if behaviour == "nonsense" else
                           server.answer(class_name, int(count_match.group(1)) if count_match else 5,
                                         int(body.get("seed") or 0)))
                self._send(200, {"id": "chatcmpl-fake", "object": "chat.completion", "created": 0,
                                 "model": body.get("model", "fake"),
                                 "choices": [{"index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant", "content": content}}],
                                 "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

            def _send(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode("utf-8")
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.send_header("retry-after-ms", RETRY_AFTER_MS)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client was killed mid-request: exactly what a kill test does

        return Handler
