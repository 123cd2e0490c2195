"""Tiny timm models and helpers shared by the tests (CPU, offline)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from karst import AdaptedLinear  # noqa: E402

VIT_KW = dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2)
SWIN_KW = dict(img_size=32, patch_size=2, window_size=4, embed_dim=32, depths=(2, 2),
               num_heads=(2, 4))
MODELS = {
    "vit": ("vit_tiny_patch16_224", VIT_KW),
    "swin": ("swin_tiny_patch4_window7_224", SWIN_KW),
}


def make_model(kind: str, num_classes: int = 10, seed: int = 0) -> nn.Module:
    name, kwargs = MODELS[kind]
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs).eval()


def randomise_adapters(model: nn.Module, seed: int = 1, std: float = 0.1) -> None:
    """Make every adapter tensor non-zero so that equivalence tests can fail."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, AdaptedLinear):
                for p in list(module.delta.parameters()) + list(module.rescale.parameters()):
                    p.copy_(torch.randn(p.shape, generator=gen) * std)


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(42))


@pytest.fixture
def tracking(tmp_path, monkeypatch):
    """A fresh MLflow SQLite store for one test, for this process and the ones it starts."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None)


@pytest.fixture
def postgres():
    """A throwaway PostgreSQL server on 127.0.0.1 (tests/servers.py). Fails, never skips, when
    PostgreSQL is missing: the message says how to install it."""
    from servers import Postgres

    with Postgres() as server:
        yield server


@pytest.fixture
def mlflow_servers(tmp_path):
    """Start `mlflow server`s on 127.0.0.1 (tests/servers.py): `start(backend_uri)`, default a
    fresh SQLite store; each keeps its port and stores across `.restart()`; all stopped after."""
    from servers import MlflowServer

    started = []

    def start(backend_uri: str | None = None):
        n = len(started)
        server = MlflowServer(backend_uri or f"sqlite:///{tmp_path / f'server{n}.db'}",
                              tmp_path / f"artifacts{n}")
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def mlflow_server(mlflow_servers):
    """One `mlflow server` over a fresh SQLite store: `.url`, `.restart()`."""
    return mlflow_servers()


@pytest.fixture
def local_ray():
    """A local Ray for one test (2 CPUs), shut down after it."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}})
    yield
    ray.shutdown()


def small_search_space(epochs: int, train_size: int = 320):
    """A real two-trial-at-a-time space whose trials last a second or more per epoch: long
    enough for a fault to land mid-trial (node loss, tracking restart)."""
    from pipeline.space import SearchSpace

    return SearchSpace.model_validate({
        "trial": {"backbone": {"name": "karst_vit_fmnist"},
                  "task": {"name": "digits", "train_size": train_size, "val_size": 64},
                  "adapter": {"method": "karst", "factor": 8}, "epochs": epochs,
                  "batch_size": 32},
        "search": {"adapter.num_kernels": {"type": "categorical", "choices": [1, 2]},
                   "optim.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}},
        "max_concurrent": 2,
        "resources": {"cpu": 1},
        "early_stopping": {"mode": "none"},
    })
