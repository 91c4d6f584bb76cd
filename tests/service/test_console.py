"""The web console under /ui: its pages and fragments, the plan and signed-link endpoints it uses, and a walk in a
real headless Chromium (Debian's package, driven by Playwright) on a live service whose jobs a worker thread runs:
request a size from the form, watch the job succeed, open the model, download a file and check its sha256; with
auth on, the same with a token, and nothing shown without one. Screenshots of each page land in
test-artifacts/console/ (git-ignored; CBD_TEST_ARTIFACTS moves them)."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import uvicorn
from fastapi.testclient import TestClient

from app.auth import create_token
from app.main import create_app
from app.services import links
from app.services.charts import nice_ticks
from app.settings import Settings
from tests.service.conftest import DOLLY, make_settings, run_pending
from tests.service.test_api import assert_problem, make_model, midpoint

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("CBD_TEST_ARTIFACTS", Path(__file__).resolve().parents[2] / "test-artifacts"))


def register(client: TestClient, settings: Settings, large: Path, small: Path, **headers: str) -> dict:
    body = {"name": "tiny", "source": str(large), "anchors": [{"checkpoint": str(small), "distill": False}],
            "dataset": {"path": str(DOLLY)}, "device": "cpu"}
    response = client.post("/chains", json=body, headers=headers)
    assert response.status_code == 202, response.text
    assert run_pending(settings) == ["succeeded"]
    return client.get(f"/chains/{response.json()['id']}", headers=headers).json()


def test_nice_ticks_cover_the_values_with_round_steps() -> None:
    assert nice_ticks(0.3, 9.7) == [0, 2, 4, 6, 8, 10]
    ticks = nice_ticks(61_000_000, 135_000_000)
    assert ticks[0] <= 61e6 and ticks[-1] >= 135e6
    assert len({round(b - a) for a, b in zip(ticks, ticks[1:], strict=False)}) == 1
    assert nice_ticks(5.0, 5.0)[0] <= 5.0 <= nice_ticks(5.0, 5.0)[-1]  # one value: still an axis


def test_plan_answers_what_post_models_would_make_and_makes_nothing(client: TestClient, settings: Settings,
                                                                     tiny_chain: dict) -> None:
    body = {"chain": tiny_chain["id"], "size": midpoint(tiny_chain), "dtype": "float32"}
    plan = client.post("/models/plan", json=body)
    assert plan.status_code == 200, plan.text
    plan = plan.json()
    assert plan["existing"] is None and plan["estimated_seconds"] > 0 and plan["queue"] == "cpu"
    assert client.get("/models").json()["items"] == []
    created = client.post("/models", json=body).json()
    assert (created["params"], created["shape"], created["anchors"]) == (plan["params"], plan["shape"],
                                                                           plan["anchors"])
    assert client.post("/models/plan", json=body).json()["existing"]["id"] == created["id"]
    assert client.post("/models/plan", json={**body, "dtype": "float16"}).json()["existing"] is None
    assert_problem(client.post("/models/plan", json={**body, "size": 10**12}), 422, "outside the range")


def test_an_expired_or_tampered_signed_link_is_refused(tmp_path: Path, tiny_anchors: tuple[Path, Path]) -> None:
    settings = make_settings(tmp_path, auth="on", signed_link_seconds=60)
    with TestClient(create_app(settings)) as client:
        with client.app.state.session_factory() as session:
            token, _ = create_token(session, ["read", "build"])
        bearer = {"Authorization": f"Bearer {token}"}
        chain = register(client, settings, *tiny_anchors, **bearer)
        model = client.post("/models", json={"chain": chain["id"], "size": midpoint(chain)}, headers=bearer).json()
        assert_problem(client.post(f"/models/{model['id']}/signed-links", headers=bearer), 409, "queued")
        assert run_pending(settings) == ["succeeded"]
        assert_problem(client.post(f"/models/{model['id']}/signed-links"), 401)
        signed = client.post(f"/models/{model['id']}/signed-links", headers=bearer).json()
        config = next(f for f in signed["files"] if f["name"] == "config.json")
        body = client.get(config["url"])  # no bearer header
        assert body.status_code == 200 and hashlib.sha256(body.content).hexdigest() == config["sha256"]
        path, query = config["url"].split("?")
        expires = int(re.search(r"expires=(\d+)", query).group(1))
        assert time.time() + 50 < expires <= time.time() + 61
        signature = re.search(r"signature=([0-9a-f]+)", query).group(1)
        key = client.app.state.link_key
        refused = {
            "expired": links.sign(key, path, int(time.time()) - 1),
            "tampered expiry": f"{path}?expires={expires + 3600}&signature={signature}",
            "tampered signature": f"{path}?expires={expires}&signature={'0' * 64}",
            "another file": config["url"].replace("config.json", "model.safetensors"),
            "another key": links.sign(b"another server", path, expires),
            "signature alone": f"{path}?signature={signature}",
        }
        for case, url in refused.items():
            response = client.get(url)
            assert response.status_code == 403, (case, response.text)
            assert response.headers["content-type"].startswith("application/problem+json")
        assert "expired" in client.get(refused["expired"]).json()["detail"]
        assert_problem(client.get(path), 401)  # the plain route still wants a token
        other = create_app(settings)  # another API process: a random key of its own unless CBD_SIGNING_SECRET
        assert other.state.link_key != key
        shared = make_settings(tmp_path, auth="on", signing_secret="s3cret")
        assert create_app(shared).state.link_key == create_app(shared).state.link_key == b"s3cret"


def test_pages_are_shells_and_fragments_need_a_token(tmp_path: Path, tiny_anchors: tuple[Path, Path]) -> None:
    settings = make_settings(tmp_path, auth="on")
    with TestClient(create_app(settings)) as client:
        with client.app.state.session_factory() as session:
            reader, _ = create_token(session, ["read"])
            builder, _ = create_token(session, ["read", "build"])
        chain = register(client, settings, *tiny_anchors, Authorization=f"Bearer {builder}")
        page = client.get(f"/ui/chains/{chain['id']}")
        assert page.status_code == 200 and "tiny" not in page.text and "script-src" not in page.text
        assert "default-src 'self'" in page.headers["content-security-policy"]
        assert client.get("/ui/").status_code == 200 and client.get("/ui/", follow_redirects=False).status_code == 308
        for path in ("/ui/fragments/chains", f"/ui/fragments/chains/{chain['id']}", "/ui/fragments/jobs"):
            assert_problem(client.get(path), 401)
        fragment = client.get(f"/ui/fragments/chains/{chain['id']}", headers={"Authorization": f"Bearer {reader}"})
        assert fragment.status_code == 200 and fragment.headers["cache-control"] == "no-store"
        assert "Validation loss against parameters" in fragment.text
        assert 'id="request-form"' not in fragment.text and "lacks the <code>build</code> scope" in fragment.text
        assert "/ui/fragments" not in client.get("/openapi.json").text  # the console is not the API's contract
        assert_problem(client.get("/ui/fragments/models/nope", headers={"Authorization": f"Bearer {reader}"}), 404)
        # a page's id goes into the URL its script fetches: only the registry's own characters (no "..", no "\\")
        for odd in ("%2E%2E", "..%5C..%5Cmodels%5Cx", "a.b"):
            assert_problem(client.get(f"/ui/chains/{odd}"), 422)


def test_a_chain_with_a_distillation_curve_shows_it(client: TestClient, settings: Settings,
                                                    tiny_anchors: tuple[Path, Path], tmp_path: Path) -> None:
    large, small = tiny_anchors
    curved = tmp_path / "curved"
    shutil.copytree(small, curved)
    (curved / "loss_curve.csv").write_text("step,tokens,loss,dev_loss,validation_loss\n0,0,,4.5,4.6\n1,64,4.4,,\n"
                                           "2,128,4.1,4.0,\n3,192,3.9,,\n")
    chain = register(client, settings, large, curved)
    text = client.get(f"/ui/fragments/chains/{chain['id']}").text
    assert "Distillation of anchor 1" in text
    assert len(re.findall(r'<polyline class="line line-train-loss" points="([^"]+)"', text)[0].split()) == 3
    assert len(re.findall(r'<polyline class="line line-dev-loss" points="([^"]+)"', text)[0].split()) == 2


def test_the_chains_page_tells_a_first_user_what_to_do(client: TestClient) -> None:
    text = client.get("/ui/fragments/chains").text
    assert "No chain yet" in text and "cbd serve --demo" in text and "POST /chains" in text
    assert "No job yet" in client.get("/ui/fragments/jobs").text


def test_a_failed_job_says_why_in_words(client: TestClient, settings: Settings, tiny_chain: dict) -> None:
    model = make_model(client, settings, tiny_chain)
    from sqlalchemy import update

    from app.models import Job

    with client.app.state.session_factory() as session:
        session.execute(update(Job).where(Job.id == model["job"]["id"]).values(
            status="failed", error="OSError: No space left on device"))
        session.commit()
    text = client.get(f"/ui/fragments/jobs/{model['job']['id']}").text
    assert "Why it failed" in text and "No space left on device" in text and "data-refresh" not in text


# --- in a real browser ----------------------------------------------------------------------------------------------


@dataclass
class Live:
    url: str
    settings: Settings
    token: str | None


@pytest.fixture
def live(request: pytest.FixtureRequest, tmp_path: Path, tiny_anchors: tuple[Path, Path]) -> Iterator[Live]:
    """The app on a socket, a worker thread running its jobs with the worker's task code, and a ready tiny chain."""
    settings = make_settings(tmp_path, auth=request.param, rate_limit_per_minute=0)
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    threads = [threading.Thread(target=server.run, daemon=True)]
    stop = threading.Event()

    def work() -> None:
        while not stop.is_set():
            if not run_pending(settings):
                stop.wait(0.2)

    threads.append(threading.Thread(target=work, daemon=True))
    for thread in threads:
        thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    token = None
    if request.param == "on":
        with app.state.session_factory() as session:
            token, _ = create_token(session, ["read", "build"])
    with TestClient(app, base_url=url) as client:  # the chain is registered through the API, as a user would
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        body = {"name": "tiny-chain", "source": str(tiny_anchors[0]), "dataset": {"path": str(DOLLY)},
                "anchors": [{"checkpoint": str(tiny_anchors[1]), "distill": False}], "device": "cpu"}
        job = client.post("/chains", json=body, headers=headers).json()["job"]
        deadline = time.monotonic() + 120
        while client.get(job["url"], headers=headers).json()["status"] != "succeeded":
            assert time.monotonic() < deadline, "the chain was not registered in 120 s"
            time.sleep(0.2)
    yield Live(url, settings, token)
    stop.set()
    server.should_exit = True
    for thread in threads:
        thread.join(30)


