"""Promotion: choose, merge, gate, register, load without karst, serve.

The slow tests share one real finished search (local Ray, a real Optuna study, a real MLflow
store; the built-in backbone on the digits task, 3 trials of 1 epoch) and one promotion of
its knee under `champion`, made through the Python API; the CLI tests promote again next to
it, or are refused without changing the registry.
"""

import copy
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pytest
import ray
import torch
from conftest import make_model, randomise_adapters
from mlflow.tracking import MlflowClient
from test_search import SPACE as TINY_SPACE
from typer.testing import CliRunner

import karst
from pipeline.backbones import BUILTIN_ARCH, backbone_data_config
from pipeline.cli import app
from pipeline.config import TrialConfig, flatten
from pipeline.data import load_task
from pipeline.front import COMPLETE, STOPPED, TrialPoint, write_front
from pipeline.policy import parse_policy, select
from pipeline.promote import (
    GateConfig,
    choose,
    config_from_params,
    merge_and_gate,
    run_gate,
    use_factored_forward,
)
from pipeline.registry import register
from pipeline.search import load_front, run_search
from pipeline.space import load_space

SEARCH = "tiny"
SPACE = TINY_SPACE.replace("epochs: 2", "epochs: 1")  # a front is all these tests need


@dataclass(frozen=True)
class Store:
    uri: str
    root: Path
    search_run_id: str
    search_end_time: int  # before any promotion


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("promote")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.chdir(root)
        mlflow.set_tracking_uri(uri)
        (root / "space.yaml").write_text(SPACE)
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}})
        try:
            result = run_search(load_space(root / "space.yaml"), name=SEARCH, trials=3,
                                storage=root / "ray")
        finally:
            ray.shutdown()
        end_time = MlflowClient().get_run(result.parent_run_id).info.end_time
        yield Store(uri, root, result.parent_run_id, end_time)
    mlflow.set_tracking_uri(None)


@pytest.fixture
def search(store, monkeypatch):
    """The module's store, for this test and the processes it starts."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri)
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    monkeypatch.chdir(store.root)
    mlflow.set_tracking_uri(store.uri)
    return store


@pytest.fixture(scope="module")
def champion(store):
    """The front's knee, merged, gated and registered under `champion`."""
    mlflow.set_tracking_uri(store.uri)
    merged = merge_and_gate(choose(SEARCH, policy="knee"))
    return merged, register(merged, model_name=SEARCH)


def registry_state() -> dict:
    client = MlflowClient()
    return {m.name: (dict(m.aliases), sorted(int(v.version) for v in
                                             client.search_model_versions(f"name = '{m.name}'")))
            for m in client.search_registered_models()}


def run_cli(*args):
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def flat(output: str) -> str:
    return " ".join(output.split())


# --------------------------------------------------------------------------- the promotion


@pytest.mark.slow
def test_knee_promotion_registers_the_champion_with_its_figures(search, champion):
    merged, registration = champion
    knee = select(load_front(SEARCH), parse_policy("knee"))
    version = MlflowClient().get_model_version_by_alias(SEARCH, "champion")
    tags = version.tags
    assert str(version.version) == registration.version
    assert version.run_id == search.search_run_id
    assert tags["karst.policy"] == "knee" and tags["karst.trial_number"] == str(knee.trial)
    assert int(tags["karst.params"]) == knee.params
    assert float(tags["karst.val_accuracy"]) == pytest.approx(knee.val_accuracy, abs=1e-6)
    assert float(tags["karst.test_accuracy"]) == pytest.approx(knee.test_accuracy, abs=1e-6)
    # two different computations (factored adapter, merged weights) that agree
    assert 0 < float(tags["karst.gate.max_abs_logit_diff"]) <= 1e-4
    assert float(tags["karst.gate.top1_agreement"]) == 1.0
    assert tags["karst.gate.keys_match"] == "true"
    assert abs(float(tags["karst.merged_test_accuracy"]) - knee.test_accuracy) <= 0.005
    run = MlflowClient().get_run(search.search_run_id)  # logged on it, never reopened
    assert (run.info.status, run.info.end_time) == ("FINISHED", search.search_end_time)
    logged = registration.logged_model_uri.removeprefix("models:/")
    assert logged in [o.model_id for o in run.outputs.model_outputs]


@pytest.mark.slow
def test_the_merged_model_is_a_plain_timm_model(champion):
    model = champion[0].model
    assert not any(type(m).__module__.startswith("karst") for m in model.modules())
    assert type(model).__module__ == "timm.models.vision_transformer"
    assert type(model.get_classifier()) is torch.nn.Linear
    assert not hasattr(model, karst.model.CONFIG_ATTR)


