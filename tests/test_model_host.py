"""Many models in one process: isolated routes, lazy loads, removal, eviction, incompatible packages."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx

from mlc.serving.multi import ModelHost, create_host_app


def package(root: Path, name: str, factor: int, *, requirements: str = "[]") -> Path:
    root.mkdir(parents=True)
    (root / "manifest.yaml").write_text(
        f"name: {name}\nservice_tags: [{name}]\nrequirements: {requirements}\n"
        "input_schema:\n  - {name: x, type: number}\n"
    )
    (root / "score.py").write_text(
        f"def score(record):\n    return {{'y': {factor} * record['x']}}\n"
        f"def score_batch(records):\n    return [{{'y': {factor} * r['x']}} for r in records]\n"
    )
    return root


def client(host: ModelHost) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=create_host_app(host)), base_url="http://h")


async def test_routes_isolate_models_and_load_them_lazily(tmp_path: Path) -> None:
    package(tmp_path / "models" / "dep-a", "double", 2)
    package(tmp_path / "models" / "dep-b", "triple", 3)
    host = ModelHost(tmp_path / "models", memory_budget_mb=1e6)
    async with client(host) as c:
        assert host.loaded() == []
        a = await c.post("/models/dep-a/score", json={"x": 5})
        assert host.loaded() == ["dep-a"]
        b = await c.post("/models/dep-b/score", json=[{"x": 1}, {"x": 2}])
        bad = await c.post("/models/dep-b/score", json={"x": "no"})
        health = await c.get("/models/dep-a/health")
        missing = await c.post("/models/dep-z/score", json={"x": 1})
        hidden = await c.get("/models/..%2Fmodels%2Fdep-a/health")
    assert a.json() == {"y": 10}
    assert b.json() == [{"y": 3}, {"y": 6}]
    assert bad.status_code == 422 and "triple" in bad.json()["error"]
    assert health.json()["model"] == "double"
    assert missing.status_code == 404
    assert hidden.status_code == 404
    assert sorted(host.loaded()) == ["dep-a", "dep-b"]


async def test_a_removed_folder_unloads_its_model(tmp_path: Path) -> None:
    gone = package(tmp_path / "models" / "dep-a", "double", 2)
    host = ModelHost(tmp_path / "models", memory_budget_mb=1e6)
    async with client(host) as c:
        assert (await c.post("/models/dep-a/score", json={"x": 1})).status_code == 200
        shutil.rmtree(gone)
        assert (await c.post("/models/dep-a/score", json={"x": 1})).status_code == 404
    assert host.loaded() == []


async def test_over_the_memory_budget_the_least_recently_used_model_goes(tmp_path: Path) -> None:
    package(tmp_path / "models" / "dep-a", "double", 2)
    package(tmp_path / "models" / "dep-b", "triple", 3)
    host = ModelHost(tmp_path / "models", memory_budget_mb=1)  # always over: keep only the newest
    async with client(host) as c:
        await c.post("/models/dep-a/score", json={"x": 1})
        await c.post("/models/dep-b/score", json={"x": 1})
        assert host.loaded() == ["dep-b"]
        again = await c.post("/models/dep-a/score", json={"x": 4})  # reloaded on demand
    assert again.json() == {"y": 8}
    assert host.loaded() == ["dep-a"]


async def test_a_package_this_process_cannot_serve_is_refused_with_409(tmp_path: Path) -> None:
    package(tmp_path / "models" / "dep-a", "odd", 2, requirements='["no-such-package-mlc-test>=1"]')
    host = ModelHost(tmp_path / "models", memory_budget_mb=1e6)
    async with client(host) as c:
        refused = await c.post("/models/dep-a/score", json={"x": 1})
    assert refused.status_code == 409
    assert "no-such-package-mlc-test" in refused.json()["error"]
    assert "its own" in refused.json()["error"]


async def test_a_replaced_package_is_loaded_again_with_its_identity(tmp_path: Path) -> None:
    models = tmp_path / "models"
    package(models / "dep-a", "double", 2)
    (models / "dep-a.json").write_text('{"version": "1", "sha256": "aaa"}')
    host = ModelHost(models, memory_budget_mb=1e6)
    async with client(host) as c:
        first = (await c.get("/models/dep-a/health")).json()
        shutil.rmtree(models / "dep-a")  # what a runtime does to deploy another snapshot there
        package(models / "dep-a", "triple", 3)
        (models / "dep-a.json").write_text('{"version": "2", "sha256": "bbb"}')
        scored = await c.post("/models/dep-a/score", json={"x": 1})
        second = (await c.get("/models/dep-a/health")).json()
        package(models / "dep-b", "double", 2)
        await c.get("/models/dep-b/health")
        shutil.rmtree(models / "dep-b")
        await c.get("/health")  # notices the removed folder without a request for it
    assert (first["model"], first["version"], first["sha256"]) == ("double", "1", "aaa")
    assert scored.json() == {"y": 3}
    assert (second["model"], second["version"], second["sha256"]) == ("triple", "2", "bbb")
    assert host.loaded() == ["dep-a"]
