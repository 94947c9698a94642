"""`hamtune serve`: the real server (the CLI in a subprocess on 127.0.0.1), its JSON API over HTTP, bad uploads, and
the page in a real headless Chromium driven by Selenium."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hamtune.cli import main
from model_fixtures import save_tiny_model
from hamtune.vocab import CLASSES, DIAGNOSES

httpx = pytest.importorskip("httpx")
STARTUP_LIMIT_S = 180  # importing torch and timm on a busy 2-core machine takes a while
PROBS = [f"prob_{c}" for c in CLASSES]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    """A real (briefly trained) resnet10t at 16 px saved as model.pt, as `best --retrain` saves it."""
    return save_tiny_model(tmp_path_factory.mktemp("serve-model") / "model.pt")


class Server(str):
    """The base URL of a running `hamtune serve`, with everything it has printed so far in .output."""

    output: list[str]


@pytest.fixture(scope="module")
def server(model_file):
    """`hamtune serve --model M --port 0` in a subprocess; yields its base URL; stopped at teardown."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "hamtune.cli", "serve", "--model", str(model_file), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    output: list[str] = []
    threading.Thread(target=lambda: [output.append(line) for line in proc.stdout], daemon=True).start()
    url = None
    try:
        deadline = time.monotonic() + STARTUP_LIMIT_S
        while url is None and time.monotonic() < deadline and proc.poll() is None:
            found = [re.search(r"serving on (http://127\.0\.0\.1:\d+/)", line) for line in list(output)]
            url = next((f.group(1) for f in found if f), None)
            time.sleep(0.2)
        assert url, f"hamtune serve did not start within {STARTUP_LIMIT_S} s:\n{''.join(output)}"
        for _ in range(100):  # the socket listens before uvicorn accepts: wait until it answers
            try:
                if httpx.get(url + "health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        else:
            pytest.fail(f"{url}health never answered:\n{''.join(output)}")
        running = Server(url)
        running.output = output
        yield running
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def lesion_jpeg(sample_dir) -> Path:
    """A real 600x450 dermatoscopic JPEG from the sample."""
    for path in sorted(sample_dir.rglob("*.jpg")):
        with Image.open(path) as image:
            if image.size == (600, 450):
                return path
    pytest.skip("no 600x450 JPEG in the sample")


def post(url: str, name: str, data: bytes, **params) -> httpx.Response:
    return httpx.post(url + "predict", files={"file": (name, data, "application/octet-stream")}, params=params,
                      timeout=60)


def one_line_reason(response: httpx.Response) -> str:
    detail = response.json()["detail"]
    assert isinstance(detail, str) and detail and "\n" not in detail, detail
    return detail


def test_json_api_gives_the_probabilities_hamtune_predict_gives(server, model_file, lesion_jpeg, tmp_path, capsys):
    response = post(server, lesion_jpeg.name, lesion_jpeg.read_bytes())
    assert response.status_code == 200, response.text
    answer = response.json()
    rows = answer["probabilities"]
    assert [r["code"] for r in rows] == list(CLASSES) and [r["name"] for r in rows] == [DIAGNOSES[c] for c in CLASSES]
    probs = np.array([r["probability"] for r in rows])
    assert probs.shape == (7,) and (probs >= 0).all() and probs.sum() == pytest.approx(1.0, abs=1e-9)
    assert answer["top"] == rows[int(probs.argmax())]

    code = main(["predict", "--model", str(model_file), str(lesion_jpeg), "--out", str(tmp_path / "p.json")])
    capsys.readouterr()
    assert code == 0
    [cli] = json.loads((tmp_path / "p.json").read_text())
    np.testing.assert_allclose(probs, [cli[p] for p in PROBS], rtol=0, atol=1e-6)
    assert cli["predicted_dx"] == answer["top"]["code"]

    heat = answer["heatmap"]
    assert heat["code"] == answer["top"]["code"] and heat["layer"].startswith("backbone.")
    with Image.open(io.BytesIO(base64.b64decode(heat["png_base64"]))) as overlay:
        assert overlay.format == "PNG" and overlay.size == (heat["size"], heat["size"]) and overlay.mode == "RGB"

    bare = post(server, lesion_jpeg.name, lesion_jpeg.read_bytes(), heatmap="false").json()
    assert bare["heatmap"] is None and bare["probabilities"] == rows

    info = httpx.get(server + "info", timeout=10).json()
    assert info["image_size"] == 16 and info["model"] == "resnet10t" and len(info["classes"]) == 7


def test_bad_uploads_get_a_4xx_with_one_line_and_the_server_keeps_serving(server, lesion_jpeg, tmp_path):
    jpeg = lesion_jpeg.read_bytes()
    gif = io.BytesIO()
    Image.new("RGB", (40, 30), (120, 80, 60)).save(gif, format="GIF")
    cases = {
        "text": (post(server, "notes.txt", b"this is not an image\n" * 50), 415, "not an image"),
        "empty": (post(server, "empty.jpg", b""), 415, "empty upload"),
        "gif": (post(server, "x.gif", gif.getvalue()), 415, "GIF image; expected JPEG or PNG"),
        "truncated": (post(server, "cut.jpg", jpeg[: len(jpeg) // 2]), 422, "truncated"),
        "oversize": (post(server, "huge.jpg", jpeg + os.urandom(21 * 1024 * 1024)), 413, "over 20 MB"),
        "no file field": (httpx.post(server + "predict", data={"image": "x"}, timeout=30), 400, "field 'file'"),
        "bad query": (post(server, "x.jpg", jpeg, heatmap="maybe"), 422, "heatmap"),
    }
    for name, (response, status, words) in cases.items():
        assert response.status_code == status, (name, response.text)
        assert words in one_line_reason(response), name

    def streamed_multipart():  # a well-formed multipart body sent in chunks: no Content-Length to go by
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="huge.jpg"\r\n\r\n' + jpeg
        yield from (os.urandom(1024 * 1024) for _ in range(24))
        yield b"\r\n--b--\r\n"

    chunked = httpx.post(server + "predict", content=streamed_multipart(), timeout=60,
                         headers={"content-type": "multipart/form-data; boundary=b"})
    assert chunked.status_code == 413 and "over 20 MB" in one_line_reason(chunked)

    good = post(server, lesion_jpeg.name, jpeg)
    assert good.status_code == 200 and len(good.json()["probabilities"]) == 7
    # Bad uploads are answered, not logged: the server printed its two start lines and nothing else.
    assert [line.split(" ")[0] for line in server.output] == ["model", "serving"], "".join(server.output)


def test_serve_refuses_a_bad_model_file_or_a_taken_port_in_one_line(model_file, tmp_path, capsys):
    import socket

    broken = tmp_path / "model.pt"
    broken.write_bytes(model_file.read_bytes()[:1000])
    assert main(["serve", "--model", str(broken), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "not a readable hamtune model file" in err and str(broken) in err

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert main(["serve", "--model", str(model_file), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and f"--port {port}: cannot listen there" in err


def test_predictor_gradcam_is_a_map_in_unit_range(model_file, lesion_jpeg):
    from hamtune.serve.predictor import ImageRejected, Predictor

    predictor = Predictor.from_file(model_file)
    image = predictor.decode(lesion_jpeg.read_bytes())
    assert image.shape == (16, 16, 3) and image.dtype == np.uint8
    maps = [predictor.gradcam(image, k) for k in range(len(CLASSES))]
    for heat in maps:
        assert heat.shape == (16, 16) and heat.dtype == np.float32 and 0.0 <= heat.min() and heat.max() <= 1.0
        assert heat.max() in (0.0, 1.0)  # scaled by its peak, or nothing for that class
    assert any(heat.max() == 1.0 and heat.std() > 0.01 for heat in maps)  # a map, not a constant
    assert predictor.predict_proba(image[None]).shape == (1, 7)
    with pytest.raises(ImageRejected, match="600x450 pixels; at most 0.25 megapixels") as rejected:
        predictor.decode(lesion_jpeg.read_bytes(), max_pixels=1_000_000 // 4)
    assert rejected.value.status == 413


# ---------------------------------------------------------------------------------------------------------------
# The page in a real browser


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Debian Chromium through chromedriver (Selenium), with a fresh profile and no network chatter."""
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver_path):
        if os.environ.get("CI"):
            pytest.fail("chromium and chromedriver are missing; .ci/run installs them (apt-get install chromium "
                        "chromium-driver)")
        pytest.skip("Debian's chromium and chromium-driver are not installed (apt-get install -y chromium "
                    "chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}", "--window-size=1100,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    try:
        yield driver
    finally:
        driver.quit()


def test_page_shows_seven_probabilities_and_the_heatmap(server, browser, lesion_jpeg, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    expected = {r["code"]: r["probability"]
                for r in post(server, lesion_jpeg.name, lesion_jpeg.read_bytes()).json()["probabilities"]}
    browser.get(server)
    notice = browser.find_element(By.ID, "notice").text
    assert "Research tool, not a diagnostic device" in notice and "not a diagnosis" in notice

    browser.find_element(By.ID, "file").send_keys(str(lesion_jpeg))
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#bars li")) == 7 and d.execute_script(
        "const i = document.getElementById('heatmap'); return i.complete && i.naturalWidth > 0;"))

    rows = browser.find_elements(By.CSS_SELECTOR, "#bars li")
    shown = {row.get_attribute("data-code"): float(row.get_attribute("data-probability")) for row in rows}
    assert shown.keys() == expected.keys()
    for code, p in expected.items():
        assert shown[code] == pytest.approx(p, abs=1e-12)
    values = [float(row.find_element(By.CLASS_NAME, "value").text.rstrip("%")) for row in rows]
    assert values == sorted(values, reverse=True)  # most probable first
    for row in rows:
        code = row.get_attribute("data-code")
        assert row.find_element(By.CLASS_NAME, "name").text == f"{DIAGNOSES[code]} ({code})"
        assert row.find_element(By.CLASS_NAME, "value").text == f"{100 * expected[code]:.1f}%"
        width = browser.execute_script("return arguments[0].querySelector('.fill').style.width;", row)
        assert float(width.rstrip("%")) == pytest.approx(100 * expected[code], abs=0.01)
    top = max(expected, key=expected.get)
    assert "top" in rows[0].get_attribute("class") and rows[0].get_attribute("data-code") == top
    assert browser.find_element(By.ID, "heatmap-title").text == f"Grad-CAM for {DIAGNOSES[top]}"
    assert browser.execute_script("return document.getElementById('heatmap').naturalWidth;") == 256

    not_image = tmp_path / "notes.txt"
    not_image.write_text("not an image\n")
    browser.find_element(By.ID, "file").send_keys(str(not_image))
    wait.until(lambda d: d.find_element(By.ID, "error").is_displayed())
    assert browser.find_element(By.ID, "error").text == "Not analysed: not an image; expected a JPEG or PNG file"
    assert not browser.find_element(By.ID, "result").is_displayed()