LOAD_WITHOUT_KARST = """
import json, sys
sys.modules["karst"] = sys.modules["pipeline"] = None  # `import karst` raises ImportError
try:
    import karst
    sys.exit("the import blocker does not work")
except ImportError:
    pass
import mlflow, numpy as np, timm, torch
uri, images, out, arch = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
model = mlflow.pytorch.load_model(uri)
images = torch.from_numpy(np.load(images))
with torch.no_grad():
    np.save(f"{out}/registry.npy", model(images).numpy())
    vit = timm.models.vision_transformer.VisionTransformer(**arch).eval()
    vit.load_state_dict(model.state_dict(), strict=True)
    np.save(f"{out}/timm.npy", vit(images).numpy())
print(sorted(m for m, v in sys.modules.items() if v and m.split(".")[0] in ("karst", "pipeline")))
"""


@pytest.mark.slow
def test_champion_loads_without_karst_and_reproduces_the_test_accuracy(search, champion,
                                                                       tmp_path):
    merged, _ = champion
    config = TrialConfig.model_validate(merged.candidate.point.config)
    task = load_task(config.task, seed=config.seed, **backbone_data_config(merged.model))
    images, labels = task.test.images, task.test.labels
    np.save(tmp_path / "images.npy", images.numpy())
    arch = json.dumps({**BUILTIN_ARCH, "num_classes": merged.num_classes})
    done = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_KARST, f"models:/{SEARCH}@champion",
                           str(tmp_path / "images.npy"), str(tmp_path), arch],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"  # nothing of karst got imported
    with torch.no_grad():
        expected = merged.model(images).numpy()
    for name in ("registry.npy", "timm.npy"):  # as MLflow loads it, and as timm's own class
        logits = np.load(tmp_path / name)
        assert np.abs(logits - expected).max() <= 1e-4
        accuracy = (logits.argmax(1) == labels.numpy()).mean()
        assert abs(accuracy - merged.candidate.point.test_accuracy) <= 0.005


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_ready(port: int, server: subprocess.Popen, log: Path, timeout: float = 240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"server exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    pytest.fail(f"server not ready after {timeout} s:\n{log.read_text()[-3000:]}")


def stop(server: subprocess.Popen) -> None:
    """The server and the uvicorn it started share the process group started for it."""
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


@pytest.mark.slow
def test_karst_serve_answers_like_the_merged_model(search, champion, tmp_path):
    merged, _ = champion
    port, log = free_port(), tmp_path / "serve.log"
    command = [sys.executable, "-c", "from pipeline.cli import app; app()", "serve",
               f"models:/{SEARCH}@champion", "--port", str(port)]
    with log.open("w") as sink:
        server = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        wait_until_ready(port, server, log)
        images = merged.probe[:8]
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", headers={"Content-Type": "application/json"},
            data=json.dumps({"inputs": images.tolist()}).encode())
        with urllib.request.urlopen(request, timeout=60) as answer:
            predictions = np.array(json.loads(answer.read())["predictions"])
    finally:
        stop(server)
    with torch.no_grad():
        expected = merged.model(images).numpy()
    assert predictions.shape == expected.shape
    assert np.abs(predictions - expected).max() <= 1e-4
    assert f"running on http://127.0.0.1:{port}" in log.read_text()  # loopback only


@pytest.mark.slow
def test_cli_promotes_a_chosen_trial_under_another_alias_and_keeps_the_champion(search,
                                                                                champion):
    before = registry_state()
    front = {p.trial for p in load_front(SEARCH)}
    runs = MlflowClient().search_runs(["0"], f"tags.mlflow.parentRunId = '{search.search_run_id}'")
    trials = sorted(int(r.data.tags["karst.trial_number"]) for r in runs)
    trial = next((t for t in trials if t not in front), trials[0])  # off the front if one is
    result = run_cli("promote", SEARCH, "--trial", str(trial), "--alias", "best")
    assert result.exit_code == 0, result.output
    aliases, versions = registry_state()[SEARCH]
    old_aliases, old_versions = before[SEARCH]
    assert versions == old_versions + [old_versions[-1] + 1]  # added; nothing replaced
    assert aliases == {**old_aliases, "best": versions[-1]}  # champion did not move
    tags = MlflowClient().get_model_version(SEARCH, str(versions[-1])).tags
    assert tags["karst.policy"] == f"trial:{trial}" and tags["karst.trial_number"] == str(trial)
    assert "max |Δlogit|" in result.output and f"models:/{SEARCH}@best" in flat(result.output)


@pytest.mark.slow
def test_a_failed_gate_prints_the_figures_and_leaves_the_registry_alone(search, champion):
    before = registry_state()
    outputs = len(MlflowClient().get_run(search.search_run_id).outputs.model_outputs)
    result = run_cli("promote", SEARCH, "--tolerance", "0")
    assert result.exit_code == 1, result.output
    assert "gate failed: max |Δlogit|" in flat(result.output) and "> tolerance 0" in result.output
    assert "Nothing was registered." in result.output
    assert registry_state() == before
    assert len(MlflowClient().get_run(search.search_run_id).outputs.model_outputs) == outputs


