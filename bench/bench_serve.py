"""`hamtune serve` latency: POST /predict of a real 600x450 dermatoscopic JPEG, as a client on the same machine sees it.

Starts the real server (`hamtune serve --port 0` in a subprocess, as a user would) on a resnet10t model file at 64 px
(untrained weights: the time does not depend on their values), sends --requests requests one after another with and
without the Grad-CAM heatmap (?heatmap=false), and reports the median and 90th percentile wall time per request,
after --warmup untimed ones. The goal (issue 13) is a median under 0.5 s on 2 cores.
Writes the "## Serving latency" section of BENCHMARKS.md (unless --dry-run).

    .venv/bin/python bench/bench_serve.py [--requests 50] [--image-size 64] [--dry-run]
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, fmt, load_average, md_table, publish, run_header  # noqa: E402

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=64)
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
        finally:
            proc.terminate()
            proc.wait(timeout=30)

    body = run_header(started_load) + "\n" + (
        f"POST /predict of `{jpeg.relative_to(SAMPLE.parent)}` ({len(image) // 1024} kB, 600x450 JPEG) to "
        "`hamtune serve` on 127.0.0.1, requests one after another from one client (httpx), after "
        f"{args.warmup} untimed ones; seconds per request as the client sees it (decode, network, JSON; with "
        "Grad-CAM also the backward pass and the 256 px overlay PNG). Goal: median under 0.5 s on 2 cores.\n\n"
    ) + md_table(["model", "answer", "requests", "median s", "p90 s", "min s"], rows)
    publish(SECTION, body, dry_run=args.dry_run)


if __name__ == "__main__":
    main()
