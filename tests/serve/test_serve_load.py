"""`hamtune serve` under load and under hostile uploads, against the real app in a real uvicorn process on 127.0.0.1
(hamtune.serve.app.serve, the function `hamtune serve` calls, started with tight limits: 1 answer slot, a 0.3 s wait
for it, 4 requests in at once): a busy server answers 503 with Retry-After and a one-line JSON error, never 500; it
refuses further requests before reading their bodies; images over the pixel limit get 413 from their header and
degenerate ones 422, with no Pillow warning printed; its memory does not grow per request; and it keeps serving.
"""

from __future__ import annotations

import io
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from image_fixtures import png_declaring

httpx = pytest.importorskip("httpx")
STARTUP_LIMIT_S = 180  # importing torch and timm on a busy 2-core machine takes a while
SLOTS, WAIT_S, PENDING = 1, 0.3, 4


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    from model_fixtures import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("load-model") / "model.pt")


class Server(str):
    """The base URL of a running server, its pid and everything it has printed so far."""

    pid: int
    output: list[str]


@pytest.fixture(scope="module")
def server(model_file):
    script = ("import sys; from pathlib import Path; from hamtune.serve.app import serve; "
              f"serve(Path(sys.argv[1]), port=0, max_concurrent={SLOTS}, queue_wait_s={WAIT_S}, "
              f"max_pending={PENDING})")
    proc = subprocess.Popen([sys.executable, "-c", script, str(model_file)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    output: list[str] = []
    threading.Thread(target=lambda: [output.append(line) for line in proc.stdout], daemon=True).start()
    try:
        url, deadline = None, time.monotonic() + STARTUP_LIMIT_S
        while url is None and time.monotonic() < deadline and proc.poll() is None:
            found = [re.search(r"serving on (http://127\.0\.0\.1:\d+/)", line) for line in list(output)]
            url = next((f.group(1) for f in found if f), None)
            time.sleep(0.1)
        assert url, f"the server did not start within {STARTUP_LIMIT_S} s:\n{''.join(output)}"
        for _ in range(100):
            try:
                if httpx.get(url + "health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        running = Server(url)
        running.pid, running.output = proc.pid, output
        yield running
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def lesion_jpeg(sample_dir) -> bytes:
    for path in sorted(sample_dir.rglob("*.jpg")):
        with Image.open(path) as image:
            if image.size == (600, 450):
                return path.read_bytes()
    pytest.skip("no 600x450 JPEG in the sample")


def post(url: str, data: bytes, **params) -> httpx.Response:
    return httpx.post(url + "predict", files={"file": ("upload", data, "application/octet-stream")}, params=params,
                      timeout=120)


def health(url: str) -> dict:
    return httpx.get(url + "health", timeout=30).json()


def one_line(response: httpx.Response) -> str:
    detail = response.json()["detail"]
    assert isinstance(detail, str) and detail and "\n" not in detail, detail
    return detail


def wait_until(condition, what: str, limit_s: float = 60) -> None:
    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_a_busy_server_answers_503_with_retry_after_never_500_and_recovers(server, lesion_jpeg):
    """A slow request (a 36-megapixel PNG, about a second to decode) holds the one slot; six clients at once meanwhile
    get 503 (slot taken past the wait, or too many requests in) with Retry-After; the slow one gets its answer."""
    slow_png = png_declaring(6000, 6000)
    answers: dict[str, list] = {"slow": [], "fast": []}

    def slow():
        answers["slow"].append(post(server, slow_png))

    slow_client = threading.Thread(target=slow)
    slow_client.start()
    wait_until(lambda: health(server)["in_progress"] == 1, "the slow request to take the slot")
    fast_clients = [threading.Thread(target=lambda: answers["fast"].append(post(server, lesion_jpeg)))
                    for _ in range(6)]
    for client in fast_clients:
        client.start()
    for client in [*fast_clients, slow_client]:
        client.join(timeout=120)
    statuses = [r.status_code for r in answers["fast"]]
    assert [r.status_code for r in answers["slow"]] == [200], answers["slow"][0].text
    assert len(statuses) == 6 and set(statuses) <= {200, 503} and statuses.count(503) >= 1, statuses
    busy = [r for r in answers["fast"] if r.status_code == 503]
    assert all(r.headers.get("retry-after") == "1" and one_line(r).startswith("server busy: ") for r in busy)
    assert any("every answer slot (1) taken for 0.3 s" in one_line(r) for r in busy), [one_line(r) for r in busy]

    wait_until(lambda: health(server)["pending"] == 0, "the server to finish every request")
    after = post(server, lesion_jpeg)
    assert after.status_code == 200 and len(after.json()["probabilities"]) == 7


def read_reply(conn: socket.socket) -> str:
    """One whole HTTP response (headers and a Content-Length body) from a raw socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += conn.recv(65536) or b"\r\n\r\n"
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"content-length: (\d+)", head.lower()).group(1))
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            break
        body += chunk
    return (head + b"\r\n\r\n" + body).decode("latin-1")


def test_requests_beyond_the_pending_limit_are_refused_before_their_body_is_read(server, lesion_jpeg):
    """Four uploads that stall after their first bytes fill the door (max_pending 4): a fifth request is answered 503
    at once, though its body is never sent; when the stalled clients leave, the server serves again, silently."""
    host, port = re.match(r"http://([\d.]+):(\d+)/", server).groups()
    stalled = []
    head = (b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            b"Content-Length: 1000000\r\n\r\n--b\r\n")
    try:
        for _ in range(PENDING):
            conn = socket.create_connection((host, int(port)), timeout=30)
            conn.sendall(head)
            stalled.append(conn)
        wait_until(lambda: health(server)["pending"] == PENDING, "the stalled uploads to be admitted")
        with socket.create_connection((host, int(port)), timeout=30) as extra:
            extra.sendall(head)  # headers only: the body would follow, but the answer comes first
            reply = read_reply(extra)
        assert reply.startswith("HTTP/1.1 503") and "retry-after: 1" in reply.lower(), reply
        assert f"server busy: {PENDING} requests already in progress" in reply, reply
    finally:
        for conn in stalled:
            conn.close()
    wait_until(lambda: health(server)["pending"] == 0, "the server to notice the clients left")
    assert post(server, lesion_jpeg).status_code == 200
    assert not [line for line in server.output if "Traceback" in line or "Error" in line], "".join(server.output)


def test_images_over_the_pixel_limit_or_degenerate_are_refused_from_the_header(server, lesion_jpeg):
    """413 for 100 megapixels (where Pillow would warn) and for 10 gigapixels declared in 92 bytes (where Pillow
    would refuse with its own error), 422 for 1x1, each a one-line JSON error; the server prints no warning."""
    cases = [(png_declaring(10_000, 10_000), 413, "10000x10000 pixels; at most 40 megapixels accepted"),
             (png_declaring(100_000, 100_000, rows=1), 413, "10,000 megapixels; at most 40 megapixels accepted"),
             (png_declaring(1, 1), 422, "1x1 pixels; expected at least 8 pixels on each side")]
    for data, status, words in cases:
        response = post(server, data)
        assert response.status_code == status and words in one_line(response), response.text
    assert post(server, lesion_jpeg).status_code == 200
    printed = "".join(server.output)
    assert "DecompressionBomb" not in printed and "Warning" not in printed, printed


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the server's RSS from /proc")
def test_memory_stays_flat_over_many_requests(server, lesion_jpeg):
    """After a warm-up, 60 more answers (with Grad-CAM and the overlay PNG) leave the server's RSS within 40 MB of
    where it was: nothing is kept per request (the pixels alone would be about 1 MB a request)."""
    with httpx.Client(timeout=120) as client:
        def ask():
            response = client.post(server + "predict", files={"file": ("lesion.jpg", lesion_jpeg, "image/jpeg")})
            assert response.status_code == 200, response.text

        for _ in range(20):
            ask()
        before = rss_bytes(server.pid)
        for _ in range(60):
            ask()
        after = rss_bytes(server.pid)
    assert after - before < 40 * 2**20, f"RSS grew {(after - before) / 2**20:.1f} MB over 60 requests"


def test_the_png_helper_makes_real_pngs():
    """The crafted files are real PNGs that Pillow reads as declared (else the refusals above would prove nothing)."""
    with Image.open(io.BytesIO(png_declaring(64, 48))) as image:
        image.load()
        assert image.format == "PNG" and image.size == (64, 48)