BAD_PROMOTIONS = [
    (["promote", "nope"], r"no search named 'nope' in .*; known searches: \['tiny'\]"),
    (["promote", SEARCH, "--trial", "99"], r"--trial 99: search 'tiny' has no trial 99; its "
                                           r"complete trials are \[0, 1, 2\]"),
    (["promote", SEARCH, "--policy", "budget:1"], r"every front member is over the budget"),
    (["promote", SEARCH, "--policy", "fastest"], r"--policy 'fastest' is not a policy"),
    (["promote", SEARCH, "--policy", "knee", "--trial", "0"], r"give one of them, not both"),
    (["promote", SEARCH, "--alias", "v2"], r"--alias 'v2': MLflow refuses it \(Version alias "
                                           r"name 'v2' is reserved"),
    (["promote", SEARCH, "--alias", "new champion"], r"--alias 'new champion': MLflow refuses"),
    (["promote", SEARCH, "--model-name", "a/b"], r"--model-name 'a/b': MLflow refuses it"),
    (["serve", "models:/nope@champion"], r"no registered model 'nope'; registered: \['tiny'\]"),
    (["serve", f"models:/{SEARCH}@nope"], r"model 'tiny' has no alias 'nope'; its aliases:"),
    (["serve", "runs:/abc/model"], r"expected models:/NAME@ALIAS or models:/NAME/VERSION"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("args", "message"), BAD_PROMOTIONS)
def test_bad_input_is_refused_and_changes_nothing(search, champion, args, message):
    import re

    before = registry_state()
    result = run_cli(*args)
    assert result.exit_code == 2, result.output
    assert re.search(message, flat(result.output)), result.output
    assert registry_state() == before


# --------------------------------------------------------------------------- without a search


def fake_search(name: str) -> None:
    """A finished search as MLflow would hold it had its trials' adapter uploads failed."""
    config = TrialConfig.model_validate({"task": {"name": "digits"}}).model_dump(mode="json")
    with mlflow.start_run(run_name=name, tags={"karst.kind": "search", "karst.search": name}):
        for trial, state in ((0, COMPLETE), (1, STOPPED)):
            with mlflow.start_run(nested=True, tags={
                    "karst.kind": "trial", "karst.search": name,
                    "karst.trial_number": str(trial), "karst.state": state}):
                mlflow.log_metrics({"val_accuracy": 0.5, "params": 100, "test_accuracy": 0.5})
        with tempfile.TemporaryDirectory() as tmp:
            write_front([TrialPoint(0, 0.5, 100, test_accuracy=0.5, config=config)], Path(tmp))
            mlflow.log_artifacts(tmp)


@pytest.mark.slow
@pytest.mark.parametrize(("args", "message"), [
    (["--policy", "knee"], r"trial run \w+ has no adapter.safetensors artifact"),
    (["--trial", "1"], r"--trial 1: trial 1 of search 'broken' is stopped, so it has no "
                       r"trained adapter; promote a complete trial: \[0\]"),
])
def test_a_trial_without_an_adapter_is_refused(tracking, args, message):
    import re

    fake_search("broken")
    result = run_cli("promote", "broken", *args)
    assert result.exit_code == 2, result.output
    assert re.search(message, flat(result.output)), result.output
    assert MlflowClient().search_registered_models() == []


def test_config_from_params_inverts_flatten():
    config = TrialConfig.model_validate({
        "backbone": {"kwargs": {"img_size": 32, "global_pool": "avg"}},
        "task": {"name": "digits", "train_size": 100},
        "adapter": {"method": "karst", "factor": [4, 8], "rank": 2, "rescale": "none"},
        "optim": {"lr": 1e-05, "grad_clip": None}, "epochs": 3})
    assert config_from_params(flatten(config)) == config


@pytest.mark.parametrize(("key", "text", "message"), [
    ("task.name", "0.5", r"not a valid trial config:\n  task.name"),
    ("task.name", "x" * 5997 + "...", r"param 'task.name' was cut for length"),
    ("backbone.kwargs.tag", "[1, 2 ]", r"cannot be rebuilt from its MLflow params \(they "
                                       r"differ at \['backbone.kwargs.tag'\]\)"),
])
def test_config_from_params_refuses_what_it_cannot_rebuild(key, text, message):
    params = {**flatten(TrialConfig()), key: text}
    with pytest.raises(ValueError, match=message):
        config_from_params(params)


def test_the_gate_passes_a_merge_and_refuses_a_model_left_adapted(images):
    adapted = karst.apply_karst(make_model("vit"), karst.KarstConfig(num_kernels=2, factor=4,
                                                                     rank=2))
    randomise_adapters(adapted)
    vanilla = {k: tuple(v.shape) for k, v in make_model("vit").state_dict().items()}
    merged = karst.merge_karst(copy.deepcopy(adapted)).eval()
    use_factored_forward(adapted)
    passed = run_gate(adapted.eval(), merged, images, vanilla, GateConfig())
    assert passed.failures() == [] and 0 < passed.max_abs_logit_diff <= 1e-4
    refused = run_gate(adapted, copy.deepcopy(adapted), images, vanilla,
                       GateConfig(tolerance=0.0))
    assert [f.split(":")[0] for f in refused.failures()] == [
        "state dict differs from the vanilla architecture"]
    assert any(".delta." in k for k in refused.unexpected_keys)
    assert "blocks.0.attn.qkv.weight" in refused.missing_keys  # now under base_layer
