"""The web page in a real browser (Debian's chromium driven by Playwright) against a real
``mlc server``: sign in with ``mlc login --web``, follow a run from the inventory to its
gate, read the evidence and the exact ``mlc approve`` command off the page, run it as the
approver, and watch htmx bring the run's new state into the open page."""

from __future__ import annotations

import asyncio
import hashlib
import re
import shlex
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from playwright.async_api import Browser, async_playwright, expect

from cli import admin
from mlc.contracts.lifecycle import evidence_digest
from mlc.domain import ApprovalGate, LifecycleSpec, StageSpec, TestKind
from mlc.lifecycle_client import EVIDENCE_PREFIX, recorded_status
from server.auth.sessions import secure_cookie
from tests.conftest import ADMIN, APPROVER, Stack, missing
from tests.lifecycle_helpers import tamper_with_registration, wait_for_gate

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
STATIC = Path(__file__).parent.parent / "server" / "static"
GATE_THEN_SIT = LifecycleSpec(
    stages=(
        StageSpec(name="DEV", tests=(TestKind.SMOKE,), gate=ApprovalGate()),
        StageSpec(name="SIT", tests=(TestKind.SMOKE,)),
    )
)
READER = "reader"


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    """Headless Debian chromium (scripts/system-deps.sh test installs it)."""
    if not CHROMIUM.exists():
        missing(f"{CHROMIUM} is not installed: scripts/system-deps.sh test (apt-get install chromium)")
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield launched
        finally:
            await launched.close()


async def login_link(stack: Stack, user: str) -> str:
    """``mlc login --web`` as ``user`` through the API only; the link it prints."""
    done = await stack.mlc("login", "--web", user=user, api=True)
    assert done.returncode == 0, done.stderr
    link = done.stdout.strip().splitlines()[-1]
    assert re.fullmatch(rf"{re.escape(stack.api_url or '')}/session/[A-Za-z0-9_-]{{43}}", link), link
    return link


@pytest.mark.parametrize(
    ("public_url", "secure"),
    [
        ("http://127.0.0.1:8280", False),
        ("http://localhost:8280", False),
        ("http://[::1]:8280", False),
        ("http://mlc.example:8280", True),
        ("http://192.0.2.5:8280", True),  # a documentation address (RFC 5737): never contacted
        ("https://127.0.0.1:8280", True),
        ("https://mlc.example", True),
    ],
)
def test_the_cookie_is_secure_unless_plain_http_on_loopback(public_url: str, secure: bool) -> None:
    assert secure_cookie(public_url) is secure


def test_vendored_htmx_is_the_recorded_release() -> None:
    recorded = (STATIC / "README.md").read_text()
    digest = hashlib.sha256((STATIC / "htmx.min.js").read_bytes()).hexdigest()
    assert f"| 2.0.11 | 0BSD (Zero-Clause BSD) | `{digest}` |" in recorded


