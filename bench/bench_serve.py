"""`hamtune serve` latency: POST /predict of a real 600x450 dermatoscopic JPEG, as a client on the same machine sees it.

Starts the real server (`hamtune serve --port 0` in a subprocess, as a user would) on a resnet10t model file at 64 px
(untrained weights: the time does not depend on their values), sends --requests requests one after another with and
without the Grad-CAM heatmap (?heatmap=false), and reports the median and 90th percentile wall time per request,
after --warmup untimed ones. The goal (issue 13) is a median under 0.5 s on 2 cores.

Then under load (issue 20): --clients clients at once (default 4, each with its own connection) send
--load-requests requests in all (default 200, with Grad-CAM, as the page asks) to the same server with its default
limits (hamtune.serve.app: 2 answer slots, a 5 s wait for one, then 503), after 3 untimed requests per client at
the same concurrency. Reported: answers by status (any non-200 or transport error counts as an error), p50/p99
latency of the answered ones, throughput, and the server process's RSS (from /proc) before the load, after half of
it, after all of it, and its peak: flat memory means no per-request growth. Writes the "## Serving latency" section
of BENCHMARKS.md (unless --dry-run).

    .venv/bin/python bench/bench_serve.py [--requests 50] [--image-size 64] [--clients 4] [--load-requests 200]
                                          [--dry-run]
"""

from __future__ import annotations

import argparse
import collections
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, fmt, load_average, md_table, publish, run_header

SAMPLE = ROOT.parent / "shared/data/ham10000-sample"
SECTION = "## Serving latency"


def model_file(folder: Path, image_size: int) -> Path:
    from hamtune.final.modelfile import save_model
    from hamtune.training.config import TrainConfig
    from hamtune.training.model import build_model

    config = TrainConfig(model="resnet10t", pretrained=False, device="cpu")
    return save_model(folder / "model.pt", build_model(config), config=config.to_dict(), image_size=image_size,
                      fingerprint=None)


def a_600x450_jpeg() -> Path:
    for path in sorted(SAMPLE.rglob("*.jpg")):
        with Image.open(path) as image:
            if image.size == (600, 450):
                return path
    raise SystemExit(f"bench_serve: no 600x450 JPEG under {SAMPLE}")


