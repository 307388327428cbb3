"""Model server request limits, against real server processes and their memory.

The oversized-body tests measure the server's peak resident memory (``VmHWM``): a
15 MB body of ``[{},{},...]`` used to take about 470 MB to decode before it was refused.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from mlc.errors import MLCError
from mlc.serving import create_app
from mlc.serving.limits import ServingLimits, too_many_records

MB = 1024 * 1024
GROWTH_BOUND = 40 * MB
"""Most a refused request may add to the server's peak memory (decoding took ~470 MB)."""

SCORE = """\
def score(record):
    return {"fields": len(record)}

def metrics(records):
    return {"count": len(records)}
"""


def write_package(root: Path, *, schema: str = "") -> Path:
    root.mkdir(parents=True)
    (root / "manifest.yaml").write_text(f"name: tiny\nservice_tags: [tiny]\n{schema}")
    (root / "score.py").write_text(SCORE)
    return root


def empty_objects(size: int) -> bytes:
    """``[{},{},...]`` of about ``size`` bytes: the cheapest text that decodes the biggest."""
    return b"[" + b",".join([b"{}"] * (size // 3)) + b"]"


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    url: str

    def peak_rss(self) -> int:
        """Peak resident memory of the server so far, in bytes."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmHWM in /proc status")


def start_server(package: Path, env: dict[str, str] | None = None) -> Iterator[Server]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "mlc.serving", "serve", "--package", str(package), "--port", str(port)],
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    server = Server(process, f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, "model server exited during start"
            try:
                if httpx.get(f"{server.url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "model server did not become healthy"
                time.sleep(0.1)
        yield server
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    yield from start_server(write_package(tmp_path / "tiny"))


async def post(url: str, content: bytes | AsyncIterator[bytes]) -> httpx.Response:
    async with httpx.AsyncClient(timeout=60) as client:
        return await client.post(url, content=content, headers={"content-type": "application/json"})


async def test_15_mb_body_is_refused_before_it_is_read(server: Server) -> None:
    before = server.peak_rss()
    response = await post(f"{server.url}/score", empty_objects(15 * MB))
    assert response.status_code == 413
    assert "exceeds this server's limit of 10485760 bytes" in response.json()["error"]
    assert server.peak_rss() - before < GROWTH_BOUND
    async with httpx.AsyncClient() as client:  # and it still serves
        assert (await client.post(f"{server.url}/score", json={"a": 1})).json() == {"fields": 1}


async def test_chunked_body_without_length_is_cut_off_at_the_limit(server: Server) -> None:
    body = empty_objects(15 * MB)

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 256 * 1024):
            yield body[start : start + 256 * 1024]

    before = server.peak_rss()
    response = await post(f"{server.url}/metrics", chunks())
    assert response.status_code == 413
    assert "more than 10485760 bytes" in response.json()["error"]
    assert server.peak_rss() - before < GROWTH_BOUND


async def test_too_many_small_records_are_refused_before_decoding(server: Server) -> None:
    before = server.peak_rss()
    response = await post(f"{server.url}/score", empty_objects(9 * MB))  # under the body limit
    assert response.status_code == 413
    assert response.json()["error"].startswith("batch of more than 10000 records exceeds")
    assert server.peak_rss() - before < GROWTH_BOUND  # decoding it took ~200 MB


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(write_package(tmp_path / "tiny"))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://model") as c:
        yield c


async def test_record_limit_applies_to_score_and_metrics(client: httpx.AsyncClient) -> None:
    at_limit = [{"a": i} for i in range(10_000)]
    assert (await client.post("/score", json=at_limit)).status_code == 200
    assert (await client.post("/metrics", json=at_limit)).json() == {"count": 10_000}
    for path in ("/score", "/metrics"):
        response = await client.post(path, json=[*at_limit, {"a": 0}])
        assert response.status_code == 413
        assert response.json()["error"] == (
            "batch of 10001 records exceeds this server's limit of 10000 "
            "(MLC_SERVING_MAX_RECORDS); split it or run a batch job"
        )


async def test_nested_records_under_the_limit_are_accepted(client: httpx.AsyncClient) -> None:
    records = [{"a": [[], {}, [1, {"b": "[{,}]"}]]} for _ in range(9_000)]  # ~36,000 containers
    response = await client.post("/score", json=records)
    assert response.status_code == 200
    assert len(response.json()) == 9_000


async def test_limits_come_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLC_SERVING_MAX_BODY_BYTES", "1000")
    monkeypatch.setenv("MLC_SERVING_MAX_RECORDS", "5")
    app = create_app(write_package(tmp_path / "tiny"))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://m") as c:
        meta = (await c.get("/metadata")).json()
        small = await c.post("/score", json=[{"a": 1}] * 5)
        too_many = await c.post("/score", json=[{"a": 1}] * 6)
        too_big = await c.post("/score", json={"a": "x" * 1_000})
    assert (meta["max_body_bytes"], meta["max_batch"]) == (1000, 5)
    assert small.status_code == 200
    assert too_many.status_code == 413 and "limit of 5" in too_many.json()["error"]
    assert too_big.status_code == 413 and "MLC_SERVING_MAX_BODY_BYTES" in too_big.json()["error"]

    monkeypatch.setenv("MLC_SERVING_MAX_RECORDS", "-1")
    with pytest.raises(MLCError, match="MLC_SERVING_MAX_RECORDS='-1' is not a positive integer"):
        ServingLimits.from_env()


async def test_problem_list_is_capped(tmp_path: Path) -> None:
    app = create_app(write_package(tmp_path / "tiny", schema="input_schema:\n  - {name: x, type: number}\n"))
    record = {"x": 1, **{f"f{i}": i for i in range(50_000)}}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://m") as c:
        one = await c.post("/score", json=record)
        many = await c.post("/score", json=[{"x": "no"}] * 500)
    assert one.status_code == 422 and len(one.json()["details"]) == 100
    assert many.status_code == 422 and len(many.json()["details"]) == 100
    assert many.json()["error"].startswith("at least 100 of 500 records do not match")


def test_record_scan_reads_structure_not_strings() -> None:
    assert too_many_records(b" [" + b",".join([b"[]"] * 30) + b"]", 10)
    assert not too_many_records(b'[{"a": "' + b"{}," * 50 + b'"}]', 10)  # brackets inside a string
    assert not too_many_records(b"{" + b'"a":{},' * 50 + b'"b":1}', 10)  # an object, not an array
    assert not too_many_records(b"[" + b",".join([b"[[],[],[]]"] * 10) + b"]", 10)  # ten nested


async def test_limit_concurrency_answers_503(tmp_path: Path) -> None:
    servers = start_server(write_package(tmp_path / "tiny"), {"MLC_SERVING_LIMIT_CONCURRENCY": "2"})
    server = next(servers)
    host, port = server.url.removeprefix("http://").split(":")
    idle = [socket.create_connection((host, int(port))) for _ in range(2)]
    try:
        await asyncio.sleep(0.2)  # let the server accept both
        async with httpx.AsyncClient() as client:
            response = await client.get(f"{server.url}/health")
        assert response.status_code == 503
    finally:
        for sock in idle:
            sock.close()
        servers.close()
