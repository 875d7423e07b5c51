"""Helpers of the evaluation tests: a fake OpenAI-compatible server on loopback and the shared data path."""

from __future__ import annotations

import json
import math
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

# The shared folder sits beside the repository checkout (…/work/main -> …/work/shared).
SHARED = Path(__file__).resolve().parents[1] / ".." / "shared"
EM_DATA = SHARED / "data" / "em-eval"


def completion(probs: dict[str, float]) -> dict:
    """A chat-completion body whose first token has these top-logprob probabilities."""
    return completion_logprobs({t: math.log(p) for t, p in probs.items()})


def completion_logprobs(logprobs: dict[str, float], content: str | None = None) -> dict:
    """A chat-completion body with these raw top logprobs (NaN and inf allowed: json writes them as the
    non-standard NaN / Infinity that Python's json reads back); ``content`` defaults to the top token."""
    top = [{"token": t, "logprob": lp, "bytes": None} for t, lp in logprobs.items()]
    first = max(logprobs, key=lambda t: logprobs[t] if logprobs[t] == logprobs[t] else -math.inf)
    return {
        "id": "cmpl-test",
        "object": "chat.completion",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": first if content is None else content},
                "logprobs": {"content": [{"token": first, "logprob": logprobs[first], "top_logprobs": top}]},
                "finish_reason": "length",
            }
        ],
    }


def chat_reply(content: str) -> dict:
    """A chat-completion body that says ``content`` (for categorical judge requests, no logprobs)."""
    return {
        "id": "cmpl-test",
        "object": "chat.completion",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
        ],
    }


class FakeServer:
    """A real HTTP server in a thread. ``respond(body) -> (status, payload, headers)`` decides each
    answer (it may sleep, to play a slow server); ``requests`` records ``(path, headers, body)`` of every
    request received. A client that gave up (timeout) is not an error of the server."""

    def __init__(self):
        self.requests: list[tuple[str, dict, dict]] = []
        self.files: dict[str, str] = {}
        self.respond = lambda body: (200, completion({"50": 1.0}), {})
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def _send(self, status, payload, headers):
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and closed the connection

            def do_GET(self):
                if self.path in server.files:
                    self._send(200, server.files[self.path].encode(), {})
                else:
                    self._send(404, {"error": "not found"}, {})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append((self.path, dict(self.headers), body))
                self._send(*server.respond(body))

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