def start_server(model: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "hamtune.cli", "serve", "--model", str(model), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:  # the server prints its URL once it listens
        found = re.search(r"serving on (http://\S+/)", line)
        if found:
            url = found.group(1)
            for _ in range(300):
                try:
                    httpx.get(url + "health", timeout=5)
                    return proc, url
                except httpx.TransportError:
                    time.sleep(0.1)
    proc.kill()
    raise SystemExit("bench_serve: hamtune serve did not start")


def latencies(client: httpx.Client, url: str, image: bytes, *, heatmap: bool, n: int, warmup: int) -> list[float]:
    times = []
    for i in range(warmup + n):
        start = time.perf_counter()
        response = client.post(url + "predict", files={"file": ("lesion.jpg", image, "image/jpeg")},
                               params={"heatmap": str(heatmap).lower()})
        elapsed = time.perf_counter() - start
        response.raise_for_status()
        if i >= warmup:
            times.append(elapsed)
    return times


def rss_mib(pid: int) -> dict[str, float]:
    """The server's resident memory now (VmRSS) and at its peak so far (VmHWM), MiB, from /proc."""
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            found[key] = int(value.split()[0]) / 1024
    return found


def under_load(url: str, image: bytes, pid: int, *, clients: int, requests: int) -> dict:
    """`requests` POSTs (with Grad-CAM) from `clients` threads at once, each with its own connection; latencies of
    the 200s, outcomes by status, and the server's RSS before, at half-way and after."""
    lock = threading.Lock()
    sent = 0
    outcomes: collections.Counter = collections.Counter()
    times: list[float] = []
    rss = {"before": rss_mib(pid)["VmRSS"]}

    def client() -> None:
        nonlocal sent
        with httpx.Client(timeout=120) as session:
            while True:
                with lock:
                    if sent >= requests:
                        return
                    sent += 1
                    if sent == requests // 2 + 1:
                        rss["half"] = rss_mib(pid)["VmRSS"]
                start = time.perf_counter()
                try:
                    response = session.post(url + "predict", files={"file": ("lesion.jpg", image, "image/jpeg")})
                    outcome = str(response.status_code)
                except httpx.HTTPError as exc:
                    outcome = type(exc).__name__
                elapsed = time.perf_counter() - start
                with lock:
                    outcomes[outcome] += 1
                    if outcome == "200":
                        times.append(elapsed)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    end = rss_mib(pid)
    rss.update(after=end["VmRSS"], peak=end["VmHWM"])
    rss.setdefault("half", rss["before"])
    return {"times": times, "outcomes": outcomes, "rss": rss, "wall": wall}


def percentile(times: list[float], q: int) -> float:
    """The q-th percentile (1..99) of at least two times; NaN for fewer."""
    return statistics.quantiles(times, n=100, method="inclusive")[q - 1] if len(times) >= 2 else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients under load (default 4)")
    parser.add_argument("--load-requests", type=int, default=200, help="requests under load, in all (default 200)")
    parser.add_argument("--dry-run", action="store_true", help="print the section instead of writing BENCHMARKS.md")
    args = parser.parse_args()

    started_load = load_average()
    jpeg = a_600x450_jpeg()
    image = jpeg.read_bytes()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        proc, url = start_server(model_file(Path(tmp), args.image_size))
        try:
            with httpx.Client(timeout=60) as client:
                for heatmap in (True, False):
                    t = latencies(client, url, image, heatmap=heatmap, n=args.requests, warmup=args.warmup)
                    p90 = statistics.quantiles(t, n=10)[-1]
                    rows.append([f"resnet10t, {args.image_size} px", "with Grad-CAM" if heatmap else "?heatmap=false",
                                 len(t), fmt(statistics.median(t), 3), fmt(p90, 3), fmt(min(t), 3)])
            # warm-up at the same concurrency: every answer thread has run the network once before RSS is taken
            under_load(url, image, proc.pid, clients=args.clients, requests=3 * args.clients)
            load = under_load(url, image, proc.pid, clients=args.clients, requests=args.load_requests)
        finally:
            proc.terminate()
            proc.wait(timeout=30)

    body = run_header(started_load) + "\n" + (
        f"POST /predict of `{jpeg.relative_to(SAMPLE.parent)}` ({len(image) // 1024} kB, 600x450 JPEG) to "
        "`hamtune serve` on 127.0.0.1, requests one after another from one client (httpx), after "
        f"{args.warmup} untimed ones; seconds per request as the client sees it (decode, network, JSON; with "
        "Grad-CAM also the backward pass and the 256 px overlay PNG). Goal: median under 0.5 s on 2 cores.\n\n"
    ) + md_table(["model", "answer", "requests", "median s", "p90 s", "min s"], rows)
    times, outcomes, rss = load["times"], load["outcomes"], load["rss"]
    errors = sum(n for status, n in outcomes.items() if status != "200")
    by_status = ", ".join(f"{n} x {status}" for status, n in sorted(outcomes.items()))
    body += "\n" + (
        f"Under load: {args.clients} clients at once, each on its own connection, {args.load_requests} requests of "
        "the same JPEG in all (with Grad-CAM), against the server's default limits (2 answer slots, a 5 s wait for "
        f"one, then 503 with Retry-After), after {3 * args.clients} untimed ones at the same concurrency. Latency "
        "of the answered requests; the server process's RSS (MiB, /proc VmRSS) before the load, half-way through it "
        "and at its end, and its peak (VmHWM).\n\n"
    ) + md_table(
        ["clients", "requests", "errors", "answers", "p50 s", "p99 s", "requests/s", "RSS before", "RSS half-way",
         "RSS after", "growth", "peak RSS"],
        [[args.clients, args.load_requests, errors, by_status, fmt(percentile(times, 50), 3),
          fmt(percentile(times, 99), 3), fmt(len(times) / load["wall"], 1), fmt(rss["before"], 0),
          fmt(rss["half"], 0), fmt(rss["after"], 0), f"{rss['after'] - rss['before']:+.0f}", fmt(rss["peak"], 0)]])
    publish(SECTION, body, dry_run=args.dry_run)


if __name__ == "__main__":
    main()