@pytest.fixture
def browser() -> Iterator[object]:
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail("Debian's chromium is not installed (.ci/run installs it)")
        pytest.skip("Debian's chromium is not installed: apt-get install chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield browser
        browser.close()


def screenshot(page: object, name: str) -> None:
    folder = ARTIFACTS / "console"
    folder.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(folder / f"{name}.png"), full_page=True)


@pytest.mark.parametrize("live", ["off", "on"], indirect=True)
def test_a_first_user_requests_a_size_watches_the_job_and_downloads_the_model(live: Live, browser: object,
                                                                               tmp_path: Path) -> None:
    from playwright.sync_api import expect

    mode = "auth-on" if live.token else "auth-off"
    context = browser.new_context(accept_downloads=True, viewport={"width": 1100, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(f"{live.url}/ui")
    if live.token:  # without a token: no data, a request for one
        expect(page.get_by_label("API token")).to_be_visible()
        expect(page.locator("main")).not_to_contain_text("tiny-chain")
        screenshot(page, f"{mode}-token")
        for path in ("/ui/jobs", "/ui/chains/x"):
            page.goto(f"{live.url}{path}")
            expect(page.get_by_label("API token")).to_be_visible()
            expect(page.locator("main table")).to_have_count(0)
        page.get_by_label("API token").fill("cbd_wrong")
        page.get_by_role("button", name="Use this token").click()
        expect(page.locator("#token-message")).to_contain_text("refused")
        page.get_by_label("API token").fill(live.token)
        page.get_by_role("button", name="Use this token").click()
        page.goto(f"{live.url}/ui")  # the token stays for the tab
    page.get_by_role("link", name="tiny-chain").click()
    expect(page.get_by_role("heading", name="Request a size")).to_be_visible()
    expect(page.locator(".pt-source")).to_have_count(1)
    expect(page.locator(".pt-anchor")).to_have_count(1)
    page.locator(".pt-anchor").focus()  # keyboard: the point's numbers
    expect(page.locator("#tooltip")).to_contain_text("validation loss")
    expect(page.locator('[data-plan="existing"]')).to_contain_text("no: submitting makes it")
    page.get_by_label("Parameters, exact count").fill(str(exact_midpoint(page)))
    page.get_by_text("Advanced options").click()
    page.get_by_label("Data type").select_option("float32")
    expect(page.locator('[data-plan="params"]')).to_have_text(re.compile(r"^[\d,]+$"))
    params = int(page.locator('[data-plan="params"]').inner_text().replace(",", ""))
    screenshot(page, f"{mode}-chain")
    page.get_by_role("button", name="Make this model").click()

    page.wait_for_url(re.compile(r"/ui/jobs/job_"))
    expect(page.locator("#job-status")).to_have_text("succeeded", timeout=120_000)
    screenshot(page, f"{mode}-job")
    page.get_by_role("link", name="Open the model").click()
    expect(page.get_by_role("heading", level=1)).to_contain_text("model")
    expect(page.locator("main")).to_contain_text(f"{params:,}")
    screenshot(page, f"{mode}-model")
    row = page.locator("tr", has=page.locator('a[data-download="config.json"]'))
    expected = row.locator("code.hash").inner_text()
    with page.expect_download() as download:
        page.locator('a[data-download="config.json"]').click()
    assert hashlib.sha256(Path(download.value.path()).read_bytes()).hexdigest() == expected
    assert "signature=" in page.locator('a[data-download="config.json"]').get_attribute("href")

    page.goto(f"{live.url}/ui/jobs")
    expect(page.locator("tbody tr")).to_have_count(2)  # the chain's and the model's
    screenshot(page, f"{mode}-jobs")
    page.set_viewport_size({"width": 390, "height": 844})  # a phone
    page.goto(f"{live.url}/ui")
    expect(page.get_by_role("link", name="tiny-chain")).to_be_visible()
    screenshot(page, f"{mode}-chains-phone")
    assert not errors, errors
    context.close()


def exact_midpoint(page: object) -> int:
    size = page.get_by_label("Parameters, exact count")
    return (int(size.get_attribute("min")) + int(size.get_attribute("max"))) // 2


def test_jobs_refresh_while_active_and_offer_cancel_to_those_allowed(tmp_path: Path,
                                                                      tiny_anchors: tuple[Path, Path]) -> None:
    settings = make_settings(tmp_path, auth="on")
    with TestClient(create_app(settings)) as client:
        with client.app.state.session_factory() as session:
            tokens = {scopes: create_token(session, scopes.split(","))[0] for scopes in ("read", "read,build")}
        builder = {"Authorization": f"Bearer {tokens['read,build']}"}
        chain = register(client, settings, *tiny_anchors, **builder)
        body = {"chain": chain["id"], "size": midpoint(chain)}
        job = client.post("/models", json=body, headers=builder).json()["job"]
        mine = client.get("/ui/fragments/jobs", headers=builder).text
        assert f'data-cancel="{job["id"]}"' in mine and "data-refresh" in mine and "estimated" in mine
        read_only = client.get(f"/ui/fragments/jobs/{job['id']}", headers={"Authorization": f"Bearer {tokens['read']}"})
        assert "data-cancel" not in read_only.text and "queued" in read_only.text
        assert client.post(f"/jobs/{job['id']}/cancel", headers=builder).status_code == 202
        done = client.get(f"/ui/fragments/jobs/{job['id']}", headers=builder).text
        assert "cancelled" in done and "data-cancel" not in done and "data-refresh" not in done
