"""The console's HTTP server: the page, its JSON API, and who may use them.

The console acts with the user's AWS credentials (it can start executions and approve or
promote models), so it answers only its user, as Jupyter does:

- It listens on 127.0.0.1 unless told otherwise.
- It prints a URL with a random token. Opening it sets a cookie (HttpOnly, SameSite=Strict)
  and the page carries the token in a <meta> tag; every API call sends it in the
  X-Console-Token header. A read accepts the cookie or the header; a change (POST) needs the
  header, which a page of another origin cannot set on a request to this one without a CORS
  preflight, and this server allows no CORS at all.
- The Host header must name this server (a page on a rebound DNS name is refused), and a
  request whose Origin is another origin, or whose Sec-Fetch-Site is not same-origin (or
  none: the user's own navigation), is refused before anything runs. Another port of
  127.0.0.1 counts as another origin, though browsers call it the same site and send it the
  cookie.
- The evaluation report (HTML from S3, written by a job) is served under a sandbox CSP:
  no scripts, an opaque origin, so it cannot act as the console.
"""

from __future__ import annotations

import hmac
import html
import json
import mimetypes
import secrets
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from datetime import date, datetime
from http import HTTPStatus
from http.cookies import CookieError, SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from botocore.exceptions import BotoCoreError, ClientError

from pipelines import UserError
from pipelines.console import api

STATIC = Path(__file__).with_name("static")
TOKEN_HEADER = "X-Console-Token"
MAX_BODY = 64 * 1024
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
# The page's own files only: no CDN, no inline script, no framing by other pages.
PAGE_POLICY = ("default-src 'self'; img-src 'self' data:; style-src 'self'; frame-src 'self'; "
               "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; "
               "frame-ancestors 'none'")
# A report is a job's output: shown in the page's frame, with no scripts and an opaque origin.
REPORT_POLICY = ("sandbox; default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
                 "frame-ancestors 'self'")


def _json_default(value):
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    return str(value)


def _one(query: dict[str, list[str]], name: str) -> str:
    values = query.get(name)
    if not values or not values[0]:
        raise UserError(f"missing query parameter {name!r}")
    return values[0]


# Each route: (method, path) -> function(target, query, body) -> JSON-ready result.
Route = Callable[[api.Target, dict, dict], object]
ROUTES: dict[tuple[str, str], Route] = {
    ("GET", "/api/overview"): lambda t, q, b: api.overview(t),
    ("GET", "/api/pipelines"): lambda t, q, b: api.list_pipelines(t),
    ("GET", "/api/pipeline"): lambda t, q, b: api.pipeline(t, _one(q, "name")),
    ("GET", "/api/execution"): lambda t, q, b: api.execution(t, _one(q, "arn")),
    ("GET", "/api/step"): lambda t, q, b: api.step(t, _one(q, "arn"), _one(q, "step")),
    ("GET", "/api/packages"): lambda t, q, b: api.packages(t, q.get("group", [""])[0]),
    ("GET", "/api/diff"): lambda t, q, b: api.diff(t, _one(q, "a"), _one(q, "b")),
    ("POST", "/api/start"): lambda t, q, b: api.start(t, b.get("pipeline", ""),
                                                      b.get("parameters") or {}),
    ("POST", "/api/stop"): lambda t, q, b: api.stop(t, b.get("arn", "")),
    ("POST", "/api/retry"): lambda t, q, b: api.retry(t, b.get("arn", "")),
    ("POST", "/api/rerun"): lambda t, q, b: api.rerun(t, b.get("arn", ""), b.get("step", "")),
    ("POST", "/api/approval"): lambda t, q, b: api.set_approval(
        t, b.get("arn", ""), b.get("status", ""), b.get("reason", "")),
    ("POST", "/api/promote"): lambda t, q, b: api.promote(
        t, b.get("arn", ""), b.get("group", ""), b.get("reason")),
}


class ConsoleServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, target: api.Target, host: str = "127.0.0.1", port: int = 0,
                 token: str | None = None) -> None:
        self.target = target
        self.token = token or secrets.token_urlsafe(32)
        super().__init__((host, port), ConsoleRequest)
        self.port = self.server_address[1]
        self.cookie_name = f"llm-console-{self.port}"  # cookies ignore ports: one per console
        # The Host header a browser sends for this server. Bound to every interface, any name
        # may reach it: only the token guards it then.
        self.any_host = host in ("0.0.0.0", "::", "")
        self.hosts = {f"{name}:{self.port}" for name in (*LOOPBACK_NAMES, host)}

    @property
    def url(self) -> str:
        host = self.server_address[0]
        shown = "127.0.0.1" if self.any_host else (f"[{host}]" if ":" in host else host)
        return f"http://{shown}:{self.port}/"


class ConsoleRequest(BaseHTTPRequestHandler):
    server: ConsoleServer
    server_version = "llm-pipeline-console"
    sys_version = ""

    # -- who is asking ---------------------------------------------------------------------

    def _refusal(self) -> str | None:
        """Why this request is refused for where it comes from, or None."""
        host = self.headers.get("Host", "")
        if not self.server.any_host and host not in self.server.hosts:
            return f"refused: Host {host!r} is not this console"
        origin = self.headers.get("Origin")
        if origin is not None and origin != f"http://{host}":
            return f"refused: a request from another origin ({origin})"
        site = self.headers.get("Sec-Fetch-Site")
        if site is not None and site not in ("same-origin", "none"):
            return f"refused: a {site} request"
        return None

    def _cookie_token(self) -> str:
        cookie = SimpleCookie()
        try:
            cookie.load(self.headers.get("Cookie", ""))
        except CookieError:  # a malformed Cookie header is no token
            return ""
        morsel = cookie.get(self.server.cookie_name)
        return morsel.value if morsel else ""

    def _valid(self, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(token.encode(), self.server.token.encode())

    # -- responses -------------------------------------------------------------------------

    def _send(self, status: int, body: bytes, content_type: str, policy: str = PAGE_POLICY,
              headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Content-Security-Policy", policy)
        if "frame-ancestors 'none'" in policy:
            self.send_header("X-Frame-Options", "DENY")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, value) -> None:
        self._send(status, json.dumps(value, default=_json_default).encode(),
                   "application/json; charset=utf-8")

    def _error(self, status: int, line: str) -> None:
        self._json(status, {"error": line})

    def log_message(self, format: str, *args) -> None:
        pass  # quiet: request lines would print the token of the first one

    # -- methods ---------------------------------------------------------------------------

    def do_GET(self) -> None:
        refused = self._refusal()
        if refused:
            print(f"console: {refused} ({self.command} {urlsplit(self.path).path})",
                  file=sys.stderr)
            self._error(HTTPStatus.FORBIDDEN, refused)
            return
        parts = urlsplit(self.path)
        query = parse_qs(parts.query)
        if parts.path == "/":
            self._page(query.get("token", [None])[0])
        elif parts.path.startswith("/api/"):
            if not (self._valid(self.headers.get(TOKEN_HEADER)) or self._valid(self._cookie_token())):
                self._error(HTTPStatus.FORBIDDEN, "refused: no console token; open the URL the "
                                                  "console printed at start")
            elif parts.path == "/api/report":
                self._report(query)
            else:
                self._call("GET", parts.path, query, {})
        else:
            self._static(parts.path)

    do_HEAD = do_GET

    def do_POST(self) -> None:
        refused = self._refusal()
        if refused:
            print(f"console: {refused} ({self.command} {urlsplit(self.path).path})",
                  file=sys.stderr)
            self._error(HTTPStatus.FORBIDDEN, refused)
            return
        if not self._valid(self.headers.get(TOKEN_HEADER)):
            self._error(HTTPStatus.FORBIDDEN, f"refused: a change needs the {TOKEN_HEADER} "
                                              "header; use the console's page")
            return
        if self.headers.get_content_type() != "application/json":
            self._error(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "refused: send application/json")
            return
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "refused: request too large")
            return
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except ValueError:
            body = None
        if not isinstance(body, dict):
            self._error(HTTPStatus.BAD_REQUEST, "refused: the body is not a JSON object")
            return
        self._call("POST", urlsplit(self.path).path, {}, body)

    def _not_allowed(self) -> None:
        # No CORS: a preflight (OPTIONS) gets no Access-Control-Allow-* and so fails.
        self._error(HTTPStatus.METHOD_NOT_ALLOWED, f"{self.command} is not served")

    do_OPTIONS = do_PUT = do_DELETE = do_PATCH = _not_allowed

    # -- what is served --------------------------------------------------------------------

    def _page(self, query_token: str | None) -> None:
        if self._valid(query_token):
            # The token leaves the address bar (and history) for a cookie of this console.
            cookie = (f"{self.server.cookie_name}={self.server.token}; HttpOnly; "
                      "SameSite=Strict; Path=/")
            self._send(HTTPStatus.SEE_OTHER, b"", "text/plain",
                       headers={"Location": "/", "Set-Cookie": cookie})
            return
        if not self._valid(self._cookie_token()):
            self._send(HTTPStatus.FORBIDDEN, (STATIC / "locked.html").read_bytes(),
                       "text/html; charset=utf-8")
            return
        page = (STATIC / "index.html").read_text(encoding="utf-8")
        page = page.replace("{{token}}", self.server.token)
        self._send(HTTPStatus.OK, page.encode(), "text/html; charset=utf-8")

    def _static(self, path: str) -> None:
        file = (STATIC / path.lstrip("/")).resolve()
        if (not file.is_relative_to(STATIC.resolve()) or not file.is_file()
                or file.name.endswith(".html")):
            self._error(HTTPStatus.NOT_FOUND, f"no {path}")
            return
        kind = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
        if kind == "text/javascript" or file.suffix == ".js":
            kind = "text/javascript"
        self._send(HTTPStatus.OK, file.read_bytes(), f"{kind}; charset=utf-8")

    def _report(self, query: dict) -> None:
        try:
            body = api.report(self.server.target, _one(query, "uri"))
        except (UserError, ClientError, BotoCoreError) as exc:  # shown in the frame, one line
            body = f"<p>{html.escape(api.error_line(exc))}</p>".encode()
        self._send(HTTPStatus.OK, body, "text/html; charset=utf-8", policy=REPORT_POLICY,
                   headers={"X-Frame-Options": "SAMEORIGIN"})

    def _call(self, method: str, path: str, query: dict, body: dict) -> None:
        route = ROUTES.get((method, path))
        if route is None:
            self._error(HTTPStatus.NOT_FOUND, f"no {method} {path}")
            return
        try:
            result = route(self.server.target, query, body)
        except UserError as exc:
            self._error(HTTPStatus.BAD_REQUEST, api.error_line(exc))
        except (ClientError, BotoCoreError) as exc:
            self._error(HTTPStatus.BAD_GATEWAY, api.error_line(exc))
        except Exception as exc:  # noqa: BLE001 (a bug: the page gets one line, the terminal the traceback)
            traceback.print_exc()
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, api.error_line(exc))
        else:
            self._json(HTTPStatus.OK, result)


def serve(target: api.Target, host: str = "127.0.0.1", port: int = 8765) -> None:
    """Serve until interrupted, after printing the URL to open."""
    try:
        console = ConsoleServer(target, host, port)
    except OSError as exc:
        raise UserError(f"cannot listen on {host}:{port} ({exc.strerror}); pass another --port "
                        "(0 picks a free one)") from None
    if console.any_host:
        print(f"WARNING: listening on every interface ({host}); anyone who can reach this "
              "machine can reach the console, which only the token guards", file=sys.stderr)
    print(f"llm-pipeline console ({target.kind}: {target.endpoint}, region {target.region})")
    print(f"open {console.url}?token={console.token}", flush=True)
    if threading.current_thread() is threading.main_thread():
        # Ctrl-C and a service manager's SIGTERM both stop it, even where the shell started it
        # in the background with SIGINT ignored (which Python then leaves ignored).
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.default_int_handler)
    try:
        console.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        console.server_close()
