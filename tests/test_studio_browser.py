"""The studio's page in a real browser: headless Chromium (Debian's, installed by the README's test command)
driven by Playwright. Open the page, make a take, hear it in the player, see it listed and drawn."""

import io
import shutil

import numpy as np
import pytest

from mlx_musicgen.settings import COMMAND_SETTINGS, command_settings
from studio import Studio

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# As root and on a closed network: no sandbox, and none of Chromium's own background connections.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--autoplay-policy=no-user-gesture-required"]


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("no chromium here: the README's test command installs Debian's chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def test_the_page_makes_plays_and_lists_a_take(browser, tiny, tmp_path):
    from PIL import Image

    server = Studio(tiny.folder, tmp_path / "takes", "--chunk", "0.05")
    try:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        errors = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(server.url + "/")
        # the page shows "loading…" there until /api/info answers
        page.wait_for_function("!document.querySelector('#model').textContent.includes('loading')")
        assert "32000 Hz" in page.inner_text("#model")
        assert page.is_hidden("#melody-field")  # this model has no melody conditioning
        # the form's defaults are the library's (GenerationConfig, the commands' duration), sent by /api/info
        shown = {name: page.input_value(f"input[name={name}]") for name in COMMAND_SETTINGS if name != "seed"}
        assert {name: float(value) for name, value in shown.items()} == {
            name: setting.default for name, setting in command_settings().items() if name != "seed"}
        page.fill("#text", "90s rock song with loud guitars")
        page.fill("input[name=duration]", "0.4")
        page.fill("input[name=seed]", "7")
        page.click("#generate")
        page.wait_for_selector("#job-status:has-text('done')", timeout=120_000)
        page.wait_for_selector("li.take", timeout=10_000)
        assert page.inner_text("li.take .take-title") == "90s rock song with loud guitars"
        assert "seed 7" in page.inner_text("li.take .take-meta")
        # the player has the take's audio: its metadata loads and says 0.4 s
        duration = page.eval_on_selector("li.take audio", """audio => new Promise(resolve => {
            if (audio.readyState >= 1) resolve(audio.duration);
            audio.addEventListener('loadedmetadata', () => resolve(audio.duration));
            audio.addEventListener('error', () => resolve(-1));
        })""")
        assert duration == pytest.approx(0.4, abs=0.01)
        assert page.eval_on_selector("#bar", "bar => bar.style.width") == "100%"
        # the live player was fed the whole take from the stream, as it was made
        page.wait_for_function("current.player && current.player.frames >= 0.4 * 32000", timeout=10_000)
        assert page.evaluate("current.player.frames") == 0.4 * 32000
        # the waveform was drawn
        painted = page.eval_on_selector("li.take canvas", """canvas => {
            const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
            let lit = 0; for (let i = 3; i < data.length; i += 4) if (data[i] > 0) lit++; return lit; }""")
        assert painted > 1000
        # "again, new seed" makes a second take with the same text
        page.click("li.take .again")
        page.wait_for_function("document.querySelectorAll('li.take').length == 2", timeout=120_000)
        takes = server.client.get("/api/takes").json()
        assert [t["settings"]["text"] for t in takes] == ["90s rock song with loud guitars"] * 2
        assert takes[0]["settings"]["seed"] != 7
        shot = Image.open(io.BytesIO(page.screenshot(full_page=True))).convert("RGB")
        shot.save(tmp_path / "studio.png")
        pixels = np.asarray(shot, dtype=np.float32)
        assert pixels.std() > 10 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # not blank
        assert errors == []
    finally:
        server.stop()
