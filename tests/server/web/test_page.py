"""The web page in a real browser (Debian's chromium driven by Playwright) against a real server.

The server runs over the fake engine (tests/fakes.py): the page is the subject. Screenshots of
the main states go to a temporary folder (printed at the end of the run), or to
$REFINERY_SCREENSHOTS when set, for a person to look at.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from ...fakes import FakeEngine
from ...waiting import poll
from ..conftest import RunningServer, ServerFactory

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SHOTS = Path(os.environ.get("REFINERY_SCREENSHOTS") or Path(tempfile.gettempdir()) / "refinery-screenshots")
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed")


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run"],
        )  # fmt: skip
        yield browser
        browser.close()


@contextlib.contextmanager
def page_at(browser: Browser, width: int, height: int = 900) -> Iterator[Page]:
    """A fresh page in a window `width` x `height` pixels (its context closed after)."""
    context = browser.new_context(viewport={"width": width, "height": height})
    page = context.new_page()
    page.set_default_timeout(60_000)
    try:
        yield page
    finally:
        context.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    with page_at(browser, 1200) as page:
        yield page


def shot(page: Page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def fill_small_job(page: Page, steps: int = 20, refiner_steps: int = 10, prompt: str = "a red lighthouse") -> None:
    p = page
    p.fill("#prompt", prompt)
    p.select_option("#size", "custom")
    p.fill("#width", "256")
    p.fill("#height", "256")
    p.click("#advanced summary")
    p.fill("#num_inference_steps", str(steps))
    p.fill("#refiner_steps", str(refiner_steps))


@pytest.fixture
def web(server_factory: ServerFactory) -> Iterator[RunningServer]:
    with server_factory(preview_every=1) as server:
        yield server


def test_defaults_submit_progress_preview_and_gallery(web: RunningServer, page: Page, fake_engine: FakeEngine) -> None:
    p = page
    p.goto(web.url + "/")
    p.wait_for_selector("#app:not([hidden])")
    # Defaults and limits come from the server's request schema, not from the page.
    fields = {field["name"]: field for field in web.client.get("/v1/schema").json()["fields"]}
    assert p.input_value("#num_inference_steps") == str(fields["num_inference_steps"]["default"])
    assert float(p.input_value("#guidance_scale")) == fields["guidance_scale"]["default"]
    assert p.input_value("#refiner_steps") == str(fields["refiner_steps"]["default"])
    assert p.input_value("#size") == f"{fields['width']['default']}x{fields['height']['default']}"
    assert p.get_attribute("#n", "max") == str(web.settings.max_images)
    # A field the page has no hand-made input for gets one generated from the table.
    assert float(p.input_value("#aesthetic_score")) == fields["aesthetic_score"]["default"]
    shot(p, "01-empty-form")
    fill_small_job(p, steps=120, refiner_steps=30)
    fake_engine.pause_at(60)  # held mid-run while the running state is checked
    p.keyboard.press("Control+Enter")
    p.wait_for_selector(".job .preview:not([hidden])")
    p.wait_for_function("document.querySelector('.job .job-state')?.textContent.includes('base step')")
    shot(p, "02-running-with-preview")
    fake_engine.resume()
    p.wait_for_selector(".job.succeeded")
    assert p.get_attribute(".job.succeeded progress", "value") == "100"
    p.wait_for_selector("#gallery img[src^='blob:']")
    shot(p, "03-gallery")
    jobs = web.client.get("/v1/jobs").json()["items"]
    assert jobs[0]["status"] == "succeeded" and jobs[0]["request"]["num_inference_steps"] == 120


def test_viewer_shows_metadata_and_reuses_settings(web: RunningServer, page: Page) -> None:
    p = page
    p.goto(web.url + "/")
    fill_small_job(p, prompt="a green boat")
    p.uncheck("#random-seed")
    p.fill("#seed", "4242")
    p.click("#submit")
    p.wait_for_selector("#gallery img[src^='blob:']")
    p.click("#gallery button.thumb")
    p.wait_for_selector("#viewer[open]")
    meta = p.inner_text("#viewer-meta")
    assert "4242" in meta and "20 base + 10 refiner" in meta and "cpu (fp32)" in meta and "Refined\nyes" in meta
    shot(p, "04-viewer")
    p.fill("#prompt", "something else")
    p.click("#reuse")
    assert p.input_value("#prompt") == "a green boat" and p.input_value("#seed") == "4242"
    assert p.input_value("#width") == "256" and p.input_value("#num_inference_steps") == "20"


def test_cancel_stops_a_running_job(web: RunningServer, page: Page, fake_engine: FakeEngine) -> None:
    p = page
    p.goto(web.url + "/")
    fake_engine.pause_at(2)
    fill_small_job(p, steps=500)
    p.click("#submit")
    p.wait_for_function("document.querySelector('.job .job-state')?.textContent.includes('base step')")
    p.click(".job .cancel")
    p.wait_for_selector(".job.cancelled")
    assert p.inner_text(".job.cancelled .job-state") == "Cancelled"
    shot(p, "05-cancelled")
    job = web.client.get("/v1/jobs").json()["items"][0]
    assert job["status"] == "cancelled" and job["progress"]["step"] == 2


def test_bad_size_shows_the_field_error(web: RunningServer, page: Page) -> None:
    p = page
    p.goto(web.url + "/")
    fill_small_job(p)
    p.fill("#width", "1001")
    p.click("#submit")
    error = p.wait_for_selector('[data-error-for="width"]:not(:empty)')
    assert (
        error.inner_text()
        == "width: Input should be a multiple of 8; sizes that work are multiples of 8 from 64 to 4096"
    )
    assert "invalid" in (p.get_attribute("#width", "class") or "")
    shot(p, "06-field-error")
    assert web.client.get("/v1/jobs").json()["total"] == 0


def test_api_key_prompt(server_factory: ServerFactory, page: Page) -> None:
    p = page
    with server_factory(api_key="s3cret") as server:
        p.goto(server.url + "/")
        p.wait_for_selector("#key-panel:not([hidden])")
        assert p.is_hidden("#app")
        shot(p, "07-api-key-prompt")
        p.fill("#api-key", "wrong")
        p.click("#key-form button")
        p.wait_for_selector("#key-error:has-text('That key was refused.')")
        p.fill("#api-key", "s3cret")
        p.click("#key-form button")
        p.wait_for_selector("#app:not([hidden])")
        assert p.evaluate("localStorage.getItem('refinery.apiKey')") == "s3cret"
        p.reload()
        p.wait_for_selector("#app:not([hidden])")


def test_narrow_screen_and_labels(web: RunningServer, browser: Browser) -> None:
    with page_at(browser, 390, 844) as p:
        p.goto(web.url + "/")
        p.wait_for_selector("#app:not([hidden])")
        assert p.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        unlabeled = p.evaluate("""[...document.querySelectorAll('input, select, textarea, button')].filter(el =>
            !(el.labels && el.labels.length) && !el.getAttribute('aria-label') && !el.textContent.trim())
            .map(el => el.id)""")
        assert unlabeled == []
        shot(p, "08-phone")


def test_unreachable_server_banner(server_factory: ServerFactory, page: Page) -> None:
    p = page
    with server_factory() as server:
        p.goto(server.url + "/")
        p.wait_for_selector("#app:not([hidden])")
    fill_small_job(p)
    p.click("#submit")
    banner = p.wait_for_selector("#banner:not([hidden])")
    assert "unreachable" in banner.inner_text()
    shot(p, "09-unreachable")


def test_bad_handoff_point_is_refused_at_submit(web: RunningServer, page: Page) -> None:
    p = page
    p.goto(web.url + "/")
    fill_small_job(p, steps=2, refiner_steps=1)
    p.select_option("#mode", "handoff")
    p.fill("#switch_at", "0.3")
    p.click("#submit")
    error = p.wait_for_selector('[data-error-for="switch_at"]:not(:empty)')
    assert error.inner_text() == "switch_at: 0.3 leaves the base no step out of num_inference_steps=2"
    assert web.client.get("/v1/jobs").json()["total"] == 0


def test_full_queue_banner_and_failed_job_reason(
    server_factory: ServerFactory, page: Page, monkeypatch: pytest.MonkeyPatch, fake_engine: FakeEngine
) -> None:
    p = page
    with server_factory(max_queue=1, preview_every=0) as server:
        p.goto(server.url + "/")
        real_fsync = os.fsync

        def broken_disk(descriptor: int) -> None:  # (a full disk would only send the job back to the queue)
            raise OSError(errno.EIO, "Input/output error")

        monkeypatch.setattr(os, "fsync", broken_disk)  # the server runs in this process
        fill_small_job(p, steps=2, refiner_steps=1)
        p.click("#submit")
        failed = p.wait_for_selector(".job.failed .job-state")
        assert failed.inner_text().startswith("Failed: could not write") and "Input/output" in failed.inner_text()
        monkeypatch.setattr(os, "fsync", real_fsync)
        shot(p, "10-failed-job")
        fake_engine.pause_at(1)
        p.fill("#num_inference_steps", "500")
        p.click("#submit")
        p.wait_for_function("document.querySelectorAll('.job').length >= 2")
        p.click("#submit")
        banner = p.wait_for_selector("#banner:not([hidden])")
        assert banner.inner_text().startswith("The queue is full. Try again in 30 seconds.")
        shot(p, "11-queue-full")
        for job in server.client.get("/v1/jobs", params={"status": "running"}).json()["items"]:
            server.client.post(f"/v1/jobs/{job['id']}/cancel")


def test_samplers_and_schedules_are_offered_and_sent(web: RunningServer, page: Page) -> None:
    p = page
    p.goto(web.url + "/")
    p.wait_for_selector("#app:not([hidden])")
    fill_small_job(p, steps=4, refiner_steps=2)
    offered = p.eval_on_selector("#sampler", "s => [...s.options].map(o => o.value)")
    assert "DPM++ 2M" in offered and "UniPC" in offered and p.input_value("#sampler") == "Euler"
    assert p.input_value("#refiner_sampler") == ""  # "(same as the base)"
    p.select_option("#sampler", "DPM++ 2M")
    p.select_option("#scheduler", "Karras")
    p.keyboard.press("Control+Enter")
    p.wait_for_selector(".job.succeeded")
    request = web.client.get("/v1/jobs").json()["items"][0]["request"]
    assert (request["sampler"], request["scheduler"], request["refiner_sampler"]) == ("DPM++ 2M", "Karras", None)


SELECT_TEXT_FITS = """() => {
  const context = document.createElement('canvas').getContext('2d');
  return [...document.querySelectorAll('select')].filter(s => s.offsetParent !== null).map(select => {
    const style = getComputedStyle(select);
    context.font = `${style.fontSize} ${style.fontFamily}`;
    const widest = Math.max(...[...select.options].map(o => context.measureText(o.text).width));
    const room = select.clientWidth - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight) - 20;
    return {id: select.id, fits: widest <= room, widest, room};
  }).filter(row => !row.fits);
}"""


@pytest.mark.parametrize("width", [1280, 390])
def test_the_page_looks_finished(web: RunningServer, browser: Browser, width: int) -> None:
    with page_at(browser, width, 900) as p:
        p.goto(web.url + "/")
        p.wait_for_selector("#app:not([hidden])")
        # Empty states say what to do; an empty gallery has no pager.
        p.wait_for_selector("#no-images:not([hidden])")
        assert "No images yet" in p.inner_text("#no-images") and p.is_hidden("#pager")
        assert "press Generate" in p.inner_text("#no-jobs")
        if width > 720:  # beside the form, the idle Jobs panel is as tall as its content, not the form
            jobs_height = p.evaluate("document.querySelector('#jobs-title').parentElement.offsetHeight")
            assert jobs_height < 0.5 * p.evaluate("document.querySelector('#generate-form').offsetHeight")
        p.click("#advanced summary")
        assert p.evaluate(SELECT_TEXT_FITS) == []  # no option text cut off, Advanced's selects included
        shot(p, f"09-idle-{width}")
        p.click("#advanced summary")  # closed again: fill_small_job opens it
        # A favicon, for the tab and for browsers that ask for /favicon.ico.
        assert p.get_attribute("link[rel=icon]", "href") == "favicon.svg"
        for name in ("favicon.ico", "favicon.svg"):
            icon = web.client.get(f"/{name}")
            assert icon.status_code == 200 and icon.headers["content-type"].startswith("image/")
        # A finished image: a thumbnail with its prompt and seed, alt text readable before the image loads.
        fill_small_job(p, steps=4, refiner_steps=2, prompt="a quiet harbour")
        p.uncheck("#random-seed")
        p.fill("#seed", "77")
        p.click("#submit")
        p.wait_for_selector("#gallery button.thumb")
        captions = p.inner_text("#gallery button.thumb")
        assert "a quiet harbour" in captions and "seed 77" in captions
        assert p.evaluate("getComputedStyle(document.querySelector('#gallery img')).color") != "rgb(255, 255, 255)"
        shot(p, f"10-done-{width}")
        # The viewer's backdrop covers the whole page.
        p.wait_for_selector("#gallery img[src^='blob:']")
        p.click("#gallery button.thumb")
        p.wait_for_selector("#viewer[open]")
        backdrop = p.evaluate("""(() => { const s = getComputedStyle(document.querySelector('#viewer'), '::backdrop');
            return [s.position, s.backgroundColor]; })()""")
        assert backdrop == ["fixed", "rgba(0, 0, 0, 0.6)"]
        shot(p, f"11-viewer-{width}")


def test_loras_are_picked_with_weights_sent_and_reused(server_factory: ServerFactory, fake: object, page: Page,
                                                       fake_engine: FakeEngine, tmp_path: Path) -> None:  # fmt: skip
    """The picker lists the server's LoRA folder; chosen LoRAs and weights travel in the request, reach the
    engine, come back with "reuse settings", and a bad one shows its reason under the picker."""
    import torch
    from safetensors.torch import save_file

    from sdxl_refinery.loras import LoraFolder

    folder = tmp_path / "loras"
    folder.mkdir()
    layer = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q"
    for name in ("ink", "watercolour"):  # UNet self-attention only: no architecture to read, any base takes them
        tensors = {f"{layer}.lora_down.weight": torch.zeros(4, 8), f"{layer}.lora_up.weight": torch.zeros(8, 4)}
        save_file(tensors, folder / f"{name}.safetensors")
    fake[0].lora_folder = LoraFolder(folder)  # type: ignore[index]
    p = page
    with server_factory(preview_every=1) as web:
        p.goto(web.url + "/")
        p.wait_for_selector("#app:not([hidden])")
        fill_small_job(p, steps=4, refiner_steps=2)
        assert p.eval_on_selector("#lora-name", "s => [...s.options].map(o => o.value)") == ["ink", "watercolour"]
        assert p.is_hidden("#lora-empty")
        p.select_option("#lora-name", "watercolour")
        p.fill("#lora-weight", "0.6")
        p.click("#lora-add")
        p.select_option("#lora-name", "ink")
        p.fill("#lora-weight", "-1.5")
        p.click("#lora-add")
        assert p.inner_text("#lora-list").split("\n")[0].startswith("watercolour × 0.6")
        shot(p, "loras-picked")
        p.keyboard.press("Control+Enter")
        p.wait_for_selector(".job.succeeded")
        request = web.client.get("/v1/jobs").json()["items"][0]["request"]
        assert request["loras"] == [{"name": "watercolour", "weight": 0.6}, {"name": "ink", "weight": -1.5}]
        assert [(file.name, weight) for file, weight in fake_engine.loras[-1]] == [("watercolour", 0.6), ("ink", -1.5)]
        p.click("#lora-list li:first-child .lora-remove")
        p.click("#lora-list li:first-child .lora-remove")
        assert p.inner_text("#lora-list") == ""
        (folder / "ink.safetensors").write_bytes(b"broken now")
        p.select_option("#lora-name", "ink")
        p.click("#lora-add")
        p.keyboard.press("Control+Enter")
        p.wait_for_selector('[data-error-for="loras"]:has-text("not a readable safetensors file")')


def test_img2img_with_a_painted_mask_and_hires_fix(real_server_factory: ServerFactory, page: Page,
                                                   tmp_path: Path) -> None:  # fmt: skip
    """Drop an image, paint over its left part, set the strength: the job carries both images, and the result
    keeps every unpainted pixel. Then hires fix from text renders at the larger size."""
    import io

    import numpy as np
    from PIL import Image, ImageDraw

    source = Image.new("RGB", (64, 64), (30, 120, 200))
    ImageDraw.Draw(source).ellipse((16, 16, 48, 48), fill=(220, 200, 40))
    path = tmp_path / "start.png"
    source.save(path)
    p = page
    with real_server_factory() as web:
        p.goto(web.url + "/")
        p.wait_for_selector("#app:not([hidden])")
        p.fill("#prompt", "a lemon on blue cloth")
        p.set_input_files("#init-file", str(path))
        p.wait_for_selector("#init-editor:not([hidden])")
        assert (p.input_value("#width"), p.input_value("#height")) == ("64", "64")  # the image's own size
        box = p.locator("#init-canvas").bounding_box()
        assert box is not None
        p.mouse.move(box["x"] + box["width"] * 0.05, box["y"] + box["height"] * 0.1)
        p.mouse.down()
        p.mouse.move(box["x"] + box["width"] * 0.1, box["y"] + box["height"] * 0.9, steps=8)
        p.mouse.up()
        assert "painted" in p.inner_text("#mask-state")
        p.eval_on_selector("#strength", "s => { s.value = '0.6'; s.dispatchEvent(new Event('input')); }")
        assert p.inner_text("#strength-value") == "0.6"
        p.click("#advanced summary")
        p.fill("#num_inference_steps", "5")
        p.fill("#refiner_steps", "2")
        p.fill("#mask_blur", "0")
        shot(p, "img2img-painted")
        p.click("#submit")
        p.wait_for_selector(".job.succeeded", timeout=120_000)
        job = web.client.get("/v1/jobs").json()["items"][0]
        request = job["request"]
        assert request["strength"] == 0.6 and request["mask_blur"] == 0
        assert (request["init_image"]["width"], request["mask_image"]["width"]) == (64, 64)
        assert job["result"]["metadata"]["base_steps"] == 3  # 5 steps x 0.6
        name = job["result"]["images"][0]
        made = Image.open(io.BytesIO(web.client.get(f"/v1/images/{job['id']}/{name}").content)).convert("RGB")
        right = slice(32, 64)  # never painted: exactly the dropped image
        assert np.array_equal(np.asarray(made)[:, right], np.asarray(source)[:, right])

        p.click("#clear-init")
        p.check("#enable_hr")
        p.fill("#hr_scale", "1.5")
        p.click("#submit")
        # Done cards leave the list after 1.5 s: count finished jobs where they stay, in the job store.
        poll(lambda: sum(job["status"] == "succeeded" for job in web.client.get("/v1/jobs").json()["items"]) >= 2,
             "the hires job to finish")  # fmt: skip
        job = web.client.get("/v1/jobs").json()["items"][0]
        assert job["request"]["enable_hr"] and job["request"].get("init_image") is None
        name = job["result"]["images"][0]
        made = Image.open(io.BytesIO(web.client.get(f"/v1/images/{job['id']}/{name}").content))
        assert made.size == (96, 96)


def test_the_model_pickers_list_the_folder_and_send_the_choice(tiny_pair: tuple[Path, Path], page: Page,
                                                               tmp_path: Path) -> None:  # fmt: skip
    from sdxl_refinery import ImageService

    from ...engine.test_model_choice import models_folder
    from ..conftest import run_server

    models = models_folder(tiny_pair, tmp_path)
    service = ImageService(str(tiny_pair[0]), str(tiny_pair[1]), device="cpu", precision="full",
                           models_dir=models["folder"])  # fmt: skip
    p = page
    try:
        with run_server(service, tmp_path / "data") as web:
            p.goto(web.url + "/")
            p.wait_for_selector("#model-row:not([hidden])")
            assert p.eval_on_selector("#base-model", "s => [...s.options].map(o => o.value)") == ["", "beta", "gamma"]
            assert p.eval_on_selector("#refiner-model", "s => [...s.options].map(o => o.value)") == ["", "refiner-x"]
            fill_small_job(p, steps=3, refiner_steps=1)
            p.select_option("#size", "custom")
            p.fill("#width", "64")
            p.fill("#height", "64")
            p.select_option("#base-model", "gamma")
            shot(p, "model-picker")
            p.click("#submit")
            p.wait_for_selector(".job.succeeded", timeout=120_000)
            job = web.client.get("/v1/jobs").json()["items"][0]
            assert job["request"]["base_model"] == "gamma" and job["request"].get("refiner_model") is None
            full = web.client.get(f"/v1/jobs/{job['id']}").json()
            assert full["result"]["metadata"]["models"]["base"] == "gamma"
    finally:
        service.close()


def test_the_result_shows_large_with_a_bar_per_stage_and_sends_to_inpaint(
    web: RunningServer, page: Page, fake_engine: FakeEngine
) -> None:
    p = page
    p.goto(web.url + "/")
    p.wait_for_selector("#app:not([hidden])")
    fill_small_job(p, prompt="a blue kite")
    fake_engine.pause_at(5)
    p.click("#submit")
    assert fake_engine.paused.wait(60)
    p.wait_for_function("Number(document.querySelector('.job .stage-base')?.value) > 0")
    assert float(p.get_attribute(".job .stage-refiner", "value") or "0") == 0  # the refiner has not started
    fake_engine.resume()
    p.wait_for_selector("#result:not([hidden]) #result-image[src^='blob:']")
    box = p.locator("#result-image").bounding_box()
    assert box is not None and box["width"] >= 400  # large, beside the form; the gallery's are ~170 px
    assert "a blue kite" in p.inner_text("#result-caption")
    p.click("#result-recipe")
    p.wait_for_selector("#viewer[open]")
    meta = " ".join(p.inner_text("#viewer-meta").split())
    assert "Sampler Euler" in meta and "LoRAs none" in meta and "Hires fix off" in meta
    p.click("#send-inpaint")
    p.wait_for_selector("#init-editor:not([hidden])")
    assert p.eval_on_selector("#viewer", "v => v.open") is False
    assert p.input_value("#prompt") == "a blue kite" and (p.input_value("#width"), p.input_value("#height")) == (
        "256", "256")  # fmt: skip
    assert "Paint over the area" in p.inner_text("#mask-state")
    p.click("#result-upscale")  # twice the size, redrawn lightly, through base and refiner
    p.wait_for_function("document.querySelector('#width').value === '512'")
    assert (p.input_value("#height"), p.input_value("#strength")) == ("512", "0.35")
    p.click("#submit")
    poll(lambda: web.client.get("/v1/jobs").json()["total"] == 2, "the upscale job")
    upscale = web.client.get("/v1/jobs").json()["items"][0]["request"]
    assert (upscale["width"], upscale["strength"], upscale["init_image"]["width"]) == (512, 0.35, 256)


@pytest.mark.parametrize("width", [1366, 390])
def test_screenshots_idle_running_done_viewer_and_advanced(
    server_factory: ServerFactory, browser: Browser, fake_engine: FakeEngine, width: int
) -> None:
    with page_at(browser, width, 900) as p, server_factory(preview_every=1) as web:
        p.goto(web.url + "/")
        p.wait_for_selector("#app:not([hidden])")
        shot(p, f"20-idle-{width}")
        fill_small_job(p, prompt="a quiet harbour")
        shot(p, f"21-advanced-{width}")
        fake_engine.pause_at(5)
        p.click("#submit")
        assert fake_engine.paused.wait(60)
        p.wait_for_selector(".job .preview:not([hidden])")
        shot(p, f"22-running-{width}")
        fake_engine.resume()
        p.wait_for_selector("#result:not([hidden]) #result-image[src^='blob:']")
        shot(p, f"23-done-{width}")
        p.click("#result-recipe")
        p.wait_for_selector("#viewer[open]")
        shot(p, f"24-viewer-{width}")
        overflow = p.evaluate("document.documentElement.scrollWidth > window.innerWidth")
        assert overflow is False  # nothing wider than the screen, phone included


def test_a_1024_png_dropped_is_refined_end_to_end(real_server_factory: ServerFactory, page: Page,
                                                  tmp_path: Path) -> None:  # fmt: skip
    """SDXL's own size through the page: a 1.5 MB 1024x1024 PNG (over the old 1 MB body cap) is taken, run
    through base and refiner, and the result keeps its size."""
    import io

    import numpy as np
    from PIL import Image

    noise = np.random.default_rng(2).integers(0, 256, (1024, 1024, 3), dtype=np.uint8) // 4 * 4
    path = tmp_path / "photo.png"
    Image.fromarray(noise).save(path)
    assert path.stat().st_size > 1_000_000
    p = page
    with real_server_factory() as web:
        p.goto(web.url + "/")
        p.wait_for_selector("#app:not([hidden])")
        p.fill("#prompt", "a photo, refined")
        p.set_input_files("#init-file", str(path))
        p.wait_for_selector("#init-editor:not([hidden])")
        assert (p.input_value("#width"), p.input_value("#height")) == ("1024", "1024")
        p.click("#advanced summary")
        p.fill("#num_inference_steps", "4")
        p.fill("#refiner_steps", "2")
        p.click("#submit")
        p.wait_for_selector("#result:not([hidden]) #result-image[src^='blob:']", timeout=300_000)
        job = web.client.get("/v1/jobs").json()["items"][0]
        assert job["status"] == "succeeded" and job["result"]["metadata"]["refined"] is True
        assert job["request"]["init_image"]["width"] == 1024
        made = Image.open(io.BytesIO(web.client.get(f"/v1/images/{job['id']}/{job['result']['images'][0]}").content))
        assert made.size == (1024, 1024)


def test_the_advanced_panel_is_grouped_and_shows_sections_when_they_apply(web: RunningServer, page: Page,
                                                                         tmp_path: Path) -> None:  # fmt: skip
    from PIL import Image

    p = page
    p.goto(web.url + "/")
    p.wait_for_selector("#app:not([hidden])")
    p.click("#advanced summary")
    legends = p.eval_on_selector_all("#generated-fields fieldset.group legend", "ls => ls.map(l => l.textContent)")
    assert legends == ["Sampling", "Refiner", "From an image", "Hires fix"]
    assert p.is_visible("#sampler") and p.is_visible("#refiner_sampler")
    assert not p.is_visible("#mask_blur") and not p.is_visible("#hr_upscaler")  # nothing to apply them to yet
    p.check("#enable_hr")
    assert p.is_visible("#hr_upscaler") and p.is_visible("#hr_resize_x")
    labels = [p.inner_text(f"label[for={name}]") for name in ("hr_resize_x", "hr_resize_y")]
    assert labels[0] != labels[1] and labels[0].startswith("Hires width")
    path = tmp_path / "start.png"
    Image.new("RGB", (64, 64), "grey").save(path)
    p.set_input_files("#init-file", str(path))
    p.wait_for_selector("#init-editor:not([hidden])")
    assert p.is_visible("#mask_blur") and p.is_visible("#resize_mode")
    p.click("#clear-init")
    assert not p.is_visible("#mask_blur")


def test_hires_fix_offers_the_upscaler_models_of_the_folder(
    server_factory: ServerFactory, page: Page, fake: tuple[object, FakeEngine], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    from sdxl_refinery.engine.upscaling import Upscalers
    from tests.upscaler_files import write_tiny_esrgan

    write_tiny_esrgan(tmp_path / "upscalers" / "tiny-4x.safetensors")
    monkeypatch.setattr(fake[0].upscaling, "_upscalers", Upscalers(tmp_path / "upscalers", "cpu"))
    with server_factory() as web:
        p = page
        p.goto(web.url + "/")
        p.wait_for_selector("#app:not([hidden])")
        fill_small_job(p, prompt="a tall tower")
        p.check("#enable_hr")
        p.wait_for_selector("#hr_upscaler option[value='tiny-4x']", state="attached")
        assert p.inner_text("#hr_upscaler option[value='tiny-4x']") == "tiny-4x (ESRGAN ×4)"
        p.select_option("#hr_upscaler", "tiny-4x")
        p.click("#submit")
        poll(lambda: web.client.get("/v1/jobs").json()["total"] == 1, "the job")
        request = web.client.get("/v1/jobs").json()["items"][0]["request"]
        assert (request["enable_hr"], request["hr_upscaler"]) == (True, "tiny-4x")


def test_a_controlnet_unit_from_the_page_shows_its_map_before_generating(
    server_factory: ServerFactory, page: Page, fake: tuple[object, FakeEngine], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    import json

    from PIL import Image, ImageDraw

    from sdxl_refinery.controlnets import ControlNetFolder

    folder = tmp_path / "controlnet" / "canny-sdxl"  # an SDXL ControlNet's folder (the fake engine loads nothing)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"_class_name": "ControlNetModel", "cross_attention_dim": 2048,
                                                    "addition_embed_type": "text_time"}))  # fmt: skip
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    monkeypatch.setattr(fake[0], "controlnet_folder", ControlNetFolder(tmp_path / "controlnet"))
    photo = Image.new("RGB", (128, 96), "white")
    ImageDraw.Draw(photo).ellipse((20, 10, 100, 80), fill="black")
    photo.save(tmp_path / "photo.png")
    with server_factory() as web:
        p = page
        p.goto(web.url + "/")
        p.wait_for_selector("#app:not([hidden])")
        fill_small_job(p, prompt="a round window")
        p.wait_for_selector("#control-form:not([hidden])")
        assert p.eval_on_selector_all("#control-preprocessor option", "os => os.map(o => o.value)")[:3] == [
            "none", "canny", "invert"]  # fmt: skip
        p.set_input_files("#control-file", str(tmp_path / "photo.png"))
        p.wait_for_selector("#control-preview:not([hidden]) #control-map[src^='data:image/png']")
        first = p.get_attribute("#control-map", "src")
        assert p.is_hidden("#control-slider-a")  # "none" has no sliders
        p.select_option("#control-preprocessor", "canny")
        p.wait_for_function(f"document.querySelector('#control-map').src !== {first!r}")  # the edges, shown
        assert p.inner_text("label[for='control-threshold-a']") == "low threshold"
        assert p.input_value("#control-threshold-a") == "100" and p.input_value("#control-threshold-b") == "200"
        edges = p.get_attribute("#control-map", "src")
        p.select_option("#control-preprocessor", "blur_gaussian")
        p.wait_for_function(f"document.querySelector('#control-map').src !== {edges!r}")
        assert p.is_hidden("#control-slider-b") and p.input_value("#control-threshold-a") == "9"
        blurred = p.get_attribute("#control-map", "src")
        p.fill("#control-threshold-a", "2")
        p.dispatch_event("#control-threshold-a", "change")
        p.wait_for_function(f"document.querySelector('#control-map').src !== {blurred!r}")  # redrawn with sigma 2
        p.locator("#control-picker").scroll_into_view_if_needed()
        shot(p, "30-controlnet")
        p.fill("#control-weight", "0.6")
        p.select_option("#control-mode", "ControlNet is more important")
        p.click("#submit")
        poll(lambda: web.client.get("/v1/jobs").json()["total"] == 1, "the job")
        unit = web.client.get("/v1/jobs").json()["items"][0]["request"]["controlnets"][0]
        assert (unit["model"], unit["preprocessor"], unit["weight"]) == ("canny-sdxl", "blur_gaussian", 0.6)
        assert unit["control_mode"] == "ControlNet is more important"
        assert (unit["threshold_a"], unit["threshold_b"]) == (2, None)
        assert (unit["image"]["width"], unit["image"]["height"]) == (128, 96)


def test_an_image_prompt_from_the_page(
    server_factory: ServerFactory, page: Page, fake: tuple[object, FakeEngine], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    import torch
    from PIL import Image
    from safetensors.torch import save_file

    from sdxl_refinery.ip_adapters import IpAdapterFolder

    folder = tmp_path / "ip-adapter"  # an SDXL IP-Adapter's file and encoder folder (the fake engine loads neither)
    (folder / "image_encoder").mkdir(parents=True)
    (folder / "image_encoder" / "config.json").write_text("{}")
    save_file({"image_proj.proj.weight": torch.zeros(8, 4), "ip_adapter.1.to_k_ip.weight": torch.zeros(4, 2048)},
              str(folder / "ip-adapter_sdxl.safetensors"))  # fmt: skip
    monkeypatch.setattr(fake[0], "ip_adapter_folder", IpAdapterFolder(folder))
    Image.new("RGB", (80, 60), "teal").save(tmp_path / "reference.png")
    with server_factory() as web:
        p = page
        p.goto(web.url + "/")
        p.wait_for_selector("#app:not([hidden])")
        fill_small_job(p, prompt="a teal room")
        p.wait_for_selector("#image-prompt-form:not([hidden])")
        p.set_input_files("#image-prompt-file", str(tmp_path / "reference.png"))
        p.wait_for_selector("#image-prompt-preview:not([hidden])")
        p.fill("#image-prompt-weight", "0.5")
        p.click("#submit")
        poll(lambda: web.client.get("/v1/jobs").json()["total"] == 1, "the job")
        prompt = web.client.get("/v1/jobs").json()["items"][0]["request"]["image_prompts"][0]
        assert (prompt["model"], prompt["weight"], prompt["image"]["width"]) == ("ip-adapter_sdxl", 0.5, 80)
