"""The model server app and batch job, against the real cc-fraud package and fixtures."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from mlc.errors import InvalidPackageError, ScoringError
from mlc.manifest import load_manifest
from mlc.serving import InvalidRecordsError, create_app, run_batch

FIXTURES = Path(__file__).parent / "fixtures" / "models"


@pytest.fixture
def cc_fraud(example_package: Path) -> Path:
    """The trained cc-fraud package (conftest trains it once per session)."""
    return example_package


@pytest.fixture
async def client(cc_fraud: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[httpx.AsyncClient]:
    monkeypatch.setenv("MLC_MODEL_VERSION", "7")
    monkeypatch.setenv("MLC_SNAPSHOT_SHA256", "ab" * 32)
    app = create_app(cc_fraud, max_batch=2_500)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://model") as c:
        yield c


def eval_records(package: Path) -> tuple[list[dict], list[int]]:
    rows = [json.loads(line) for line in (package / "data" / "eval.jsonl").read_text().splitlines()]
    labels = [row.pop("is_fraud") for row in rows]
    return rows, labels


def write_package(root: Path, score_py: str, *, requirements: str = "[]") -> Path:
    root.mkdir(parents=True)
    (root / "manifest.yaml").write_text(
        "name: tiny\nservice_tags: [tiny]\n"
        f"requirements: {requirements}\n"
        "input_schema:\n  - {name: x, type: number}\n  - {name: note, type: string, required: false}\n"
    )
    (root / "score.py").write_text(score_py)
    return root


async def test_health_and_metadata(client: httpx.AsyncClient) -> None:
    health = await client.get("/health")
    assert health.json() == {"status": "ok", "model": "cc-fraud", "version": "7", "sha256": "ab" * 32}
    meta = (await client.get("/metadata")).json()
    assert meta["name"] == "cc-fraud"
    assert meta["service_tags"] == ["cc-fraud"]
    assert meta["version"] == "7"
    assert meta["max_batch"] == 2_500
    assert {f["name"]: f["type"] for f in meta["input_schema"]} == {
        "amount": "number",
        "hour": "integer",
        "merchant_risk": "number",
        "distance_from_home": "number",
        "foreign": "boolean",
        "card_present": "boolean",
        "velocity_24h": "integer",
    }


async def test_single_records_give_the_manifest_samples_decisions(
    client: httpx.AsyncClient, cc_fraud: Path
) -> None:
    for case in load_manifest(cc_fraud).samples:
        response = await client.post("/score", json=case.input)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["is_fraud"] == case.expected["is_fraud"]
        assert 0.0 <= body["probability"] <= 1.0


async def test_batch_matches_single_scoring_and_separates_classes(
    client: httpx.AsyncClient, cc_fraud: Path
) -> None:
    records, labels = eval_records(cc_fraud)
    response = await client.post("/score", json=records)
    assert response.status_code == 200, response.text
    outputs = response.json()
    assert len(outputs) == len(records) == 2_000
    single = (await client.post("/score", json=records[17])).json()
    assert single["probability"] == pytest.approx(outputs[17]["probability"], abs=1e-12)
    fraud = [o["probability"] for o, y in zip(outputs, labels, strict=True) if y == 1]
    legit = [o["probability"] for o, y in zip(outputs, labels, strict=True) if y == 0]
    assert sum(fraud) / len(fraud) > 3 * sum(legit) / len(legit)
    assert (await client.post("/score", json=[])).json() == []


async def test_model_metrics_endpoint(client: httpx.AsyncClient, cc_fraud: Path) -> None:
    rows = [json.loads(line) for line in (cc_fraud / "data" / "eval.jsonl").read_text().splitlines()]
    metrics = (await client.post("/metrics", json=rows)).json()
    assert metrics["auc"] >= 0.85
    assert metrics["records"] == 2_000


@pytest.mark.parametrize(
    ("change", "field", "problem"),
    [
        ({"amount": "12"}, "amount", "expected number, got string"),
        ({"amount": True}, "amount", "expected number, got boolean"),
        ({"hour": 14.5}, "hour", "expected integer, got number"),
        ({"foreign": 0}, "foreign", "expected boolean, got integer"),
        ({"colour": "red"}, "colour", "unknown field (not in the input schema)"),
        ({"velocity_24h": None}, "velocity_24h", "expected integer, got null"),
    ],
)
async def test_invalid_record_gets_422_with_details(
    client: httpx.AsyncClient, cc_fraud: Path, change: dict, field: str, problem: str
) -> None:
    record = {**load_manifest(cc_fraud).samples[0].input, **change}
    response = await client.post("/score", json=record)
    assert response.status_code == 422
    body = response.json()
    assert "cc-fraud" in body["error"]
    assert body["details"] == [{"record": 0, "field": field, "problem": problem}]


async def test_batch_422_names_each_bad_record(client: httpx.AsyncClient, cc_fraud: Path) -> None:
    good = load_manifest(cc_fraud).samples[0].input
    missing = {k: v for k, v in good.items() if k != "hour"}
    response = await client.post("/score", json=[good, missing, good, "text"])
    assert response.status_code == 422
    assert response.json()["details"] == [
        {"record": 1, "field": "hour", "problem": "required field is missing"},
        {"record": 3, "field": None, "problem": "expected an object, got string"},
    ]


@pytest.mark.parametrize("body", [b"", b"  \n", b"{not json", b"42", b'"text"'])
async def test_bad_bodies_get_400(client: httpx.AsyncClient, body: bytes) -> None:
    response = await client.post("/score", content=body)
    assert response.status_code == 400
    assert response.json()["error"]


async def test_oversized_batch_gets_413(client: httpx.AsyncClient, cc_fraud: Path) -> None:
    record = load_manifest(cc_fraud).samples[0].input
    response = await client.post("/score", json=[record] * 2_501)
    assert response.status_code == 413
    assert "2501" in response.json()["error"]


async def test_model_exception_gets_500_naming_it(tmp_path: Path) -> None:
    package = write_package(
        tmp_path / "tiny",
        "def score(record):\n    raise ValueError('x must be positive')\n",
    )
    app = create_app(package)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://m") as c:
        response = await c.post("/score", json={"x": -1})
        batch = await c.post("/score", json=[{"x": 1, "note": None}])
        no_metrics = await c.post("/metrics", json=[])
    assert response.status_code == 500
    assert response.json()["error"] == "model tiny: score() raised ValueError: x must be positive"
    assert batch.status_code == 500
    assert no_metrics.status_code == 404


def test_missing_requirement_is_named(tmp_path: Path) -> None:
    package = write_package(
        tmp_path / "tiny",
        "def score(record):\n    return {}\n",
        requirements='["orjson>=3", "no-such-package-mlc-test>=1.0"]',
    )
    with pytest.raises(InvalidPackageError, match="no-such-package-mlc-test>=1.0 is not installed"):
        create_app(package)


def test_failing_init_is_a_scoring_error() -> None:
    with pytest.raises(ScoringError, match="init\\(\\) fails on purpose"):
        create_app(FIXTURES / "crash-model")


def test_batch_job_writes_one_output_per_line(cc_fraud: Path, tmp_path: Path) -> None:
    records, _ = eval_records(cc_fraud)
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in records[:1_234]) + "\n")
    summary = run_batch(cc_fraud, source, tmp_path / "out" / "out.jsonl", chunk_size=500)
    assert summary["records"] == 1_234
    assert summary["model"] == "cc-fraud"
    lines = (tmp_path / "out" / "out.jsonl").read_text().splitlines()
    assert len(lines) == 1_234
    assert set(json.loads(lines[0])) == {"probability", "is_fraud"}


def test_batch_job_names_the_bad_line(tmp_path: Path) -> None:
    package = FIXTURES / "weak-model"
    sample = load_manifest(package).samples[0].input
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps(sample) + "\n\n" + json.dumps({**sample, "hour": "3"}) + "\n")
    with pytest.raises(InvalidRecordsError, match=r"in\.jsonl:3: field 'hour': expected integer"):
        run_batch(package, source, tmp_path / "out.jsonl")
    assert not (tmp_path / "out.jsonl").exists()


async def test_concurrent_requests_are_micro_batched_and_isolated(tmp_path: Path) -> None:
    package = write_package(
        tmp_path / "tiny",
        "import pathlib\n"
        "CALLS = pathlib.Path(__file__).with_name('calls.txt')\n"
        "def score(record):\n    return score_batch([record])[0]\n"
        "def score_batch(records):\n"
        "    with CALLS.open('a') as fh:\n        fh.write(f'{len(records)}\\n')\n"
        "    if any(r['x'] < 0 for r in records):\n        raise ValueError('x must be positive')\n"
        "    return [{'double': 2 * r['x']} for r in records]\n",
    )
    app = create_app(package)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://m") as c:
        good = [c.post("/score", json={"x": i}) for i in range(20)]
        bad = c.post("/score", json={"x": -1})
        pair = c.post("/score", json=[{"x": 100}, {"x": 200}])
        responses = await asyncio.gather(*good, bad, pair)
    assert [r.json() for r in responses[:20]] == [{"double": 2 * i} for i in range(20)]
    assert responses[20].status_code == 500 and "x must be positive" in responses[20].json()["error"]
    assert responses[21].json() == [{"double": 200}, {"double": 400}]
    calls = [int(n) for n in (package / "calls.txt").read_text().split()]
    assert max(calls) > 1, f"concurrent requests share score_batch calls: {calls}"


async def test_score_route_keeps_http_semantics_off_starlettes_router(client: httpx.AsyncClient) -> None:
    """POST /score bypasses Starlette's router; other methods and paths still get its answers."""
    record = {
        "amount": 12.5,
        "hour": 14,
        "merchant_risk": 0.05,
        "distance_from_home": 2.0,
        "foreign": False,
        "card_present": True,
        "velocity_24h": 1,
    }
    scored = await client.post("/score", json=record)
    assert scored.status_code == 200 and scored.headers["content-type"] == "application/json"
    assert set(scored.json()) == {"probability", "is_fraud"}
    wrong_method = await client.get("/score")
    assert wrong_method.status_code == 405 and "POST" in wrong_method.headers["allow"]
    assert (await client.post("/score/")).status_code in (307, 404)  # never scored
    assert (await client.post("/scores", json=record)).status_code == 404


async def test_an_exception_escaping_the_score_handler_still_answers_500(cc_fraud: Path) -> None:
    """The fast /score lane has no ServerErrorMiddleware: it must answer 500 itself, then re-raise."""
    app = create_app(cc_fraud)

    async def broken(request: object) -> None:
        raise RuntimeError("handler bug")

    app.service.score = broken  # type: ignore[method-assign,assignment]
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://model") as c:
        answer = await c.post("/score", json={})
    assert answer.status_code == 500
    assert answer.json() == {"error": "Internal Server Error"}
    strict = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=strict, base_url="http://model") as c:
        with pytest.raises(RuntimeError, match="handler bug"):
            await c.post("/score", json={})
