"""Safe by default: every rule, each rejected request asserted next to the same request from the
page's own origin, accepted."""

import os

import pytest
from aiohttp import WSServerHandshakeError
from yarl import URL

from loraloom.server import ServerConfig, ServerConfigError, check_listen, create_app

SIMPLE_PROMPT = {"1": {"class_type": "Const", "inputs": {"value": 1}},
                 "2": {"class_type": "Show", "inputs": {"x": ["1", 0], "text": ""}}}


def page(server, **extra) -> dict:
    """The headers a browser sends for the editor's own requests."""
    return {"Origin": server.origin, "Sec-Fetch-Site": "same-origin", **extra}


async def attempt(server, kind: str, headers: dict) -> int:
    """The status of one kind of request with ``headers``: a page load, an API read, a prompt, the websocket."""
    client = server.client
    if kind == "page":
        return (await client.get("/", headers=headers)).status
    if kind == "read":
        return (await client.get("/api/queue", headers=headers)).status
    if kind == "prompt":
        return (await client.post("/api/prompt", json={"prompt": SIMPLE_PROMPT}, headers=headers)).status
    try:
        ws = await client.ws_connect("/ws", headers=headers)
    except WSServerHandshakeError as exc:
        return exc.status
    await ws.close()
    return 101


KINDS = ["page", "read", "prompt", "ws"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("host", ["evil.example", "evil.example:8188", "127.0.0.1.nip.io", "a b", ""])
async def test_foreign_host_headers_are_refused(serve, kind, host):
    async with serve() as server:
        assert await attempt(server, kind, {"Host": host}) == 403, f"Host {host!r} (DNS rebinding)"
        assert await attempt(server, kind, page(server)) in (200, 101), "the page's own request"


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::1]", "10.1.2.3", "mybox", "MyBox.lan."])
async def test_loopback_addresses_and_allowed_hosts_are_accepted(serve, host):
    async with serve(allow_hosts=("mybox", "mybox.lan")) as server:
        port = server.client.port
        origin = f"http://{host.lower()}:{port}"
        headers = {"Host": f"{host}:{port}", "Origin": origin, "Sec-Fetch-Site": "same-origin"}
        assert await attempt(server, "prompt", headers) == 200, f"Host {host}"
        assert await attempt(server, "ws", headers) == 101


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("site", ["cross-site", "same-site"])
async def test_requests_from_other_sites_are_refused(serve, kind, site):
    async with serve() as server:
        assert await attempt(server, kind, {"Sec-Fetch-Site": site}) == 403, f"Sec-Fetch-Site: {site}"
        assert await attempt(server, kind, {"Sec-Fetch-Site": "same-origin"}) in (200, 101)
        assert await attempt(server, kind, {"Sec-Fetch-Site": "none"}) in (200, 101), "a typed address"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("origin", ["http://evil.example", "null", "http://127.0.0.1:1", "https://127.0.0.1:{port}",
                                    "http://localhost:{port}", "http://127.0.0.1:{port}/path", "file://"])
async def test_foreign_origins_are_refused(serve, kind, origin):
    async with serve() as server:
        origin = origin.format(port=server.client.port)
        assert await attempt(server, kind, {"Origin": origin}) == 403, f"Origin {origin}"
        assert await attempt(server, kind, {"Origin": server.origin}) in (200, 101), "the server's own origin"


# Every route that takes a JSON body, with a body it accepts: ComfyUI reads each whatever its type.
JSON_POSTS = [("/api/prompt", '{"prompt": {"1": {"class_type": "Const", "inputs": {}}, '
                              '"2": {"class_type": "Show", "inputs": {"x": ["1", 0]}}}}'),
              ("/api/queue", '{"delete": []}'), ("/api/history", '{"delete": []}'), ("/api/interrupt", "{}"),
              ("/api/free", '{"free_memory": true}'), ("/api/jobs/cancel", '{"job_ids": []}'),
              ("/api/settings", '{"Comfy.A": 1}'), ("/api/settings/Comfy.B", "2"),
              ("/api/userdata/workflows%2Fw.json", '{"nodes": []}')]
