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


def test_paint_a_mask_and_generate_in_a_real_browser(server, browser, tmp_path):
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
    # the photo becomes the editor's background; paint a stroke on layer "Region 1"
    canvas = wait.until(ec.visibility_of_element_located((By.CSS_SELECTOR, "#editor canvas")))
    zoom = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#editor .zoom-number span").text.rstrip("%"))
    time.sleep(1)
    ActionChains(browser).move_to_element_with_offset(canvas, -40, 0).click_and_hold().move_by_offset(40, 0) \
        .move_by_offset(40, 10).release().perform()  # fmt: skip
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
    assert "1 region(s): can" in status
    # the stroke ran from 40 px left of the canvas centre to 40 px right and 10 down, in screen pixels at
    # the editor's zoom: everything farther than a brush width + the feather band from it is untouched
    scale = 100.0 / float(zoom)
    cx, cy, margin = W / 2, H / 2, 60
    near = np.zeros((H, W), bool)
    near[max(0, int(cy - margin)) : int(cy + 10 * scale + margin), max(0, int(cx - 40 * scale - margin)) : int(cx + 40 * scale + margin)] = True
    assert np.array_equal(y[~near], x[~near])
    changed = np.any(y != x, axis=-1)
    assert changed[near].mean() > 0.05  # the painted region was inpainted
