"""Safe by default: the listen-address rule and the middleware every request passes through.

Rules, in order (each rejection names the rule in a JSON error body):

1. ``Host`` must be an IP address, ``localhost`` or a name given with ``--allow-host``: a page on a
   stranger's domain that re-resolves to this machine (DNS rebinding) is refused (403).
2. A token, when configured, is required on every request and on the websocket: ``Authorization:
   Bearer T``, the ``loraloom_token`` cookie, or ``?token=T`` (which sets the cookie; 401 otherwise).
3. ``Sec-Fetch-Site: cross-site`` (and ``same-site``: another port or subdomain is another origin) is
   refused (403).
4. An ``Origin`` header must be this server's own origin as the browser sees it (``Origin: null``
   too is refused; 403). This covers the websocket upgrade.
5. A body above the size limit is refused before it is read (413); a body not sent within the body
   timeout is refused (408); JSON bodies are parsed strictly (depth, duplicate keys, non-finite
   numbers; 400). Nothing a request sends is ever evaluated.

The ``Content-Type`` of a request is not a rule: a JSON body is parsed whatever type it is sent with,
as ComfyUI parses it (its API clients send ``requests.post(url, data=json_bytes)``, which has no
type, and the editor saves settings and workflows as ``text/plain``). Requiring
``application/json`` would only add a defence against cross-site request forgery, and that attack is
already stopped by rules 1, 3 and 4, which look at what a browser cannot leave out:

- A page on another site can make a browser send a request without asking this server first only
  as a form post (``application/x-www-form-urlencoded``, ``multipart/form-data``, ``text/plain``) or
  a ``fetch`` limited to those types. Browsers send ``Origin`` with every cross-origin POST (form
  posts included: Chrome, Safari and Firefox since version 70, 2019), ``Origin: null`` from a
  sandboxed frame, a ``data:`` page or after a cross-site redirect, and ``Sec-Fetch-Site:
  cross-site`` (Chrome 76+, Firefox 90+, Safari 16.4+): either refuses it (rules 3 and 4).
- Anything else a page sends across origins (a JSON type, PUT, PATCH, DELETE, a custom header) needs a
  CORS preflight first, which this server never grants (it sends no ``Access-Control-Allow-*``).
- A stranger's domain that re-resolves to this machine (DNS rebinding) is the page's own origin to
  the browser, so ``Origin`` and ``Sec-Fetch-Site`` let it through; the ``Host`` it sends is that
  domain, which rule 1 refuses.
- With a token, a cross-site request has no token either: the cookie is ``SameSite=Strict``.

A client that sends neither ``Origin`` nor ``Sec-Fetch-Site`` is not a current browser (a script,
curl, an API client library) and is accepted whatever its body's type, as the page itself is. What
this gives up: a browser too old to send ``Origin`` on a form post (Firefox before 70, Internet
Explorer) could post a form to a server without a token; so could it to ComfyUI.

Before all of these, a header these rules read (and a presented token) holding bytes that are not
UTF-8 is refused (400): aiohttp hands them on as lone surrogates, which no comparison can use. Other
headers and cookies are never read, so their bytes do not matter (browsers send every cookie of
``localhost``, whichever program set it).

Every response carries ``X-Content-Type-Options: nosniff`` and refuses to be framed.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
from dataclasses import dataclass, field

from aiohttp import web
from yarl import URL

from ..graph_runtime.errors import LoomError

log = logging.getLogger("loraloom.server")

TOKEN_COOKIE = "loraloom_token"
_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}
READ_HEADERS = ("Host", "Sec-Fetch-Site", "Origin", "Upgrade")


class ServerConfigError(LoomError):
    """The server was asked to start in an unsafe or impossible way."""


def is_loopback(address: str) -> bool:
    """Whether ``address`` (an IP address or ``localhost``) only reaches this machine."""
    if address.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(address.strip("[]")).is_loopback
    except ValueError:
        return False


def check_listen(address: str, token: str | None) -> None:
    """Refuse to listen beyond this machine without a token."""
    if not is_loopback(address) and not token:
        raise ServerConfigError(
            f"refusing to listen on {address}: it is reachable from other machines and no token is set, "
            "so anyone on the network could run workflows and read outputs.", value=address, kind="no_token",
            fix="keep the default --listen 127.0.0.1, or set a token with --token T (or LORALOOM_SERVE_TOKEN) "
                "and open http://HOST:PORT/?token=T")


@dataclass
class SecurityPolicy:
    """What the middleware enforces. ``allow_hosts``: extra host names accepted in ``Host``."""

    token: str | None = None
    allow_hosts: frozenset[str] = field(default_factory=frozenset)
    max_body_bytes: int = 32 * 1024 * 1024
    body_timeout: float = 60.0

    def host_allowed(self, host: str) -> bool:
        host = host.lower().rstrip(".")
        if host == "localhost" or host in self.allow_hosts:
            return True
        try:
            ipaddress.ip_address(host.strip("[]"))
            return True  # rebinding needs a domain name: an address literal is never a stranger's page
        except ValueError:
            return False


def error_body(kind: str, message: str, details: str = "", cause: LoomError | None = None) -> dict:
    """A JSON error in the shape of ComfyUI's prompt errors (every error this server answers).

    When one of our errors is the ``cause``, its fields (file, node, input, key, value, limit, fix,
    kind, type) go into ``extra_info``, the free-form part of ComfyUI's shape."""
    extra = cause.fields() if cause is not None else {}
    return {"error": {"type": kind, "message": message, "details": details, "extra_info": extra}}


