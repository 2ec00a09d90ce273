"""A local HTTP server that speaks OpenAI chat completions, for tests of the kit's endpoint clients.

The real ``openai`` client talks to it over a socket; only the remote model is stood in for.
``respond(request) -> Reply`` decides each answer; ``request`` holds the parsed body, the text of
the last user message, its image (a PIL image, if a data URL was sent) and the Authorization header.
"""
from __future__ import annotations

import base64
import io
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable


@dataclass
class Request:
    body: dict
    text: str
    image: object | None
    authorization: str | None
    path: str = "/v1/chat/completions"


@dataclass
class Reply:
    """``content``: a normal completion; else ``status`` with ``body`` (raw text), or ``sleep`` first
    (a time-out when longer than the client's)."""

    content: str | None = None
    status: int = 200
    body: str | None = None
    ctype: str = "application/json"
    sleep: float = 0.0
    headers: dict = field(default_factory=lambda: {"Retry-After": "0"})


def completion(content: str, model: str = "m") -> str:
    return json.dumps({"id": "c1", "object": "chat.completion", "created": 0, "model": model,
                       "choices": [{"index": 0, "finish_reason": "stop",
                                    "message": {"role": "assistant", "content": content}}]})


class ChatServer:
    """``with ChatServer(respond, key=...) as srv:`` → ``srv.url`` (``http://127.0.0.1:<port>/v1``);
    with ``key`` a request without ``Authorization: Bearer <key>`` gets 401. ``srv.requests`` lists
    every :class:`Request` received."""

    def __init__(self, respond: Callable[[Request], Reply], key: str | None = None):
        self.respond, self.key = respond, key
        self.requests: list[Request] = []
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code: int, body: str, ctype: str, headers: dict) -> None:
                data = body.encode()
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                    pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                content = body["messages"][-1]["content"]
                parts = content if isinstance(content, list) else [{"type": "text", "text": content}]
                text = "\n".join(p["text"] for p in parts if p.get("type") == "text")
                image = None
                for p in parts:
                    if p.get("type") == "image_url":
                        from PIL import Image

                        url = p["image_url"]["url"]
                        assert url.startswith("data:image/"), url[:40]
                        image = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")
                req = Request(body, text, image, self.headers.get("Authorization"), self.path)
                with outer.lock:
                    outer.requests.append(req)
                if outer.key is not None and req.authorization != f"Bearer {outer.key}":
                    return self._send(401, json.dumps({"error": {"message": "invalid api key"}}),
                                      "application/json", {})
                if not self.path.endswith("/chat/completions"):
                    return self._send(404, json.dumps({"error": {"message": f"no route {self.path}"}}),
                                      "application/json", {})
                r = outer.respond(req)
                if r.sleep:
                    time.sleep(r.sleep)
                if r.content is not None:
                    return self._send(200, completion(r.content, body.get("model", "m")), r.ctype, r.headers)
                return self._send(r.status, r.body if r.body is not None else "", r.ctype, r.headers)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self) -> "ChatServer":
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
