"""`llava-serve` as a user starts it: a real process on a loopback port, a request, a clean
exit on SIGTERM; bad options and a missing extra as one line and exit status 2."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
from click.testing import CliRunner

from runtime.serve.cli import main

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_it_serves_and_finishes_what_runs_on_sigterm(toy_artifacts):
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "runtime.serve.cli",
        "--artifacts",
        str(toy_artifacts),
        "--port",
        str(port),
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, process.stdout.read()
            time.sleep(0.2)
        assert "<title>" in httpx.get(url + "/").text
        body = {
            "model": toy_artifacts.name,
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 300,
            "ignore_eos": True,
            "stream": True,
        }
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            next(lines)
            process.send_signal(signal.SIGTERM)  # mid-answer: the answer still finishes
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]" and '"finish_reason": "length"' in rest[-2]
        # uvicorn re-raises the signal once shut down: the exit status is SIGTERM's
        assert process.wait(timeout=30) in (0, -signal.SIGTERM)
    finally:
        if process.poll() is None:
            process.kill()
    output = process.stdout.read()
    assert f"llava-serve: {toy_artifacts.name} on ort-cpu, http://127.0.0.1:{port}/" in output
    assert "Application shutdown complete" in output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--artifacts", "/nonexistent/folder"], "/nonexistent/folder"),
        (
            ["--artifacts", ".", "--allowed-local-media-path", "/nonexistent/media"],
            "--allowed-local-media-path",
        ),
    ],
)
def test_bad_options_are_one_line_and_exit_2(args, message):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]


def test_without_the_serve_extra_it_names_the_extra(monkeypatch, tiny_artifacts):
    from runtime import extras

    monkeypatch.setattr(extras, "installed", lambda module: module != "fastapi")
    result = CliRunner().invoke(main, ["--artifacts", str(tiny_artifacts)])
    assert result.exit_code == 2
    assert "pip install 'llava-export[serve]'" in result.output and "fastapi missing" in result.output


def test_ray_without_its_extra_names_the_extra(monkeypatch, tiny_artifacts):
    from runtime import extras

    monkeypatch.setattr(extras, "installed", lambda module: module != "ray")
    result = CliRunner().invoke(main, ["--artifacts", str(tiny_artifacts), "--ray"])
    assert result.exit_code == 2
    assert "llava-serve --ray needs Ray Serve" in result.output
    assert "pip install 'llava-export[serve-ray]'" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--replicas", "2"], "take --ray"),
        (["--ray", "--autoscale", "4:2"], "--autoscale 4:2: give MIN:MAX"),
        (["--ray", "--autoscale", "two"], "--autoscale two"),
    ],
)
def test_ray_options_are_checked_before_ray_starts(tiny_artifacts, args, message):
    result = CliRunner().invoke(main, ["--artifacts", str(tiny_artifacts), *args])
    assert result.exit_code == 2 and message in result.output


def test_the_api_key_can_come_from_the_environment(monkeypatch):
    captured = {}
    monkeypatch.setattr("runtime.serve.cli.serve", lambda **options: captured.update(options))
    CliRunner().invoke(main, ["--artifacts", "x"], env={**os.environ, "LLAVA_API_KEY": "k"})
    assert captured["api_key"] == "k" and captured["host"] == "127.0.0.1"
