"""llava-serve --ray: the same server as replicas on a local Ray cluster, started the way a
user starts it (the command, in a subprocess), talked to with the `openai` client: requests
reach both replicas and answer as llava-run alone; a killed replica's requests fail cleanly
(none hangs), Ray replaces it and the service answers again; SIGTERM leaves no Ray process."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from exporter.toy.evaluate import held_out_questions
from tests.support.serving import data_url, image_message

pytest.importorskip("ray", reason="the serve-ray extra (Ray Serve) is not installed")
yaml = pytest.importorskip("yaml")  # comes with Ray
pytestmark = pytest.mark.slow

DOCS_CONFIG = Path(__file__).resolve().parents[1] / "docs" / "ray-serve.yaml"
REPLICAS = 2


def ray_processes() -> set[int]:
    """Pids of Ray's own processes on this machine (the GCS, raylets, workers)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "gcs_server" in command or "raylet" in command or command.startswith("ray::"):
            found.add(int(entry.name))
    return found


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def replicas_seen(url: str, want: int, seconds: float) -> dict[str, int]:
    """{replica name: pid} of the replicas /replica reaches, once `want` answer (or the time is up)."""
    seen: dict[str, int] = {}
    deadline = time.monotonic() + seconds
    while len(seen) < want and time.monotonic() < deadline:
        try:
            reply = httpx.get(url + "/replica", timeout=5)
            if reply.status_code == 200:
                seen[reply.json()["replica"]] = reply.json()["pid"]
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    return seen


