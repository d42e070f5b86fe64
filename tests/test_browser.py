"""The app in a real browser (selenium + Debian's chromium/chromedriver, nothing downloaded): open
the page, upload a photo, paint a mask on the canvas, type a prompt, Generate, check the PNG's size
and its untouched background, save a screenshot. ``make test-browser`` runs it (installing chromium
when missing); the fast suite skips it with the reason."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO_ROOT
from lora_runs import make_train_run

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
W, H = 400, 300

pytestmark = [
    pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="no chromium/chromedriver installed (make test-browser installs them)"),
    pytest.mark.skipif(os.environ.get("DREAMMIX_BROWSER_TEST") != "1", reason="real-browser test: run it with `make test-browser`"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tiny_model_dir, tmp_path):
    """``python src/app.py`` (the real entry point) on a free loopback port, stopped afterwards."""
    make_train_run(tiny_model_dir, tmp_path / "train" / "can" / "r1", "can", "can", {"color": ["blue", "silver"]}, seed=1)
    make_train_run(tiny_model_dir, tmp_path / "train" / "dog" / "r1", "dog", "dog", {"color": ["brown"]}, seed=0)
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "src"), "DREAMMIX_CACHE": str(tiny_model_dir.parent),
           "GRADIO_ANALYTICS_ENABLED": "False"}  # fmt: skip
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "src" / "app.py"), "model=tiny", f"loras=[{tmp_path / 'train'}]",
         f"port={port}", f"run_dir={tmp_path / 'run'}", "dif.feather_radius=2", "device=cpu"],
        cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 300
        while True:
            if proc.poll() is not None:
                pytest.fail(f"app exited with {proc.returncode}: {(tmp_path / 'server.log').read_text()[-2000:]}")
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                if time.time() > deadline:
                    pytest.fail("app did not start within 300 s")
                time.sleep(1)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the group we started: the server and nothing else
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1400,1800"):
        options.add_argument(arg)
    options.binary_location = CHROMIUM
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _settled_zoom(browser, timeout: float = 60.0) -> str:
    """The editor's zoom percentage once it has stayed the same for a second."""
    from selenium.webdriver.common.by import By

    last, since, deadline = None, time.time(), time.time() + timeout
    while time.time() < deadline:
        spans = browser.find_elements(By.CSS_SELECTOR, "#editor .zoom-number span")
        text = spans[0].text.rstrip("%") if spans else None
        if text != last:
            last, since = text, time.time()
        elif text and time.time() - since >= 1.0:
            return text
        time.sleep(0.1)
    pytest.fail(f"the editor's zoom did not settle (last {last!r})")


#: Two strokes, in screen pixels from the editor canvas's centre: (start, end) of each.
STROKES = (((-100, -40), (-60, -40)), ((60, 50), (100, 50)))


def test_paint_masks_and_generate_in_a_real_browser(server, browser, tmp_path):
    """One stroke on layer Region 1 (subject can), one on layer Region 2 (subject dog, second
    region switched on), a typed prompt, Generate: a PNG of the photo's size whose pixels away from
    both strokes are the photo's."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    photo = tmp_path / "photo.png"
    x = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)
    Image.fromarray(x).save(photo)
    wait = WebDriverWait(browser, 180)
    browser.get(server)
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#photo input[type=file]"))).send_keys(str(photo))
    # the photo becomes the editor's background; paint region 1, switch layer, paint region 2
    canvas = wait.until(ec.visibility_of_element_located((By.CSS_SELECTOR, "#editor canvas")))
    zoom = _settled_zoom(browser)  # the editor fits the photo a moment after it appears
    for layer, ((x0, y0), (x1, y1)) in enumerate(STROKES):
        if layer == 1:
            browser.find_element(By.CSS_SELECTOR, "#editor button[aria-label='Show Layers']").click()
            wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, "#editor button[aria-label='layer-2']"))).click()
        ActionChains(browser).move_to_element_with_offset(canvas, x0, y0).click_and_hold() \
            .move_by_offset(x1 - x0, y1 - y0).release().perform()  # fmt: skip
    browser.find_element(By.CSS_SELECTOR, "#second .label-wrap").click()
    wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, "#use2 label"))).click()
    steps = browser.find_element(By.CSS_SELECTOR, "#steps input[type=number]")
    steps.clear()
    steps.send_keys("2")
    prompt = browser.find_element(By.CSS_SELECTOR, "#prompt1 textarea")
    prompt.clear()
    prompt.send_keys("a photo of sks can on a table")
    browser.find_element(By.ID, "generate").click()
    link = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#files a[href$='.png']")))
    status = browser.find_element(By.ID, "status").text
    shots = Path(os.environ.get("DREAMMIX_SCREENSHOT_DIR") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(shots / "app.png"))

    with urllib.request.urlopen(link.get_attribute("href"), timeout=30) as response:
        (tmp_path / "result.png").write_bytes(response.read())
    y = np.asarray(Image.open(tmp_path / "result.png").convert("RGB"))
    assert y.shape == x.shape, status
    assert _settled_zoom(browser) == zoom  # the strokes were drawn at the zoom used below
    assert "2 region(s): can, dog" in status
    # strokes are in screen pixels at the editor's zoom, centred on the photo: everything farther
    # than a brush width + the feather band from them is untouched
    scale, margin = 100.0 / float(zoom), 45
    changed = np.any(y != x, axis=-1)
    near = np.zeros((H, W), bool)
    for (x0, y0), (x1, y1) in STROKES:
        box = np.zeros((H, W), bool)
        top, left = int(H / 2 + min(y0, y1) * scale - margin), int(W / 2 + min(x0, x1) * scale - margin)
        box[max(0, top) : int(H / 2 + max(y0, y1) * scale + margin), max(0, left) : int(W / 2 + max(x0, x1) * scale + margin)] = True
        assert changed[box].mean() > 0.05  # each painted region was inpainted
        near |= box
    assert np.array_equal(y[~near], x[~near])
