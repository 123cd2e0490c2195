"""Real servers for tests and benchmarks: an `mlflow server` and a throwaway PostgreSQL.

Both bind 127.0.0.1 on a free port and run in their own process group, so stopping one ends
exactly the processes it started. `MlflowServer.restart()` comes back on the same port with
the same stores, as a tracking server restarted mid-search does. `log_concurrently` is the
load: trial-like processes logging per-step metrics, every value counted back.
"""

from __future__ import annotations

import contextlib
import io
import multiprocessing
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

POSTGRES_INSTALL = "apt-get install -y postgresql (Debian/Ubuntu), then rerun"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop_group(process: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM the process group `process` leads (its server workers too), then SIGKILL."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@dataclass
class MlflowServer:
    """`mlflow server` on 127.0.0.1 with the given backend store and a local artifact root."""

    backend_uri: str
    artifacts: Path
    workers: int = 1
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.artifacts.parent / f"mlflow-server-{self.port}.log"

    def start(self, timeout: float = 90) -> MlflowServer:
        """Start and wait until /health answers (DESIGN.md §4: ~5 s with one worker)."""
        command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                   self.backend_uri, "--artifacts-destination", str(self.artifacts),
                   "--host", "127.0.0.1", "--port", str(self.port),
                   "--workers", str(self.workers)]
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                            env=env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited ({self.process.returncode}):\n"
                                   f"{self.log.read_text()[-3000:]}")
            with contextlib.suppress(OSError), \
                    urllib.request.urlopen(f"{self.url}/health", timeout=2) as answer:
                if answer.status == 200:
                    return self
            time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"mlflow server not ready in {timeout} s:\n"
                           f"{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.process is not None:
            _stop_group(self.process)
            self.process = None

    def restart(self) -> MlflowServer:
        """Stop, then start again on the same port with the same stores."""
        self.stop()
        return self.start()

    def __enter__(self) -> MlflowServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _postgres_bin() -> Path:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    if not versions:
        raise RuntimeError(f"PostgreSQL server binaries (initdb, pg_ctl) not found: "
                           f"{POSTGRES_INSTALL}")
    return versions[-1].parent


@dataclass
class Postgres:
    """A throwaway PostgreSQL cluster (initdb + pg_ctl) in a temp dir, trust auth on 127.0.0.1.

    PostgreSQL refuses to run as root: as root, it runs as the `postgres` user (or `nobody`).
    """

    database: str = "mlflow"
    port: int = field(default_factory=free_port)
    directory: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="karst-pg-")))

    @property
    def uri(self) -> str:
        return f"postgresql+psycopg2://karst@127.0.0.1:{self.port}/{self.database}"

    def _run(self, *args: str) -> None:
        command = [str(_postgres_bin() / args[0]), *args[1:]]
        if os.geteuid() == 0:
            command = ["runuser", "-u", self._user(), "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if done.returncode:
            raise RuntimeError(f"{' '.join(args[:1])} failed: {done.stdout}{done.stderr}")

    @staticmethod
    def _user() -> str:
        try:
            return pwd.getpwnam("postgres").pw_name
        except KeyError:
            return "nobody"

    def start(self) -> Postgres:
        data = self.directory / "data"
        if os.geteuid() == 0:
            user = pwd.getpwnam(self._user())
            os.chown(self.directory, user.pw_uid, user.pw_gid)
        self._run("initdb", "-D", str(data), "-U", "karst", "--auth=trust", "-E", "UTF8")
        self._run("pg_ctl", "-D", str(data), "-l", str(self.directory / "postgres.log"), "-w",
                  "-o", f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1",
                  "start")
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "karst",
                  self.database)
        return self

    def stop(self) -> None:
        data = self.directory / "data"
        if (data / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> Postgres:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---- load: trial-like processes logging per-step metrics ------------------------------------

@dataclass(frozen=True)
class LoadResult:
    processes: int
    steps: int
    logged: int  # metric values the processes logged without an error
    counted: int  # metric values read back from the store
    errors: list[str]  # one line per failed call
    seconds: float  # first process's first step to last process's last step
    run_ids: list[str]

    @property
    def expected(self) -> int:
        return self.processes * self.steps * len(METRICS)

    @property
    def lost(self) -> int:
        return self.expected - self.counted

    @property
    def per_second(self) -> float:
        return self.logged / self.seconds if self.seconds else 0.0


METRICS = ("train_loss", "val_accuracy", "epoch_seconds")  # what tracking.log_epoch logs


def _log_steps(uri: str, run_id: str, steps: int) -> tuple[int, list[str], float, float]:
    """One trial process: per step, the metrics `tracking.log_epoch` logs, in one call."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    logged, errors = 0, []
    start = time.time()
    with contextlib.redirect_stdout(io.StringIO()), mlflow.start_run(run_id=run_id):
        for step in range(1, steps + 1):
            try:
                mlflow.log_metrics(dict(zip(METRICS, (1.0 / step, step / steps, 0.01),
                                            strict=True)), step=step)
                logged += len(METRICS)
            except Exception as err:  # noqa: BLE001 -- counted and reported, never hidden
                errors.append(f"run {run_id} step {step}: {type(err).__name__}: {err}"[:300])
    return logged, errors, start, time.time()


def log_concurrently(uri: str, processes: int, steps: int) -> LoadResult:
    """`processes` trial-like processes at once, then every metric value counted back."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiment = client.create_experiment(f"load-{processes}x{steps}-{time.time_ns()}")
    run_ids = [client.create_run(experiment).info.run_id for _ in range(processes)]
    context = multiprocessing.get_context("forkserver")  # clean children, mlflow imported once
    context.set_forkserver_preload(["mlflow"])
    with context.Pool(processes) as pool:
        outcomes = pool.starmap(_log_steps, [(uri, r, steps) for r in run_ids])
    return LoadResult(processes, steps, logged=sum(o[0] for o in outcomes),
                      counted=count_back(uri, run_ids),
                      errors=[e for o in outcomes for e in o[1]],
                      seconds=max(o[3] for o in outcomes) - min(o[2] for o in outcomes),
                      run_ids=run_ids)


def count_back(uri: str, run_ids: list[str]) -> int:
    """Metric values the store holds for these runs, every step of every key."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    return sum(len(client.get_metric_history(r, key)) for r in run_ids for key in METRICS)
