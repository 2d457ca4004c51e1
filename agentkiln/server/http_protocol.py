"""uvicorn's httptools protocol with a bound on the request head.

httptools (llhttp) is uvicorn's fast parser but, unlike h11, takes request lines and headers
of any size; h11 bounds them but parses in pure Python, which cost the gateway 0.3-0.6 ms
of CPU per call (bench/RESULTS.md, 2026-12-02). This keeps httptools and counts the head's
bytes as the parser hands them over: past the bound the connection gets 431 and is closed
before anything reaches the app.
"""

from __future__ import annotations

from typing import Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

MAX_HEAD_BYTES = 64 * 1024  # request line + headers, as h11_max_incomplete_event_size bounded them
_HEADER_OVERHEAD = 4  # ": " and CRLF


class HeadTooLarge(Exception):
    """Raised from a parser callback; httptools turns it into a parser error for this connection."""


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    max_head_bytes = MAX_HEAD_BYTES

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_bytes = 0
        self._head_too_large = False

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = 0

    def _count(self, n: int) -> None:
        self._head_bytes += n
        if self._head_bytes > self.max_head_bytes:
            self._head_too_large = True
            raise HeadTooLarge

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + _HEADER_OVERHEAD)
        super().on_header(name, value)

    def send_400_response(self, msg: str) -> None:
        """uvicorn answers every parser error with this; an oversized head gets 431 instead."""
        if not self._head_too_large:
            super().send_400_response(msg)
            return
        text = f"request line and headers larger than {self.max_head_bytes} bytes"
        content = [STATUS_LINE[431]]
        for name, value in self.server_state.default_headers:
            content.extend([name, b": ", value, b"\r\n"])
        content += [
            b"content-type: text/plain; charset=utf-8\r\n",
            b"content-length: " + str(len(text)).encode("ascii") + b"\r\n",
            b"connection: close\r\n\r\n",
            text.encode("ascii"),
        ]
        self.transport.write(b"".join(content))
        self.transport.close()
