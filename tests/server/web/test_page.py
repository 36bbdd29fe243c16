"""The web page in a real browser (Debian's chromium driven by Playwright) against a real server.

Screenshots of the main states go to test-output/screenshots/ for a person to look at.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..conftest import RunningServer, ServerFactory

playwright_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SHOTS = Path(__file__).resolve().parents[3] / "test-output" / "screenshots"
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed")


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run"],
        )  # fmt: skip
        yield browser
        browser.close()


@pytest.fixture
def page(browser: object) -> Iterator[object]:
    context = browser.new_context(viewport={"width": 1200, "height": 900})  # type: ignore[attr-defined]
    page = context.new_page()
    page.set_default_timeout(60_000)
    yield page
    context.close()


def shot(page: object, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)  # type: ignore[attr-defined]


def fill_small_job(page: object, steps: int = 20, refiner_steps: int = 10, prompt: str = "a red lighthouse") -> None:
    p = page
    p.fill("#prompt", prompt)  # type: ignore[attr-defined]
    p.select_option("#size", "custom")  # type: ignore[attr-defined]
    p.fill("#width", "256")  # type: ignore[attr-defined]
    p.fill("#height", "256")  # type: ignore[attr-defined]
    p.click("#advanced summary")  # type: ignore[attr-defined]
    p.fill("#num_inference_steps", str(steps))  # type: ignore[attr-defined]
    p.fill("#refiner_steps", str(refiner_steps))  # type: ignore[attr-defined]


@pytest.fixture
def web(server_factory: ServerFactory) -> Iterator[RunningServer]:
    with server_factory(preview_every=1) as server:
        yield server


def test_defaults_submit_progress_preview_and_gallery(web: RunningServer, page: object) -> None:
    p = page
    p.goto(web.url + "/")  # type: ignore[attr-defined]
    assert p.input_value("#num_inference_steps") == "50" and p.input_value("#refiner_steps") == "30"  # type: ignore[attr-defined]
    assert p.input_value("#guidance_scale") == "8.0" and p.input_value("#size") == "1024x1024"  # type: ignore[attr-defined]
    shot(p, "01-empty-form")
    fill_small_job(p, steps=120, refiner_steps=30)
    p.keyboard.press("Control+Enter")  # type: ignore[attr-defined]
    p.wait_for_selector(".job .preview:not([hidden])")  # type: ignore[attr-defined]
    assert "step" in p.inner_text(".job .job-state")  # type: ignore[attr-defined]
    shot(p, "02-running-with-preview")
    p.wait_for_selector(".job.succeeded")  # type: ignore[attr-defined]
    assert p.get_attribute(".job.succeeded progress", "value") == "100"  # type: ignore[attr-defined]
    p.wait_for_selector("#gallery img[src^='blob:']")  # type: ignore[attr-defined]
    shot(p, "03-gallery")
    jobs = web.client.get("/v1/jobs").json()["items"]
    assert jobs[0]["status"] == "succeeded" and jobs[0]["request"]["num_inference_steps"] == 120


def test_viewer_shows_metadata_and_reuses_settings(web: RunningServer, page: object) -> None:
    p = page
    p.goto(web.url + "/")  # type: ignore[attr-defined]
    fill_small_job(p, prompt="a green boat")
    p.uncheck("#random-seed")  # type: ignore[attr-defined]
    p.fill("#seed", "4242")  # type: ignore[attr-defined]
    p.click("#submit")  # type: ignore[attr-defined]
    p.wait_for_selector("#gallery img[src^='blob:']")  # type: ignore[attr-defined]
    p.click("#gallery button.thumb")  # type: ignore[attr-defined]
    p.wait_for_selector("#viewer[open]")  # type: ignore[attr-defined]
    meta = p.inner_text("#viewer-meta")  # type: ignore[attr-defined]
    assert "4242" in meta and "20 base + 10 refiner" in meta and "cpu (fp32)" in meta and "Refined\nyes" in meta
    shot(p, "04-viewer")
    p.fill("#prompt", "something else")  # type: ignore[attr-defined]
    p.click("#reuse")  # type: ignore[attr-defined]
    assert p.input_value("#prompt") == "a green boat" and p.input_value("#seed") == "4242"  # type: ignore[attr-defined]
    assert p.input_value("#width") == "256" and p.input_value("#num_inference_steps") == "20"  # type: ignore[attr-defined]


def test_cancel_stops_a_running_job(web: RunningServer, page: object) -> None:
    p = page
    p.goto(web.url + "/")  # type: ignore[attr-defined]
    fill_small_job(p, steps=500)
    p.click("#submit")  # type: ignore[attr-defined]
    p.wait_for_function("document.querySelector('.job .job-state')?.textContent.includes('base step')")  # type: ignore[attr-defined]
    p.click(".job .cancel")  # type: ignore[attr-defined]
    p.wait_for_selector(".job.cancelled")  # type: ignore[attr-defined]
    assert p.inner_text(".job.cancelled .job-state") == "Cancelled"  # type: ignore[attr-defined]
    shot(p, "05-cancelled")
    job = web.client.get("/v1/jobs").json()["items"][0]
    assert job["status"] == "cancelled" and job["progress"]["step"] < 500


def test_bad_size_shows_the_field_error(web: RunningServer, page: object) -> None:
    p = page
    p.goto(web.url + "/")  # type: ignore[attr-defined]
    fill_small_job(p)
    p.fill("#width", "1001")  # type: ignore[attr-defined]
    p.click("#submit")  # type: ignore[attr-defined]
    error = p.wait_for_selector('[data-error-for="width"]:not(:empty)')  # type: ignore[attr-defined]
    assert error.inner_text() == "width: Input should be a multiple of 8"
    assert "invalid" in (p.get_attribute("#width", "class") or "")  # type: ignore[attr-defined]
    shot(p, "06-field-error")
    assert web.client.get("/v1/jobs").json()["total"] == 0


def test_api_key_prompt(server_factory: ServerFactory, page: object) -> None:
    p = page
    with server_factory(api_key="s3cret") as server:
        p.goto(server.url + "/")  # type: ignore[attr-defined]
        p.wait_for_selector("#key-panel:not([hidden])")  # type: ignore[attr-defined]
        assert p.is_hidden("#app")  # type: ignore[attr-defined]
        shot(p, "07-api-key-prompt")
        p.fill("#api-key", "wrong")  # type: ignore[attr-defined]
        p.click("#key-form button")  # type: ignore[attr-defined]
        p.wait_for_selector("#key-error:has-text('That key was refused.')")  # type: ignore[attr-defined]
        p.fill("#api-key", "s3cret")  # type: ignore[attr-defined]
        p.click("#key-form button")  # type: ignore[attr-defined]
        p.wait_for_selector("#app:not([hidden])")  # type: ignore[attr-defined]
        assert p.evaluate("localStorage.getItem('refinery.apiKey')") == "s3cret"  # type: ignore[attr-defined]
        p.reload()  # type: ignore[attr-defined]
        p.wait_for_selector("#app:not([hidden])")  # type: ignore[attr-defined]


def test_narrow_screen_and_labels(web: RunningServer, browser: object) -> None:
    context = browser.new_context(viewport={"width": 390, "height": 844})  # type: ignore[attr-defined]
    p = context.new_page()
    p.goto(web.url + "/")
    p.wait_for_selector("#app:not([hidden])")
    assert p.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    unlabeled = p.evaluate("""[...document.querySelectorAll('input, select, textarea, button')].filter(el =>
        !(el.labels && el.labels.length) && !el.getAttribute('aria-label') && !el.textContent.trim())
        .map(el => el.id)""")
    assert unlabeled == []
    shot(p, "08-phone")
    context.close()


def test_unreachable_server_banner(server_factory: ServerFactory, page: object) -> None:
    p = page
    with server_factory() as server:
        p.goto(server.url + "/")  # type: ignore[attr-defined]
        p.wait_for_selector("#app:not([hidden])")  # type: ignore[attr-defined]
    fill_small_job(p)
    p.click("#submit")  # type: ignore[attr-defined]
    banner = p.wait_for_selector("#banner:not([hidden])")  # type: ignore[attr-defined]
    assert "unreachable" in banner.inner_text()
    shot(p, "09-unreachable")


def test_bad_handoff_point_is_refused_at_submit(web: RunningServer, page: object) -> None:
    p = page
    p.goto(web.url + "/")  # type: ignore[attr-defined]
    fill_small_job(p, steps=2, refiner_steps=1)
    p.select_option("#mode", "handoff")  # type: ignore[attr-defined]
    p.fill("#switch_at", "0.3")  # type: ignore[attr-defined]
    p.click("#submit")  # type: ignore[attr-defined]
    error = p.wait_for_selector('[data-error-for="switch_at"]:not(:empty)')  # type: ignore[attr-defined]
    assert error.inner_text() == "switch_at: 0.3 leaves the base no step out of num_inference_steps=2"
    assert web.client.get("/v1/jobs").json()["total"] == 0


def test_full_queue_banner_and_failed_job_reason(
    server_factory: ServerFactory, page: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = page
    with server_factory(max_queue=1, preview_every=0) as server:
        p.goto(server.url + "/")  # type: ignore[attr-defined]
        real_fsync = os.fsync

        def full_disk(descriptor: int) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(os, "fsync", full_disk)  # the server runs in this process
        fill_small_job(p, steps=2, refiner_steps=1)
        p.click("#submit")  # type: ignore[attr-defined]
        failed = p.wait_for_selector(".job.failed .job-state")  # type: ignore[attr-defined]
        assert failed.inner_text().startswith("Failed: could not write") and "No space left" in failed.inner_text()
        monkeypatch.setattr(os, "fsync", real_fsync)
        shot(p, "10-failed-job")
        p.fill("#num_inference_steps", "500")  # type: ignore[attr-defined]
        p.click("#submit")  # type: ignore[attr-defined]
        p.wait_for_function("document.querySelectorAll('.job').length >= 2")  # type: ignore[attr-defined]
        p.click("#submit")  # type: ignore[attr-defined]
        banner = p.wait_for_selector("#banner:not([hidden])")  # type: ignore[attr-defined]
        assert banner.inner_text().startswith("The queue is full. Try again in 30 seconds.")
        shot(p, "11-queue-full")
        for job in server.client.get("/v1/jobs", params={"status": "running"}).json()["items"]:
            server.client.post(f"/v1/jobs/{job['id']}/cancel")
