"""`loraloom serve` as a user runs it: the console script starts, answers, and stops on Ctrl-C."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_serve_starts_answers_and_stops_on_ctrl_c(tmp_path):
    port = _free_port()
    env = {**os.environ, "LORALOOM_USER_DIR": str(tmp_path / "user")}
    proc = subprocess.Popen([sys.executable, "-m", "loraloom.cli", "serve", "--port", str(port),
                             "--output-dir", str(tmp_path / "out")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
    try:
        assert f"http://127.0.0.1:{port}/" in proc.stdout.readline(), "the address is printed first"
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/object_info", timeout=5) as resp:
                    info = json.load(resp)
                break
            except OSError:
                assert time.monotonic() < deadline, "the server did not answer"
                time.sleep(0.2)
        assert "WeightedBlend" in info and "SaveImage" in info, "the server runs our nodes"
        assert (tmp_path / "user" / "queue.sqlite3").is_file(), "the queue lives in the user folder"
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
