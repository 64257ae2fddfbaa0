"""What every request passes before a route sees it: the Host check, the API key, the browser rules
for the page's endpoints, and the body-size limit.

* Host: only the names the server is bound to (plus ``--allowed-host``) are answered. A page on
  ``evil.example`` whose DNS is re-pointed at 127.0.0.1 (DNS rebinding) reaches the port with
  ``Host: evil.example`` and is refused, so it can neither read the history nor write into it.
* Browsers: a write to ``/api`` must come from the page itself: no cross-site ``Sec-Fetch-Site``, an
  ``Origin`` (when sent) equal to the server's own, ``Content-Type: application/json`` (which a foreign
  page cannot send without a CORS preflight this server never grants) and the per-server CSRF token the
  page carries (a request holding the API key needs no token: browsers never attach it on their own).
  ``/v1`` writes are refused when a browser says they come from another site.
* Body: read here, stopping at the limit, and replayed to the app; later ``receive`` calls go to the
  server so disconnects are still seen while streaming. After a large body the C heap is trimmed, so
  memory a big request needed goes back to the system.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import hmac
import ipaddress
from urllib.parse import urlsplit

from starlette.concurrency import run_in_threadpool

from gptlab.serve.protocol import error_response

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
TRIM_AFTER_BYTES = 1 << 20


def split_host(value: str) -> tuple[str, str]:
    """'Example.com:80' -> ('example.com', '80'); '[::1]:8000' -> ('::1', '8000')."""
    value = value.strip().lower()
    if value.startswith("["):
        name, _, rest = value[1:].partition("]")
        return name, rest[1:] if rest.startswith(":") else ""
    name, _, port = value.partition(":") if value.count(":") == 1 else (value, "", "")
    return name, port


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


class HostPolicy:
    """The Host values a server answers: its bind address, loopback names, ``--allowed-host`` entries;
    any IP literal when bound to all interfaces (a literal address cannot be rebound by DNS); ``*``: all."""

    def __init__(self, bind: str = "127.0.0.1", extra: tuple[str, ...] | list[str] = ()):
        bind = bind.strip("[]").lower()
        self.any = "*" in extra
        self.any_ip = bind in ("0.0.0.0", "::", "")
        self.names = {bind, *LOOPBACK_NAMES} | {split_host(h)[0] for h in extra if h != "*"}

    def allows(self, host_header: str | None) -> bool:
        if self.any:
            return True
        if not host_header:
            return False
        name = split_host(host_header)[0]
        return name in self.names or (self.any_ip and _is_ip(name))


def _trim_heap() -> None:
    """Give freed C-heap memory back to the OS (glibc keeps it otherwise); a no-op elsewhere."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


class GuardMiddleware:
    def __init__(self, app, api_key: str | None, max_body_bytes: int, csrf_token: str,
                 hosts: HostPolicy | None = None):
        self.app, self.api_key, self.max_body = app, api_key, max_body_bytes
        self.csrf, self.hosts = csrf_token, hosts or HostPolicy()

    def _refuse(self, scope, headers: dict, path: str):
        """The response refusing this request before it reaches a route, or None to let it through."""
        if not self.hosts.allows(headers.get("host")):
            return error_response(400, "This server does not answer for that Host header (start it with "
                                  "--allowed-host NAME to add one).", code="invalid_host")
        is_api, is_v1 = path.startswith("/api"), path.startswith("/v1")
        keyed = False
        if self.api_key and (is_api or is_v1):
            auth = headers.get("authorization", "")
            given = auth[7:].strip() if auth[:7].lower() == "bearer " else headers.get("x-api-key", "")
            if not hmac.compare_digest(given.encode(), self.api_key.encode()):
                msg = "Incorrect API key provided." if given else "Missing API key (Authorization: Bearer ...)."
                return error_response(401, msg, code="invalid_api_key")
            keyed = True
        if scope.get("method") not in UNSAFE_METHODS or not (is_api or is_v1):
            return None
        if headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
            return error_response(403, "Cross-site requests are refused.", code="cross_site_request")
        origin = headers.get("origin")
        if origin is not None:
            parts = urlsplit(origin)
            if origin == "null" or not parts.netloc or parts.netloc.lower() != headers.get("host", "").lower():
                return error_response(403, f"Requests from origin {origin!r} are refused.",
                                      code="cross_site_request")
        if is_api:
            media = headers.get("content-type", "").split(";")[0].strip().lower()
            if scope.get("method") != "DELETE" and media != "application/json":
                return error_response(415, "The body must be sent as Content-Type: application/json.",
                                      code="unsupported_media_type")
            if not keyed and not hmac.compare_digest(headers.get("x-csrf-token", "").encode(), self.csrf.encode()):
                return error_response(403, "Missing or wrong X-CSRF-Token (reload the page).",
                                      code="csrf_token_invalid")
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        refusal = self._refuse(scope, headers, path)
        if refusal is not None:
            return await refusal(scope, receive, send)
        too_big = error_response(413, f"Request body larger than {self.max_body} bytes.",
                                 code="request_too_large", headers={"Connection": "close"})
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            if not length.isdigit():
                return await error_response(400, "Bad Content-Length header.")(scope, receive, send)
            return await too_big(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return   # client gone before sending its body
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return await too_big(scope, receive, send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        del headers
        try:
            await self.app(scope, replay, send)
        finally:
            if size > TRIM_AFTER_BYTES:
                chunks.clear()
                await run_in_threadpool(_trim_heap)
