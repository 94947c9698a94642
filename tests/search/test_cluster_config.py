"""cluster.yaml, checked offline the way `ray up` would check it, plus the promises its comments make.

No cloud account or network is needed: Ray's JSON schema, Ray's own config preparation (defaults merged, setup
commands merged per node type, worker counts filled in) and Ray's own `ray start` option parser all run locally.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_YAML = ROOT / "cluster.yaml"
SPEC = ROOT / "search_spaces" / "resnext101.yaml"
PIN = re.compile(r"\bray(?:\[[\w,\s-]+\])?==([\w.]+)")


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


@pytest.fixture(scope="module")
def prepared(raw) -> dict:
    """The config as `ray up` hands it on: Ray's defaults merged, setup commands merged, worker counts filled."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)
    return config


def pyproject_ray_version() -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (version,) = [m.group(1) for d in deps if (m := PIN.match(d))]
    return version


def setup_commands_per_node_type(config: dict) -> dict[str, list[str]]:
    """What each node type runs during setup, after prepare_config merged setup_commands into the head/worker lists."""
    out = {}
    for name, node_type in config["available_node_types"].items():
        if name == config["head_node_type"]:
            out[name] = config["head_setup_commands"]
        else:
            out[name] = node_type.get("worker_setup_commands", config["worker_setup_commands"])
    return out


def env_assignments(command: str) -> dict[str, str]:
    return dict(re.findall(r"\b(RAY_[A-Z_]+)=([\w.-]+)", command))


def test_matches_the_schema_ray_ships(raw):
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(raw, schema)


def test_survives_rays_own_config_preparation(prepared):
    nodes = prepared["available_node_types"]
    head = prepared["head_node_type"]
    assert prepared["provider"]["type"] == "aws"
    assert nodes[head]["max_workers"] == 0 and nodes[head]["resources"].get("GPU", 0) == 0
    workers = [n for name, n in nodes.items() if name != head]
    assert workers and all(w["resources"].get("GPU", 0) >= 1 for w in workers)
    assert all(w["min_workers"] <= w["max_workers"] <= prepared["max_workers"] for w in workers)


def test_start_commands_parse_with_this_rays_cli(raw):
    """Every `ray start` line uses options that this Ray version's CLI accepts (a typo fails here, not on AWS)."""
    from ray.scripts.scripts import start

    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in raw[key] if "ray start" in c]
        assert len(starts) == 1, key
        words = shlex.split(starts[0].split(";")[-1].replace("$RAY_HEAD_IP", "10.0.0.1"))
        args = words[words.index("start") + 1:]
        context = start.make_context("start", args)
        if key == "head_start_ray_commands":
            assert context.params["head"] and context.params["autoscaling_config"] == "~/ray_bootstrap_config.yaml"
            assert context.params["dashboard_host"] == "127.0.0.1"  # reached through `ray dashboard`'s SSH tunnel
        else:
            assert context.params["address"] == "10.0.0.1:6379"


def test_holds_no_credentials(raw):
    text = CLUSTER_YAML.read_text()
    assert set(raw["auth"]) == {"ssh_user"}
    forbidden_keys = {"ssh_private_key", "ssh_public_key", "KeyName", "aws_access_key_id", "aws_secret_access_key",
                      "aws_session_token", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}

    def keys(node):
        if isinstance(node, dict):
            for k, v in node.items():
                yield k
                yield from keys(v)
        elif isinstance(node, list):
            for v in node:
                yield from keys(v)

    assert not forbidden_keys & set(keys(raw))
    assert not forbidden_keys & set(re.findall(r"[A-Za-z_]+", " ".join(json.dumps(raw).split())))
    assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", text)  # an AWS access key id
    assert "PRIVATE KEY" not in text and not re.search(r"\.pem\b", json.dumps(raw))
    assert not any(str(local).endswith((".pem", "credentials")) for local in raw["file_mounts"].values())


def test_every_node_installs_the_pinned_ray_and_this_project(raw, prepared):
    version = pyproject_ray_version()
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["cluster"]
    assert f"ray[default]=={version}" in extra
    for name, commands in setup_commands_per_node_type(prepared).items():
        pins = [m for c in commands for m in PIN.findall(c)]
        assert pins and set(pins) == {version}, f"{name}: installs ray {pins}, pyproject pins {version}"
        installs = [c for c in commands if re.search(r"pip install\b.*\s-e ~/hamtune(\s|$)", c)]
        assert len(installs) == 1, f"{name}: expected one editable install of the synced project"
    # ~/hamtune on every node is this repository (`ray up` runs from the repository root).
    assert (ROOT / raw["file_mounts"]["~/hamtune"]).resolve() == ROOT