def reject(status: int, kind: str, message: str, **fields) -> web.Response:
    """The refusal of a request: its rule (``kind``), what was wrong, and any ``value``, ``limit``
    and ``fix`` in ``extra_info`` as for every other error (the message shows the fix too)."""
    refusal = LoomError(message, kind=kind, **fields)
    return web.json_response(error_body(kind, str(refusal), cause=refusal), status=status)


def _split_host(value: str) -> tuple[str, int | None] | None:
    try:
        url = URL(f"http://{value}")
    except ValueError:
        return None
    if not url.host or url.path not in ("", "/") or url.user or url.query_string:
        return None
    return url.host, url.explicit_port


def _origin_matches(origin: str, host: str, port: int | None, scheme: str) -> bool:
    try:
        url = URL(origin)
    except ValueError:
        return False
    if url.scheme not in ("http", "https") or not url.host or url.path not in ("", "/"):
        return False
    default = _DEFAULT_PORTS.get(scheme, 80)
    return (url.scheme == scheme and url.host.lower() == host.lower()
            and (url.explicit_port or _DEFAULT_PORTS[url.scheme]) == (port or default))


def _token_of(request: web.Request) -> tuple[str | None, bool, str]:
    """The token the request presents, whether it came in the query string (asked for explicitly, it
    wins over a cookie that a previous token may have left), and where it came from."""
    if "token" in request.query:
        return request.query["token"], True, "the token query parameter"
    auth = request.headers.get("Authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip(), False, "header 'Authorization'"
    if TOKEN_COOKIE in request.cookies:
        return request.cookies[TOKEN_COOKIE], False, f"cookie {TOKEN_COOKIE!r}"
    return None, False, ""


def _not_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def security_middleware(policy: SecurityPolicy):
    """The aiohttp middleware enforcing ``policy`` (see the module docstring for the rules)."""

    @web.middleware
    async def middleware(request: web.Request, handler):
        refusal, from_query = _check(request, policy)
        if refusal is not None:
            log.warning("refused %s %s: %s", request.method, request.path, refusal.text)
            response = refusal
        elif from_query and request.method == "GET" and request.path == "/" \
                and not request.headers.get("Upgrade"):
            # Keep the token out of the address bar and history: set the cookie, drop the query.
            response = web.Response(status=302, headers={"Location": "/"})
        else:
            try:
                response = await _read_body(request, policy) or await handler(request)
            except web.HTTPException as exc:
                _harden(exc.headers)
                raise
        if from_query and refusal is None and not response.prepared:
            response.set_cookie(TOKEN_COOKIE, policy.token, httponly=True, samesite="Strict", path="/")
        if not response.prepared:
            _harden(response.headers)
        return response

    return middleware


async def _read_body(request: web.Request, policy: SecurityPolicy) -> web.Response | None:
    """Read the body (handlers then get it from aiohttp's cache) within ``policy.body_timeout``; a 408
    refusal when it does not arrive in time."""
    if not request.body_exists:
        return None
    try:
        async with asyncio.timeout(policy.body_timeout):
            await request.read()
    except TimeoutError:
        response = reject(408, "body_timeout", f"the request body did not arrive within {policy.body_timeout:g} s")
        response.force_close()
        return response
    return None


def _harden(headers) -> None:
    headers["X-Content-Type-Options"] = "nosniff"
    headers["X-Frame-Options"] = "DENY"
    headers.setdefault("Content-Security-Policy", "frame-ancestors 'none'")
    headers.setdefault("Referrer-Policy", "same-origin")


def _check(request: web.Request, policy: SecurityPolicy) -> tuple[web.Response | None, bool]:
    for name in READ_HEADERS:
        if _not_utf8(request.headers.get(name, "")):
            return reject(400, "bad_header", f"header {name!r} holds bytes that are not UTF-8"), False
    host_header = request.headers.get("Host", "")
    parsed = _split_host(host_header)
    if parsed is None or not policy.host_allowed(parsed[0]):
        return reject(403, "host_not_allowed",
                      f"Host {host_header!r} is not allowed (a page on another domain resolving to this server?).",
                      value=host_header, fix="open the editor by its address, e.g. http://127.0.0.1:PORT/, or "
                                             "start the server with --allow-host NAME"), False
    host, port = parsed

    from_query = False
    if policy.token:
        presented, from_query, source = _token_of(request)
        if presented is not None and _not_utf8(presented):
            return reject(400, "bad_header", f"the token in {source} holds bytes that are not UTF-8"), False
        if presented is None or not hmac.compare_digest(presented.encode(), policy.token.encode()):
            return reject(401, "unauthorized",
                          "this server requires its token: open http://HOST:PORT/?token=T once, or send "
                          "'Authorization: Bearer T'"), False

    fetch_site = request.headers.get("Sec-Fetch-Site", "").lower()
    if fetch_site in ("cross-site", "same-site"):
        return reject(403, "cross_site", f"requests from other sites are refused (Sec-Fetch-Site: {fetch_site}); "
                                         "open the editor by typing its address"), False

    origin = request.headers.get("Origin")
    if origin is not None and not _origin_matches(origin, host, port, request.scheme):
        return reject(403, "cross_origin", f"Origin {origin!r} is not this server's own origin",
                      value=origin), False

    length = request.content_length
    if length is not None and length > policy.max_body_bytes:
        return reject(413, "too_large", f"a body of {length} bytes is above the limit of "
                                        f"{policy.max_body_bytes} bytes", value=length,
                      limit=policy.max_body_bytes), False
    return None, from_query