def new_replica(url: str, known: set[str], seconds: float) -> str | None:
    """The first replica answering /replica that is not one of `known`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            name = httpx.get(url + "/replica", timeout=5).json()["replica"]
            if name not in known:
                return name
        except (httpx.TransportError, ValueError, KeyError):
            pass  # the proxy may answer 5xx while the replica set changes
        time.sleep(0.1)
    return None


@pytest.fixture(scope="module")
def cluster(toy_artifacts):
    """`llava-serve --ray` with two replicas of the toy model, one ONNX Runtime thread each."""
    before = ray_processes()
    port = free_port()
    command = [
        sys.executable,
        *("-m", "runtime.serve.cli", "--ray", "--artifacts", str(toy_artifacts)),
        *("--replicas", str(REPLICAS), "--threads", "1", "--max-batch", "4", "--port", str(port)),
        *("--served-model-name", "toy"),
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        seen = replicas_seen(url, REPLICAS, seconds=180)
        assert len(seen) == REPLICAS, f"the replicas did not come up: {seen}"
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
        output = process.stdout.read()
    assert "on Ray Serve (2 replicas)" in output, output[-3000:]
    deadline = time.monotonic() + 30
    while ray_processes() - before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not ray_processes() - before, "Ray processes were left behind"


def ask_all(url: str, questions, **fields) -> list[tuple[str, str]]:
    """(answer, replica) for each question, 8 at a time, through the openai client."""
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)

    async def one(q):
        raw = await client.chat.completions.with_raw_response.create(
            model="toy", messages=image_message(q.question, data_url(q.image)), temperature=0, **fields
        )
        return raw.parse().choices[0].message.content, raw.headers["x-llava-replica"]

    async def run():
        gate = asyncio.Semaphore(8)

        async def gated(q):
            async with gate:
                return await one(q)

        try:
            return await asyncio.gather(*(gated(q) for q in questions))
        finally:
            await client.close()

    return asyncio.run(run())


def test_requests_reach_both_replicas_and_answer_as_alone(cluster, toy_pipe):
    questions = held_out_questions(8)[:24]
    answers = ask_all(cluster, questions, max_tokens=32)
    assert [text for text, _ in answers] == [
        toy_pipe.generate(q.question, [q.image], 32).text for q in questions
    ]
    assert len({replica for _, replica in answers}) == REPLICAS


def test_streaming_goes_through_rays_proxy(cluster, toy_pipe):
    q = held_out_questions(1)[0]
    client = openai.OpenAI(base_url=cluster + "/v1", api_key="unused", max_retries=0)
    chunks = client.chat.completions.create(
        model="toy", messages=image_message(q.question, data_url(q.image)), temperature=0, stream=True
    )
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        == toy_pipe.generate(q.question, [q.image]).text
    )


def test_cluster_metrics_label_every_replica(cluster):
    ask_all(cluster, held_out_questions(1)[:4], max_tokens=2)
    text = httpx.get(cluster + "/cluster/metrics", timeout=30).text
    names = set(replicas_seen(cluster, REPLICAS, seconds=10))
    for name in names:
        assert f'replica="{name}"' in text
    assert text.count("# TYPE llava_requests_total counter") == 1
    assert httpx.get(cluster + "/health").json()["status"] == "ok"


def test_a_killed_replica_fails_its_requests_cleanly_and_is_replaced(cluster):
    """Kill one replica's process while 8 long requests run (4 streamed): each ends, completed
    or with a clean failure (a 5xx; a stream already under way is cut), none hangs; a new
    replica takes its place; the service answers again."""
    replicas = replicas_seen(cluster, REPLICAS, seconds=10)
    victim, victim_pid = next(iter(replicas.items()))
    body = {
        "model": "toy",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 300,
        "ignore_eos": True,
        "stream": True,
    }

    async def stream(http: httpx.AsyncClient) -> str:
        try:
            async with http.stream("POST", cluster + "/v1/chat/completions", json=body) as response:
                if response.status_code != 200:
                    return f"status {response.status_code}"
                lines = [line async for line in response.aiter_lines() if line]
            return (
                "completed" if lines[-1] == "data: [DONE]" and '"error"' not in lines[-2] else "error event"
            )
        except httpx.HTTPError as err:  # the connection cut mid-stream: a clean failure, not a hang
            return f"cut ({type(err).__name__})"

    async def whole(http: httpx.AsyncClient) -> str:
        response = await http.post(cluster + "/v1/chat/completions", json={**body, "stream": False})
        return "completed" if response.status_code == 200 else f"status {response.status_code}"

    async def run():
        async with httpx.AsyncClient(timeout=httpx.Timeout(60)) as http:
            tasks = [asyncio.ensure_future((stream if i % 2 else whole)(http)) for i in range(8)]
            await asyncio.sleep(1.0)  # the streams are running
            os.kill(victim_pid, signal.SIGKILL)
            killed_at = time.monotonic()
            return await asyncio.wait_for(asyncio.gather(*tasks), timeout=90), killed_at

    outcomes, killed_at = asyncio.run(run())
    failed = [o for o in outcomes if o != "completed"]
    assert len(outcomes) == 8  # every stream ended within the bound: none hung
    assert all(o.startswith(("status 5", "cut", "error event")) for o in failed), outcomes
    new = new_replica(cluster, known=set(replicas), seconds=120)
    assert new is not None, "no replica replaced the killed one"
    replaced_after = time.monotonic() - killed_at
    reply = httpx.post(
        cluster + "/v1/chat/completions", json={**body, "stream": False, "max_tokens": 2}, timeout=30
    )
    assert reply.status_code == 200
    print(
        f"\nkill: {len(failed)} of 8 in-flight requests failed ({failed}); "
        f"replica {victim} replaced by {new} within {replaced_after:.1f} s"
    )


def test_the_documented_config_file_builds_the_application(toy_artifacts):
    from ray.serve.schema import ServeDeploySchema

    from runtime.serve.ray_serve import build_app

    config = yaml.safe_load(DOCS_CONFIG.read_text())
    ServeDeploySchema.model_validate(config)  # Ray's own schema for `serve deploy`
    (app,) = config["applications"]
    assert app["import_path"] == "runtime.serve.ray_serve:build_app"
    assert build_app({**app["args"], "artifacts": str(toy_artifacts)}) is not None
    with pytest.raises(ValueError, match="build_app takes artifacts"):
        build_app({"artifacts": str(toy_artifacts), "max_batchh": 4})
