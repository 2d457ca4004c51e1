"""A stand-in for `python -m vllm.entrypoints.openai.api_server`, for the supervisor's fast tests.

Takes vLLM's command line (only --port and --served-model-name matter), answers /health, and
appends each LoRA load/unload to the file named by $FAKE_VLLM_LOG, so a test sees what a
restarted server was asked to load. Run by tests/fake_vllm/python (a stand-in interpreter).
"""

import json
import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

args = sys.argv[1:]
port = int(args[args.index("--port") + 1])
record = os.environ["FAKE_VLLM_LOG"]


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def _answer(self, code: int, body: bytes) -> None:
        self.send_response(code)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self._answer(200 if self.path == "/health" else 404, b"")

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["content-length"])) or b"{}")
        if self.path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
            with open(record, "a") as f:
                f.write(json.dumps({"pid": os.getpid(), "path": self.path, **body}) + "\n")
            self._answer(200, b"Success")
        elif self.path == "/v1/completions":
            self._answer(200, json.dumps({"choices": [{"index": 0, "token_ids": [], "logprobs": None}]}).encode())
        else:
            self._answer(404, b"")


ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