# What a page on another site can make a browser send without a CORS preflight: a form post's types.
FORM_TYPES = ["application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "text/plain"]


async def post_all(server, headers: dict) -> list[int]:
    """The status of each of JSON_POSTS sent with ``headers`` (and no other Content-Type)."""
    statuses = []
    for path, body in JSON_POSTS:
        resp = await server.client.post(URL(path, encoded=True), data=body.encode(), headers=headers,
                                        skip_auto_headers=["Content-Type"])
        statuses.append(resp.status)
    return statuses


async def nothing_changed(server) -> None:
    client = server.client
    assert server.state.store.remaining() == 0 and await (await client.get("/api/history")).json() == {}
    settings = await (await client.get("/api/settings")).json()
    assert "Comfy.A" not in settings and "Comfy.B" not in settings
    assert (await client.get("/api/userdata/workflows%2Fw.json")).status == 404


@pytest.mark.parametrize("content_type", [None, "application/json", "text/plain", "application/octet-stream",
                                          *FORM_TYPES[:2]])
@pytest.mark.parametrize("sender", ["client", "page"])
async def test_json_bodies_are_read_whatever_their_type(serve, content_type, sender):
    """A script or API client (no Origin, no Sec-Fetch-Site) and the page itself (its own origin) may
    send a JSON body with any type, or none, as ComfyUI allows."""
    async with serve() as server:
        headers = {"Content-Type": content_type} if content_type else {}
        if sender == "page":
            headers.update(page(server))
        statuses = await post_all(server, headers)
        assert statuses == [200] * len(JSON_POSTS), list(zip([p for p, _ in JSON_POSTS], statuses))
        assert await (await server.client.get("/api/settings/Comfy.B")).json() == 2
        assert (await server.client.get("/api/userdata/workflows%2Fw.json")).status == 200


@pytest.mark.parametrize("content_type", FORM_TYPES)
@pytest.mark.parametrize("browser", [
    {"Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site"},  # a current browser
    {"Origin": "http://evil.example"},  # one that predates Sec-Fetch-Site
    {"Origin": "http://127.0.0.1:1", "Sec-Fetch-Site": "same-site"},  # another port of this machine
    {"Origin": "null", "Sec-Fetch-Site": "cross-site"},  # a sandboxed frame, a data: page, a redirect
    {"Origin": "null"},
    {"Sec-Fetch-Site": "cross-site"},  # Origin stripped (e.g. by a privacy extension)
])
async def test_a_cross_site_form_post_is_refused_whatever_its_type(serve, content_type, browser):
    async with serve() as server:
        statuses = await post_all(server, {"Content-Type": content_type, **browser})
        assert statuses == [403] * len(JSON_POSTS), list(zip([p for p, _ in JSON_POSTS], statuses))
        await nothing_changed(server)


@pytest.mark.parametrize("content_type", FORM_TYPES)
@pytest.mark.parametrize("fetch_site", ["same-origin", None])
@pytest.mark.parametrize("with_origin", [True, False])
async def test_a_rebound_domain_is_refused_whatever_its_type(serve, content_type, fetch_site, with_origin):
    """DNS rebinding: evil.example re-resolves to 127.0.0.1, so to the browser its page and this
    server are one origin; only the Host it sends gives it away."""
    async with serve() as server:
        port = server.client.port
        headers = {"Content-Type": content_type, "Host": f"evil.example:{port}"}
        if with_origin:
            headers["Origin"] = f"http://evil.example:{port}"
        if fetch_site:
            headers["Sec-Fetch-Site"] = fetch_site
        statuses = await post_all(server, headers)
        assert statuses == [403] * len(JSON_POSTS), list(zip([p for p, _ in JSON_POSTS], statuses))
        await nothing_changed(server)


@pytest.mark.parametrize("origin", ["http://evil.example", None])
async def test_no_cors_preflight_is_ever_granted(serve, origin):
    """What a page on another site must ask before sending JSON, PUT, PATCH or DELETE: never granted."""
    async with serve() as server:
        for method in ("POST", "PUT", "DELETE"):
            headers = {"Access-Control-Request-Method": method, "Access-Control-Request-Headers": "content-type"}
            if origin:
                headers["Origin"] = origin
            resp = await server.client.options("/api/prompt", headers=headers)
            assert resp.status >= 400, f"preflight for {method}: {resp.status}"
            assert not [h for h in resp.headers if h.lower().startswith("access-control-")], dict(resp.headers)


async def test_body_size_limit(serve):
    async with serve(max_body_bytes=2048) as server:
        big = {"prompt": SIMPLE_PROMPT, "extra_data": {"pad": "x" * 4096}}
        resp = await server.client.post("/api/prompt", json=big, headers=page(server))
        assert resp.status == 413, "a body above the limit is refused before it is read"

        async def chunks():
            for _ in range(8):
                yield b" " * 1024
        resp = await server.client.post("/api/prompt", data=chunks(), headers=page(server, **{
            "Content-Type": "application/json"}))
        assert resp.status == 413, "a chunked body is cut off at the limit"
        resp = await server.client.post("/api/prompt", json={"prompt": SIMPLE_PROMPT}, headers=page(server))
        assert resp.status == 200


async def test_nesting_limit(serve):
    async with serve() as server:
        deep = "[" * 200 + "]" * 200
        resp = await server.client.post("/api/settings/Comfy.Deep", data=deep, headers=page(server))
        assert resp.status == 400 and "nesting" in (await resp.json())["error"]["message"]
        resp = await server.client.post("/api/settings/Comfy.Deep", data="[[1]]", headers=page(server))
        assert resp.status == 200


@pytest.mark.parametrize("address", ["0.0.0.0", "::", "192.168.1.5", "example.com"])
def test_a_non_loopback_address_needs_a_token(address):
    with pytest.raises(ServerConfigError, match="no token"):
        check_listen(address, None)
    check_listen(address, "a-token")


@pytest.mark.parametrize("address", ["127.0.0.1", "127.0.0.2", "localhost", "::1"])
def test_loopback_needs_no_token(address):
    check_listen(address, None)


@pytest.mark.parametrize("kind", KINDS)
async def test_a_configured_token_is_required_everywhere(serve, kind):
    async with serve(token="t0k3n") as server:
        assert await attempt(server, kind, page(server)) == 401, "no token"
        assert await attempt(server, kind, page(server, Authorization="Bearer wrong")) == 401, "a wrong token"
        assert await attempt(server, kind, page(server, Cookie="loraloom_token=wrong")) == 401
        assert await attempt(server, kind, page(server, Authorization="Bearer t0k3n")) in (200, 101)
        assert await attempt(server, kind, page(server, Cookie="loraloom_token=t0k3n")) in (200, 101)


async def test_opening_the_page_with_the_token_sets_a_cookie_and_drops_it_from_the_address(serve):
    async with serve(token="t0k3n") as server:
        resp = await server.client.get("/?token=t0k3n", allow_redirects=False)
        assert resp.status == 302 and resp.headers["Location"] == "/"
        cookie = resp.headers["Set-Cookie"]
        assert "loraloom_token=t0k3n" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
        assert (await server.client.get("/api/queue")).status == 200, "the cookie is the token from now on"
        server.client.session.cookie_jar.clear()
        assert (await server.client.get("/?token=nope", allow_redirects=False)).status == 401
        resp = await server.client.get("/?token=t0k3n", allow_redirects=False,
                                       headers={"Cookie": "loraloom_token=an-old-token"})
        assert resp.status == 302, "an explicit token replaces a stale cookie"
        server.client.session.cookie_jar.clear()
        ws = await server.client.ws_connect("/ws?token=t0k3n")
        await ws.close()


async def test_every_response_refuses_sniffing_and_framing(serve):
    async with serve() as server:
        for path in ("/", "/api/queue", "/api/history/nope", "/assets/index.js"):
            resp = await server.client.get(path)
            assert resp.headers["X-Content-Type-Options"] == "nosniff", path
            assert resp.headers["X-Frame-Options"] == "DENY", path


@pytest.fixture
def outputs(tmp_path):
    """An output folder with an image, a temp preview, files that are not images, and a secret beside it."""
    out = tmp_path / "output"
    (out / "temp").mkdir(parents=True)
    (out / "sub").mkdir()
    png = b"\x89PNG\r\n\x1a\n" + b"\0" * 16
    (out / "a.png").write_bytes(png)
    (out / "sub" / "b.png").write_bytes(png)
    (out / "temp" / "p.png").write_bytes(png)
    (out / "x.svg").write_text("<svg onload='alert(1)'/>")
    (out / "page.html").write_text("<script>alert(1)</script>")
    (tmp_path / "secret.png").write_bytes(b"SECRET")
    os.symlink(tmp_path / "secret.png", out / "link.png")
    return out


@pytest.mark.parametrize("query", [
    "filename=../secret.png",
    "filename=secret.png&subfolder=..",
    "filename=secret.png&subfolder=sub/../..",
    "filename=%2e%2e%2fsecret.png",
    "filename=%2E%2E/secret.png",
    "filename=secret.png&subfolder=%2e%2e",
    "filename=..%5csecret.png",
    "filename=a.png%00.txt",
    "filename=/etc/passwd",
    "filename=C:/secret.png",
    "filename=link.png",
    "filename=a.png&type=input",
    "filename=../output/a.png&type=temp",
])
async def test_view_refuses_paths_out_of_the_output_folder(serve, outputs, query):
    async with serve() as server:
        resp = await server.client.get(URL(f"/api/view?{query}", encoded=True), headers=page(server))
        body = await resp.read()
        assert resp.status in (400, 404), f"/view?{query} answered {resp.status}"
        assert b"SECRET" not in body and b"root:" not in body


@pytest.mark.parametrize("query", ["filename=.a.png.0a1b2c-77.x1y2.tmp", "filename=w.png&subfolder=.m.0a1b2c-77.x1y2.tmp",
                                   "filename=w.png&subfolder=sub/.hidden", "filename=.p.png.0a1b2c-77.q.tmp&type=temp",
                                   "filename=.hidden.png"])
async def test_view_never_serves_hidden_names(serve, outputs, query):
    """A save's temp file or folder (or one a killed save left) is not an output."""
    for folder in (outputs / ".m.0a1b2c-77.x1y2.tmp", outputs / "sub" / ".hidden"):
        folder.mkdir()
        (folder / "w.png").write_bytes(b"HALF")
    for path in (outputs / ".a.png.0a1b2c-77.x1y2.tmp", outputs / "temp" / ".p.png.0a1b2c-77.q.tmp",
                 outputs / ".hidden.png"):
        path.write_bytes(b"HALF")
    async with serve() as server:
        resp = await server.client.get(URL(f"/view?{query}", encoded=True))
        assert resp.status == 404 and b"HALF" not in await resp.read(), query


async def test_view_serves_images_inline_and_nothing_else(serve, outputs):
    async with serve() as server:
        for query in ("filename=a.png", "filename=b.png&subfolder=sub", "filename=p.png&type=temp",
                      "filename=%2561.png"):
            resp = await server.client.get(URL(f"/view?{query}", encoded=True))
            if "%25" in query:  # double-encoded: the literal name '%61.png', which does not exist
                assert resp.status == 404
                continue
            assert (resp.status, resp.content_type) == (200, "image/png"), query
            assert resp.headers["Content-Disposition"].startswith("inline")
        for name in ("x.svg", "page.html"):
            resp = await server.client.get("/api/view", params={"filename": name})
            assert resp.status == 200 and resp.content_type == "application/octet-stream", name
            assert resp.headers["Content-Disposition"].startswith("attachment"), f"{name} is not shown inline"
            assert resp.headers["X-Content-Type-Options"] == "nosniff"


@pytest.mark.parametrize("name", ["..%2Fqueue.sqlite3", "%2E%2E%2Fx.json", "%2Fetc%2Fpasswd", "..%5Cx.json",
                                  "a%00.json", "workflows%2F..%2F..%2Fx.json", "evil.py", "out.json"])
async def test_user_files_stay_in_the_user_folder(serve, tmp_path, name):
    (tmp_path / "x.json").write_text('{"secret": 1}')
    async with serve() as server:
        user = server.state.userdata.root
        os.symlink(tmp_path / "x.json", user / "out.json")
        url = URL(f"/api/userdata/{name}", encoded=True)
        read = await server.client.get(url, headers=page(server))
        assert read.status in (400, 404) and b"secret" not in await read.read(), f"GET {name}"
        write = await server.client.post(url, data=b"{}", headers=page(server))
        assert write.status == 400, f"POST {name}"
        moved = await server.client.post(URL(f"/api/userdata/workflows%2Fa.json/move/{name}", encoded=True),
                                         headers=page(server))
        assert moved.status in (400, 404), f"move to {name}"
    assert (tmp_path / "x.json").read_text() == '{"secret": 1}'


async def test_settings_and_saved_workflows_live_in_the_user_folder(serve, tmp_path):
    async with serve() as server:
        headers = page(server)
        assert (await server.client.post("/api/settings/Comfy.TutorialCompleted", data="true",
                                         headers=headers)).status == 200
        assert (await server.client.post("/api/settings", data='{"Comfy.A": [1, 2]}', headers=headers)).status == 200
        assert await (await server.client.get("/api/settings")).json() == {
            "Comfy.TutorialCompleted": True, "Comfy.A": [1, 2], "Comfy.Notification.ShowVersionUpdates": False}
        assert (tmp_path / "user" / "default" / "comfy.settings.json").is_file()

        url = "/api/userdata/workflows%2Fmine.json"
        resp = await server.client.post(url + "?overwrite=false&full_info=true", data='{"nodes": []}', headers=headers)
        info = await resp.json()
        assert resp.status == 200 and info["path"] == "workflows/mine.json" and info["size"] == 13
        assert (await server.client.post(url + "?overwrite=false", data="{}", headers=headers)).status == 409
        assert (await server.client.post(url, data="not json", headers=headers)).status == 400
        listing = await (await server.client.get("/api/userdata?dir=workflows&recurse=true&full_info=true")).json()
        assert [f["path"] for f in listing] == ["mine.json"]
        assert await (await server.client.get("/api/userdata?dir=workflows&split=true")).json() == \
            [["mine.json", "mine.json"]]
        assert await (await server.client.get(url)).json() == {"nodes": []}
        resp = await server.client.post("/api/userdata/workflows%2Fmine.json/move/workflows%2Fyours.json",
                                        headers=headers)
        assert (await resp.json()) == "workflows/yours.json"
        assert (await server.client.delete("/api/userdata/workflows%2Fyours.json", headers=headers)).status == 204
        assert (await server.client.get("/api/userdata/workflows%2Fyours.json")).status == 404
        assert (await server.client.get("/api/userdata?dir=nope")).status == 404


def test_the_user_folder_is_never_the_package(make_runtime, tmp_path):
    import loraloom

    package = os.path.dirname(loraloom.__file__)
    with pytest.raises(ServerConfigError, match="inside the installed package"):
        create_app(make_runtime(), ServerConfig(user_dir=os.path.join(package, "user")))


def test_default_user_folder(monkeypatch, tmp_path):
    from loraloom.server import default_user_dir

    assert default_user_dir({"LORALOOM_USER_DIR": str(tmp_path)}) == tmp_path
    assert default_user_dir({"XDG_DATA_HOME": str(tmp_path)}) == tmp_path / "loraloom"
    assert default_user_dir({}).parts[-3:] == (".local", "share", "loraloom")


async def test_view_never_shows_where_a_symlink_points(serve, outputs, tmp_path):
    async with serve() as server:
        resp = await server.client.get("/api/view?filename=link.png", headers=page(server))
        body = await resp.text()
        assert resp.status == 400 and "link.png" in body
        assert str(tmp_path) not in body, f"the answer shows a path on disk: {body}"


@pytest.mark.parametrize("name, kind", [("workflows%2F" + "x" * 300 + ".json", "name_too_long"),
                                        ("workflows%2Fdir.json", "is_folder")])
async def test_user_file_names_the_disk_cannot_take_are_400(serve, name, kind):
    async with serve() as server:
        (server.state.userdata.root / "workflows" / "dir.json").mkdir()
        (server.state.userdata.root / "workflows" / "a.json").write_text("{}")
        url = URL(f"/api/userdata/{name}", encoded=True)
        for resp in (await server.client.post(url, data=b"{}", headers=page(server)),
                     await server.client.post(URL(f"/api/userdata/workflows%2Fa.json/move/{name}?overwrite=true",
                                                  encoded=True), headers=page(server))):
            body = await resp.json()
            assert resp.status == 400 and body["error"]["extra_info"]["kind"] == kind, body


@pytest.mark.parametrize("header", [b"Authorization: Bearer \xff\xfe", b"Cookie: loraloom_token=\xffx",
                                    b"Origin: http://caf\xe9"])
@pytest.mark.parametrize("token", [None, "T"])
async def test_headers_that_are_not_utf8_are_400_before_auth(serve, header, token):
    """Refused when read (an Origin always, a token when one is required); ignored otherwise."""
    import asyncio

    async with serve(token=token) as server:
        reader, writer = await asyncio.open_connection(server.client.host, server.client.port)
        writer.write(b"GET /api/queue HTTP/1.1\r\nHost: 127.0.0.1\r\n" + header + b"\r\nConnection: close\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        if token is None and not header.startswith(b"Origin"):
            assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
            return
        assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
        assert b"bad_header" in answer and b"not UTF-8" in answer
