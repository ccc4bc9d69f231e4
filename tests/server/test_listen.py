"""`loraloom serve` refused at the socket: a port in use, out of range or forbidden, an address this
machine does not have. Each is one line naming the option to change (and a free port to try), printed
before any address is announced, exit code 2 (a usage error, as README says), never a traceback."""

import errno
import os
import re
import socket
import subprocess
import sys

import pytest

from loraloom.cli import main
from loraloom.server import ServerConfigError
from loraloom.server.net import bind


def _serve_args(tmp_path, *options: str) -> list[str]:
    return ["serve", "--user-dir", str(tmp_path / "user"), "--output-dir", str(tmp_path / "out"),
            "--lora-dir", str(tmp_path), *options]


def _one_line(err: str) -> str:
    assert "Traceback" not in err and err.count("\n") == 1 and err.startswith("error: "), err
    return err


@pytest.fixture
def busy_port():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        yield busy.getsockname()[1]


def test_a_busy_port_is_one_line_naming_port_and_a_free_one_before_any_url(tmp_path, busy_port):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "loraloom.cli", *_serve_args(tmp_path, "--port", str(busy_port))],
                          capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert proc.stdout == "", "nothing is announced (no URL) for a server that does not start"
    err = _one_line(proc.stderr)
    assert f"--port {busy_port}" in err and f"127.0.0.1:{busy_port}" in err and "in use" in err, err
    suggested = re.search(r"Fix: .*--port (\d+) is free", err)
    assert suggested and int(suggested.group(1)) != busy_port, err
    with socket.create_server(("127.0.0.1", int(suggested.group(1)))):
        pass  # the suggestion was (and, a moment later, still is) a port this machine can bind


def test_a_refused_server_leaves_its_user_folder_free(tmp_path, busy_port, capsys):
    from loraloom.server.app import UserDirLock

    assert main(_serve_args(tmp_path, "--port", str(busy_port))) == 2
    _one_line(capsys.readouterr().err)
    UserDirLock(tmp_path / "user", 1).release()  # would raise if the refused server kept its lock


@pytest.mark.parametrize("port", [65536, 70000, -1])
def test_a_port_out_of_range_is_refused_not_wrapped_around(tmp_path, port, capsys):
    with pytest.raises(ServerConfigError) as refused:
        bind("127.0.0.1", port)  # the socket library alone binds 70000 as 70000 % 65536 = 4464
    assert refused.value.kind == "bad_port" and refused.value.limit == "0..65535"
    assert main(_serve_args(tmp_path, f"--port={port}")) == 2
    err = _one_line(capsys.readouterr().err)
    assert f"--port {port} is not a port number" in err and "Fix:" in err, err


@pytest.mark.parametrize("address, says", [("192.0.2.1", "this machine has no such address"),
                                           ("no-such-host.invalid", "cannot listen there"),
                                           ("[::1", "cannot listen there")])
def test_an_address_this_machine_lacks_names_listen(tmp_path, address, says, capsys):
    # 192.0.2.1 is TEST-NET-1 (RFC 5737): documentation only, never a machine's address
    assert main(_serve_args(tmp_path, "--listen", address, "--token", "t", "--port", "0")) == 2
    err = _one_line(capsys.readouterr().err)
    assert f"--listen {address}" in err and says in err and "Fix: --listen takes an address" in err, err
    assert "while attempting" not in err, "the socket library's own suffix is not repeated"


def test_a_privileged_port_without_the_right_says_which_ports_are_allowed(monkeypatch):
    # Refused by the kernel to a user without CAP_NET_BIND_SERVICE (tests run as root in CI, where
    # the bind would succeed, so the kernel's answer is played back here).
    def refuse(address, **kwargs):
        raise PermissionError(errno.EACCES, f"Permission denied (while attempting to bind on address {address!r})")

    monkeypatch.setattr(socket, "create_server", refuse)
    with pytest.raises(ServerConfigError) as refused:
        bind("127.0.0.1", 80)
    text = str(refused.value)
    assert text.startswith("--port 80: cannot listen on 127.0.0.1:80: Permission denied (ports below 1024"), text
    assert "Fix: --port N with N above 1023" in text and refused.value.kind == "port_forbidden"