async def test_pages_need_a_session_and_a_link_works_once(
    stack: Stack, api_server: str, browser: Browser
) -> None:
    async with httpx.AsyncClient() as http:
        bare = await http.get(f"{api_server}/waiting")
        assert bare.status_code == 303 and bare.headers["location"] == "/session"
        forged = await http.get(f"{api_server}/", cookies={"mlc_session": "A" * 43})
        assert forged.status_code == 303
        for path in ("/", "/runs/m/1", "/waiting", "/history/m", "/audit", "/session/x"):
            assert (await http.post(f"{api_server}{path}")).status_code == 405, (
                f"POST {path}: pages only read"
            )
    link = await login_link(stack, APPROVER)
    context = await browser.new_context()
    page = await context.new_page()
    await page.goto(link)
    assert page.url == f"{api_server}/"
    assert await page.text_content("#who") == f"{APPROVER} (member)"
    missing_run = await page.goto(f"{api_server}/runs/nope/1")
    assert missing_run is not None and missing_run.status == 404
    assert "nope@1 has no lifecycle run" in (await page.text_content("main") or "")
    bad_cursor = await page.goto(f"{api_server}/audit?before=1;DROP")
    assert bad_cursor is not None and bad_cursor.status == 400
    cookie = next(c for c in await context.cookies() if c["name"] == "mlc_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and not cookie["secure"]  # loopback http
    again = await (await browser.new_context()).new_page()
    answer = await again.goto(link)
    assert answer is not None and answer.status == 400
    assert "used already" in (await again.text_content("#link-problem") or "")
    await again.goto(f"{api_server}/audit")
    assert again.url == f"{api_server}/session", "a used link must not have opened a session"

    # A session made with a key ends when its owner's keys are revoked.
    await page.goto(f"{api_server}/audit")
    assert page.url == f"{api_server}/audit"
    await admin.revoke_key(
        stack.pool, stack.settings, stack.signers[ADMIN], APPROVER, stack.signers[APPROVER].key_id
    )
    deadline = time.monotonic() + 5  # the server re-reads governance at most once a second
    while page.url != f"{api_server}/session" and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        await page.goto(f"{api_server}/audit")
    assert page.url == f"{api_server}/session", "a revoked key's session still reads"
    await context.close()


async def test_decide_from_what_the_page_shows(
    stack: Stack, api_server: str, browser: Browser, example_package: Path, tmp_path: Path
) -> None:
    await stack.add_principal(READER, "read-only")
    await stack.add_local_runtimes(("DEV", "SIT"), gateway=True)
    snap = await stack.register(example_package)
    ref = f"{snap.model}@{snap.version}"
    handle = await stack.start(snap, spec=GATE_THEN_SIT)
    await wait_for_gate(handle, "DEV")
    status = await recorded_status(stack.pool, handle)
    assert status is not None
    evidence = EVIDENCE_PREFIX + evidence_digest(status, "DEV")

    # A read-only principal sees the gate and the evidence, and no command.
    reader = await (await browser.new_context()).new_page()
    await reader.goto(await login_link(stack, READER))
    await reader.goto(f"{api_server}/runs/{snap.model}/{snap.version}")
    assert await reader.text_content("#gate-evidence") == evidence
    assert await reader.locator("#approve-command").count() == 0
    assert "read-only" in (await reader.text_content("#no-command") or "")
    await reader.screenshot(path=str(tmp_path / "run-read-only.png"), full_page=True)

    # The approver: inventory -> the run -> its gate, evidence and command.
    page = await (await browser.new_context()).new_page()
    await page.goto(await login_link(stack, APPROVER))
    row = page.locator(f"#snapshot-{snap.model}-{snap.version}")
    await expect(row).to_contain_text("DEV · local-dev · online")  # behind no endpoint before the gate
    await page.screenshot(path=str(tmp_path / "inventory.png"), full_page=True)
    await row.locator("a.run-link").click()
    await expect(page.locator("#run-state")).to_have_text("awaiting_approval")
    assert await page.text_content("#gate-evidence") == evidence
    dev = page.locator('table.report[data-stage="DEV"]')
    await expect(dev).to_contain_text("smoke")
    await expect(dev.locator("code.evidence")).to_have_text(evidence)
    words = shlex.split(await page.text_content("#approve-command") or "")
    assert words == ["mlc", "approve", ref, "--stage", "DEV", "--evidence", evidence]
    assert shlex.split(await page.text_content("#reject-command") or "")[1] == "reject"
    await page.screenshot(path=str(tmp_path / "run-at-gate.png"), full_page=True)
    await page.goto(f"{api_server}/waiting")
    await expect(page.locator("#waiting")).to_contain_text(f"{ref}")
    await page.locator("#waiting a", has_text=ref).click()
    await page.evaluate("window.loadedOnce = true")  # gone if the page reloads instead of swapping

    # Evidence other than what the page showed: nothing is signed.
    other = [*words[1:-1], EVIDENCE_PREFIX + "0" * 64]
    refused = await stack.mlc(*other, api=True)
    assert refused.returncode == 4 and "nothing was signed" in refused.stderr, refused.stderr
    malformed = await stack.mlc(*words[1:-1], "deadbeef", api=True)
    assert malformed.returncode == 2 and "sha256:" in malformed.stderr

    decided = await stack.mlc(*words[1:], api=True)  # as the approver has it: the URL and a key
    assert decided.returncode == 0, decided.stderr

    await expect(page.locator("#run-state")).to_have_text("succeeded", timeout=120_000)
    assert await page.evaluate("window.loadedOnce === true"), "htmx swaps the fragment; no reload"
    await expect(page.locator('.stages li[data-stage="SIT"]')).to_have_class("done")
    assert await page.text_content("#run-stage") == "SIT"
    decision = page.locator("tr.decision")
    await expect(decision).to_contain_text(APPROVER)
    await expect(decision).to_contain_text("verified")
    await page.screenshot(path=str(tmp_path / "run-done.png"), full_page=True)

    verified = await stack.mlc("audit", "verify")
    assert verified.returncode == 0 and "audit trail verified" in verified.stdout, verified.stdout
    await page.goto(f"{api_server}/audit")
    await expect(page.locator("#audit-status")).to_have_text("verified")
    await tamper_with_registration(stack.pool, snap)  # a row in the middle: the head stays as it was
    await page.goto(f"{api_server}/audit")
    await expect(page.locator("#audit-status")).not_to_have_text("verified")
    await page.goto(f"{api_server}/")
    await expect(row).to_contain_text("SIT · local-sit · online · 100%")
    endpoints = page.locator(f"#model-{snap.model} table.endpoints")
    await expect(endpoints).to_contain_text("SIT")
    await expect(endpoints).to_contain_text("v1 100%")
    await page.goto(f"{api_server}/history/{snap.model}")
    await expect(page.locator("#runs")).to_contain_text("succeeded")
    await expect(page.locator("#changes")).to_contain_text("v1 100%")
    await page.goto(f"{api_server}/history/{snap.model}?stage=DEV")
    await expect(page.locator("#changes")).to_contain_text("DEV")
    await expect(page.locator("#changes")).not_to_contain_text("SIT")
    await page.goto(f"{api_server}/waiting")
    await expect(page.locator("#none-waiting")).to_be_visible()
    await reader.goto(f"{api_server}/waiting")
    await expect(reader.locator("#why-none")).to_contain_text("read-only")
