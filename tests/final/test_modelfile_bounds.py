"""A model file is input: each crafted one (a real tiny model.pt with one field changed, as an attacker or a bit flip
would change it) is refused in one line naming the file and the key, exit code 2, before anything is allocated from
it. The known attack: `image_size` 100000 made `hamtune predict` allocate ~24 GB.

Every crafted file is loaded in a child process with its address space capped (RLIMIT_AS), so a regression fails the
test with an allocation error instead of taking the machine's memory; the child's peak RSS is read with os.wait4.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from model_fixtures import save_tiny_model
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
PEAK_RSS_LIMIT = 2 * 2**30  # torch + timm + the tiny model take ~1.3 GB; an allocation from the file would be GBs
ADDRESS_SPACE_CAP = 10 * 2**30  # a CPU-only torch process maps ~5 GB of address space; the attacks ask for 7-30 GB


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    """A real (briefly trained) resnet10t at 16 px saved as model.pt, as `best --retrain` saves it."""
    return save_tiny_model(tmp_path_factory.mktemp("bounds-model") / "model.pt")


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bounds-image") / "lesion.png"
    Image.new("RGB", (40, 30), (200, 120, 90)).save(path)
    return path


def crafted(model_file: Path, folder: Path, name: str, change) -> Path:
    """model_file's record loaded the safe way, changed by change(record), saved as folder/name.pt."""
    record = torch.load(model_file, map_location="cpu", weights_only=True)
    change(record)
    path = folder / f"{name}.pt"
    torch.save(record, path)
    return path


def declaring_huge_records(model_file: Path, path: Path) -> Path:
    """A copy of model_file whose zip directory declares every record 3.75 GiB unpacked (the bytes stay as they
    are): torch.load allocates a record's declared size before it reads it."""
    data = bytearray(model_file.read_bytes())
    with zipfile.ZipFile(model_file) as archive:
        infos = archive.infolist()
        offset = archive.start_dir
    for info in infos:
        assert data[offset:offset + 4] == b"PK\x01\x02"
        struct.pack_into("<I", data, offset + 24, 0xF000_0000)  # central directory: uncompressed size
        struct.pack_into("<I", data, info.header_offset + 22, 0xF000_0000)  # local header: the same
        names, extra, comment = struct.unpack_from("<HHH", data, offset + 28)
        offset += 46 + names + extra + comment
    path.write_bytes(bytes(data))
    return path


PEAK_RSS_PROBE = """
import os, resource, subprocess, sys
cap = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))  # inherited by the child
proc = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(proc.pid, 0)
print(os.waitstatus_to_exitcode(status), usage.ru_maxrss * 1024, file=sys.stderr)
"""


