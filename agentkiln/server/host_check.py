"""Who may reach a server without a key: loopback binds only, and only under a loopback Host name.

A server without an API key trusts everyone who can connect, so `kiln serve` refuses to bind
anything but loopback without one. Binding loopback is not enough on its own: a web page can
make the browser resolve its own domain to 127.0.0.1 (DNS rebinding) and then talk to the server
with `Host: evil.example`. The Host check answers those requests 400 before any route runs.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


class UnsafeBindError(ValueError):
    """Serving beyond loopback without an API key."""


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, api_key: str | None) -> None:
    """Refuse (UnsafeBindError) to serve on a non-loopback interface without an API key."""
    if api_key is None and not is_loopback(host):
        raise UnsafeBindError(
            f"refusing to serve on {host} without an API key: anyone who can reach it could read and write "
            "the store. Set --api-key (or KILN_API_KEY), or bind 127.0.0.1."
        )


def _host_name(raw: bytes) -> str:
    text = raw.decode("latin-1").strip().lower()
    if text.startswith("["):  # [::1]:4747
        return text[1 : text.find("]")] if "]" in text else text
    return text.rsplit(":", 1)[0] if text.count(":") == 1 else text


class TrustedHostMiddleware:
    """400 for a request whose Host header is not one of `allowed` (names, without the port)."""

    def __init__(self, app: ASGIApp, allowed: Iterable[str]) -> None:
        self.app = app
        self.allowed = frozenset(h.strip("[]").lower() for h in allowed)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            host = next((v for k, v in scope.get("headers", ()) if k == b"host"), b"")
            if _host_name(host) not in self.allowed:
                body = json.dumps(
                    {
                        "error": {
                            "type": "InvalidHost",
                            "message": f"Host {host.decode('latin-1')[:100]!r} is not served here",
                        }
                    }
                ).encode()
                headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
                await send({"type": "http.response.start", "status": 400, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)
