"""`karst cluster check`: the shipped cluster files pass; each rule rejects a broken copy."""

from __future__ import annotations

import importlib.metadata
import re
import shutil
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.cluster import check_cluster_file

ROOT = Path(__file__).resolve().parent.parent
RAY, TORCH = (re.escape(importlib.metadata.version(p)) for p in ("ray", "torch"))
PYTHON = re.escape(f"{sys.version_info.major}.{sys.version_info.minor}")
AWS, ONPREM = ROOT / "ray_cluster.yaml", ROOT / "ray_cluster_onprem.yaml"


def run_cli(*args):
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


@pytest.mark.parametrize("path", [AWS, ONPREM], ids=lambda p: p.name)
def test_shipped_cluster_files_pass(path):
    assert check_cluster_file(path) == []
    result = run_cli("cluster", "check", str(path))
    assert result.exit_code == 0, result.output
    assert "rules pass" in result.output


def replace_in_commands(config: dict, old: str, new: str) -> None:
    for key, value in config.items():
        if key.endswith("commands"):
            config[key] = [c.replace(old, new) for c in value]


def set_path(config: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    node = config
    for part in parents:
        node = node[part]
    if value is None:
        del node[leaf]
    else:
        node[leaf] = value


def lock_pinning(tmp_path: Path, package: str, version: str) -> str:
    lock = tmp_path / "lock.txt"
    text = (ROOT / "constraints.txt").read_text()
    lock.write_text(re.sub(rf"(?m)^{package}==.*$", f"{package}=={version}", text))
    return str(lock)


def no_token_for_workers(config: dict) -> None:
    replace_in_commands(config, "echo 'export RAY_AUTH_MODE=token' > ~/.karst_env",
                        "true > ~/.karst_env")
    config["worker_start_ray_commands"] = [c.replace("RAY_AUTH_MODE=token ", "")
                                           for c in config["worker_start_ray_commands"]]


# (file, how to break it, what the message must say)
BROKEN = {
    "schema-type": (AWS, lambda c, t: set_path(c, "available_node_types.gpu_a10g.resources.GPU",
                                               0.5),
                    r"available_node_types\.gpu_a10g\.resources\.GPU: 0\.5 is not of type "
                    r"'integer'"),
    "schema-unknown-key": (AWS, lambda c, t: c.update(karst={"constraints": "x"}),
                           r"\(top level\): Additional properties are not allowed \('karst' was "
                           r"unexpected\)"),
    "ray-head-type": (AWS, lambda c, t: c.update(head_node_type="cpu"),
                      r"Ray refuses it: .*head_node_type. must be one of .available_node_types"),
    "gpus-aws": (AWS, lambda c, t: set_path(c, "available_node_types.gpu_4xa10g.resources",
                                            {"CPU": 48}),
                 r"available_node_types\.gpu_4xa10g\.resources: \{'CPU': 48\} declares no GPU"),
    "gpus-onprem": (ONPREM, lambda c, t: replace_in_commands(
                        c, " --num-gpus=$(nvidia-smi --list-gpus | wc -l)", ""),
                    r"worker_start_ray_commands: no `ray start \.\.\. --num-gpus=N`"),
    "lock-version": (AWS, lambda c, t: set_path(c, "metadata.karst.constraints",
                                                lock_pinning(t, "ray", "2.59.0")),
                     rf"metadata\.karst\.constraints: lock\.txt pins ray==2\.59\.0 but the driver "
                     rf"has ray {RAY}"),
    "lock-missing": (AWS, lambda c, t: set_path(c, "metadata.karst.constraints", "nope.txt"),
                     r"metadata\.karst\.constraints: .*nope\.txt does not exist"),
    "setup-unpinned": (AWS, lambda c, t: replace_in_commands(
                           c, "-c ~/karst-search/constraints.txt -e", "-e"),
                       r"setup_commands: no `pip install -c \.\.\./constraints\.txt` for the "
                       r"gpu_a10g node"),
    "pin-in-command": (AWS, lambda c, t: c["setup_commands"].append("pip install torch==2.13.0"),
                       rf"setup_commands\[2\]: pins torch==2\.13\.0 but the driver has torch "
                       rf"{TORCH}"),
    "image": (AWS, lambda c, t: set_path(c, "docker.image", "rayproject/ray:latest-gpu"),
              rf"docker\.image: 'rayproject/ray:latest-gpu' is not Ray {RAY} on Python {PYTHON}"),
    "tracking-file": (AWS, lambda c, t: replace_in_commands(
                          c, "MLFLOW_TRACKING_URI=http://", "MLFLOW_TRACKING_URI=sqlite:///"),
                      r"head_setup_commands\[1\]: MLFLOW_TRACKING_URI=sqlite:///\$\(hostname is "
                      r"a file on one node"),
    "tracking-unset": (ONPREM, lambda c, t: replace_in_commands(c, "MLFLOW_TRACKING_URI", "X"),
                       r"head_setup_commands: MLFLOW_TRACKING_URI is never set on the head"),
    "storage-local": (AWS, lambda c, t: replace_in_commands(
                          c, "s3://karst-search-CHANGE-ME/ray-results", "~/ray_results"),
                      r"head_setup_commands\[2\]: KARST_STORAGE=~/ray_results is not shared "
                      r"storage; valid: s3:// or gs:// URIs"),
    "storage-not-nfs": (ONPREM, lambda c, t: set_path(c, "metadata.karst.shared_filesystems",
                                                      ["/nfs"]),
                        r"KARST_STORAGE=/mnt/shared/karst/ray-results is not shared storage"),
    "token-off": (AWS, lambda c, t: no_token_for_workers(c),
                  r"worker_start_ray_commands\[1\]: `ray start` on the gpu_a10g node without "
                  r"RAY_AUTH_MODE=token"),
    "token-disabled": (AWS, lambda c, t: replace_in_commands(c, "RAY_AUTH_MODE=token",
                                                             "RAY_AUTH_MODE=disabled"),
                       r"setup_commands\[1\]: RAY_AUTH_MODE=disabled turns token authentication "
                       r"off"),
    "token-not-shipped": (AWS, lambda c, t: c["file_mounts"].pop("~/.ray/auth_token"),
                          r"file_mounts: .* does not copy the token to the nodes"),
    "port-open": (AWS, lambda c, t: set_path(c, "provider.security_group.IpPermissions", [
                      {"IpProtocol": "tcp", "FromPort": 5000, "ToPort": 5000,
                       "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]),
                  r"provider\.security_group\.IpPermissions\[0\]: opens 5000 \(MLflow\) to "
                  r"0\.0\.0\.0/0"),
    "dashboard-default": (AWS, lambda c, t: c.pop("head_start_ray_commands"),
                          r"head_start_ray_commands\[1\]: --dashboard-host=0\.0\.0\.0 serves the "
                          r"Ray dashboard on every interface"),
    "mlflow-world": (ONPREM, lambda c, t: replace_in_commands(
                         c, "--host \"$(hostname -I | cut -d' ' -f1)\"", "--host 0.0.0.0"),
                     r"head_start_ray_commands\[3\]: mlflow server --host 0\.0\.0\.0 listens on "
                     r"every interface"),
    "section-missing": (AWS, lambda c, t: c.pop("metadata"), r"metadata\.karst: missing"),
    "section-unknown": (AWS, lambda c, t: set_path(c, "metadata.karst.storage", "s3://b"),
                        r"metadata\.karst\.storage: Extra inputs are not permitted"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_broken_copy_is_rejected_naming_the_problem(case, tmp_path):
    source, breaking, message = BROKEN[case]
    config = yaml.safe_load(source.read_text())
    shutil.copy(ROOT / "constraints.txt", tmp_path)
    breaking(config, tmp_path)
    broken = tmp_path / source.name
    broken.write_text(yaml.safe_dump(config))

    problems = [str(p) for p in check_cluster_file(broken)]
    assert any(re.search(message, p) for p in problems), problems
    result = run_cli("cluster", "check", str(broken))
    assert result.exit_code == 1
    assert re.search(message, " ".join(result.output.split())), result.output


def test_a_file_that_is_not_yaml_fails_cleanly(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("cluster_name: [unclosed")
    result = run_cli("cluster", "check", str(path))
    assert result.exit_code == 2
    assert "is not valid YAML" in " ".join(result.output.split())