def test_same_auth_mode_and_no_usage_stats_on_every_node(raw):
    starts = [c for key in ("head_start_ray_commands", "worker_start_ray_commands") for c in raw[key]
              if "ray start" in c]
    shell_env = [c for c in raw["setup_commands"] if ".bashrc" in c]
    assert len(starts) == 2 and len(shell_env) == 1
    modes = {env_assignments(c).get("RAY_AUTH_MODE") for c in starts + shell_env}
    assert len(modes) == 1 and None not in modes
    assert all(env_assignments(c).get("RAY_USAGE_STATS_ENABLED") == "0" for c in starts + shell_env)
    if modes == {"token"}:  # every node needs the same token file
        assert raw["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"


def test_images_stay_on_the_head(raw):
    """The data folder is never synced to every node; the search spec reads it from where the docs put it."""
    assert not any("HAM10000" in str(p) or "data" in Path(str(p)).parts for p in raw["file_mounts"])
    source = yaml.safe_load(SPEC.read_text())["data"]["source"]
    assert source.startswith("~/")
    remote = f"/home/{raw['auth']['ssh_user']}/{source[2:]}"
    docs = (ROOT / "docs" / "cluster.md").read_text()
    assert re.search(rf"ray rsync-up cluster\.yaml \S+ {re.escape(remote)}/?\s", docs), remote


def test_resnext101_spec_fits_the_gpu_workers(raw):
    """search_spaces/resnext101.yaml validates, and its trials pack onto the worker type as the comments say."""
    from hamtune.search.spec import load_spec

    spec = load_spec(SPEC)
    assert spec.train["model"] == "resnext101_32x8d" and spec.train["pretrained"] is True
    assert spec.data.image_size == 224 and spec.resources.gpu == 0.5
    head = raw["head_node_type"]
    ((name, worker),) = [(n, t) for n, t in raw["available_node_types"].items() if n != head]
    per_node = min(worker["resources"]["GPU"] / spec.resources.gpu, worker["resources"]["CPU"] / spec.resources.cpu)
    assert per_node == 2
    assert spec.search.max_concurrent == per_node * worker["max_workers"]
    # The head installs the weights the driver reads for `pretrained: true` (trials get them through the object
    # store), and no node's setup downloads them for itself.
    assert f"hamtune weights install {spec.train['model']}" in " ".join(raw["head_setup_commands"])
    assert not any("pretrained=True" in c for c in raw["setup_commands"] + raw["worker_setup_commands"])


def doc_commands(text: str) -> list[list[str]]:
    """Every `ray ...` / `hamtune ...` command in the page's indented code blocks, and the hamtune commands that
    `ray exec` runs on the head, as argument lists."""
    commands = []
    for line in text.replace("\\\n", " ").splitlines():
        match = re.match(r"^ {4}((?:ray|hamtune) \S.*?)(?:\s{2,}#.*)?$", line)
        if match:
            commands.append(shlex.split(match.group(1)))
    for words in list(commands):
        if words[:2] == ["ray", "exec"]:
            inner = [w for w in words[2:] if not w.startswith("-")][-1]
            commands += [shlex.split(part) for part in inner.split("&&") if part.split()[0] == "hamtune"]
    return commands


def test_docs_commands_parse_with_the_real_clis():
    """Each command docs/cluster.md tells people to type is accepted by this Ray's CLI or hamtune's own parser."""
    from ray.scripts.scripts import cli

    from hamtune.cli import build_parser

    commands = doc_commands((ROOT / "docs" / "cluster.md").read_text())
    seen = {" ".join(words[:2]) for words in commands}
    for needed in ("ray up", "ray rsync-up", "ray exec", "ray attach", "ray dashboard", "ray rsync-down", "ray down",
                   "ray start", "ray get-auth-token", "hamtune search", "hamtune best"):
        assert needed in seen, needed
    for words in commands:
        if words[0] == "ray":
            cli.get_command(None, words[1]).make_context(words[1], words[2:])
        else:
            args = build_parser().parse_args(words[1:])
            if args.command == "search" and "--address" in words:
                assert args.storage_path or args.resume is not None, " ".join(words)  # multi-node needs storage
    text = (ROOT / "docs" / "cluster.md").read_text()
    assert "--retrain" in text and "ray start --head --port=6379" in text and "ray start --address=" in text