def run_measured(args: list[str]) -> tuple[int, str, str, int]:
    """(exit code, stdout, stderr, peak RSS in bytes) of `python ARGS` in a child with its address space capped and
    no GPU (CUDA maps far more address space than the cap); the peak RSS is that one process's, from os.wait4 in a
    small parent that runs nothing else (RUSAGE_CHILDREN of this test process would include earlier children)."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run([sys.executable, "-c", PEAK_RSS_PROBE, str(ADDRESS_SPACE_CAP), sys.executable, *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
    *lines, last = done.stderr.rstrip("\n").split("\n")
    code, peak = (int(v) for v in last.split())
    return code, done.stdout, "\n".join(lines), peak


def assert_one_line_refusal(code: int, err: str, path: Path, *words: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("hamtune: error: ") and str(path) in lines[0], err
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0], (word, lines[0])


def test_a_huge_image_size_is_refused_before_predict_allocates_anything(model_file, image, tmp_path):
    """The known attack, through the real CLI: image_size 100000 would decode into a 30 GB array."""
    bad = crafted(model_file, tmp_path, "image-size", lambda r: r.update(image_size=100_000))
    code, _, err, peak = run_measured(["-m", "hamtune.cli", "predict", "--model", str(bad), str(image)])
    assert_one_line_refusal(code, err, bad, "image_size 100000", "from 8 to 1024")
    assert peak < PEAK_RSS_LIMIT, f"peak RSS {peak / 2**30:.2f} GiB"


def test_a_head_too_wide_for_its_weights_is_refused_before_evaluate_builds_it(model_file, tmp_path):
    """head_hidden 10**7 in the config would build a 20 GB head before load_state_dict noticed the mismatch."""
    bad = crafted(model_file, tmp_path, "head", lambda r: r["members"][0]["config"].update(head_hidden=10_000_000))
    code, _, err, peak = run_measured(["-m", "hamtune.cli", "evaluate", "--model", str(bad), "--images", str(tmp_path),
                                    "--labels", str(tmp_path / "labels.csv")])
    assert_one_line_refusal(code, err, bad, "do not fit", "head.1.weight (32, 512) vs (10000000, 512)")
    assert peak < PEAK_RSS_LIMIT, f"peak RSS {peak / 2**30:.2f} GiB"


def _nested(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


CASES = {  # name: (change to the record, words the one line must hold)
    "image size text": (lambda r: r.update(image_size="224"), ["image_size '224' is invalid"]),
    "image size bool": (lambda r: r.update(image_size=True), ["image_size True is invalid"]),
    "image size too small": (lambda r: r.update(image_size=2), ["image_size 2 is invalid"]),
    "40 members sharing one set of weights": (lambda r: r.update(members=r["members"] * 40),
                                              ["members: 40 networks; at most 32"]),
    "7000 classes": (lambda r: r.update(classes=list(r["classes"]) * 1000), ["classes: 7000 classes"]),
    "classes not a list": (lambda r: r.update(classes=7), ["class order 7"]),
    "a giant backbone's name": (lambda r: r["members"][0]["config"].update(model="vit_gigantic_patch14_clip_224"),
                                ["do not fit", "missing"]),
    "a tensor outside the weights": (lambda r: r.update(calibration=torch.zeros(3)), ["calibration is a Tensor"]),
    "a tensor viewing more than it stores": (
        lambda r: r["members"][0]["state_dict"].update({"head.1.weight": torch.zeros(1).expand(10**6, 10**6)}),
        ["state_dict['head.1.weight'] has shape (1000000, 1000000)", "over 4 stored bytes"]),
    "weights that are not tensors": (lambda r: r["members"][0].update(state_dict=[1, 2]), ["member 0 state_dict"]),
    "config not a mapping": (lambda r: r["members"][0].update(config="resnet10t"), ["member 0 config"]),
    "temperature bool": (lambda r: r.update(temperature=True), ["temperature True"]),
    "class bias text": (lambda r: r.update(class_bias=["0"] * 7), ["class_bias"]),
    "format version a list": (lambda r: r.update(format_version=[2]), ["format version [2]"]),
    "nesting 100 levels deep": (lambda r: r.update(created=_nested(100)), ["created", "levels"]),
}


def test_every_crafted_model_file_is_one_line_and_exit_2(model_file, image, tmp_path):
    """Each crafted file through main() (predict, and serve for one) in one capped child process, one fresh stderr
    per call: one line naming the file and the key, exit 2, and the child's peak RSS stays under the limit."""
    files = {name: crafted(model_file, tmp_path, f"case{i}", change) for i, (name, (change, _)) in
             enumerate(CASES.items())}
    files["archive declaring 3.75 GiB per record"] = declaring_huge_records(model_file, tmp_path / "zip.pt")
    words = {name: w for name, (_, w) in CASES.items()} | {"archive declaring 3.75 GiB per record": ["declares"]}
    calls = [[name, ["predict", "--model", str(path), str(image)]] for name, path in files.items()]
    calls.append(["serve: image size", ["serve", "--model", str(files["image size too small"]), "--port", "0"]])
    words["serve: image size"] = ["image_size 2 is invalid"]
    files["serve: image size"] = files["image size too small"]
    script = (
        "import contextlib, io, json, sys\n"
        "from hamtune.cli import main\n"
        "results = {}\n"
        f"for name, argv in {calls!r}:\n"
        "    err = io.StringIO()\n"
        "    with contextlib.redirect_stderr(err):\n"
        "        code = main(argv)\n"
        "    results[name] = [code, err.getvalue()]\n"
        "print(json.dumps(results))\n"
    )
    code, out, err, peak = run_measured(["-c", script])
    assert code == 0, err
    results = json.loads(out.strip().splitlines()[-1])
    assert set(results) == set(words)
    for name, (call_code, call_err) in results.items():
        assert_one_line_refusal(call_code, call_err, files[name], *words[name])
    assert peak < PEAK_RSS_LIMIT, f"peak RSS {peak / 2**30:.2f} GiB"


def test_the_untouched_file_still_loads_and_predicts(model_file, image, capsys):
    """The checks refuse only what is wrong: the real file passes them (in this process: nothing is crafted)."""
    from hamtune.cli import main

    assert main(["predict", "--model", str(model_file), str(image)]) == 0
    out = capsys.readouterr().out
    assert "lesion" in out and "predicted_dx" in out
