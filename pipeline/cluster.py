"""`karst cluster check`: a Ray cluster file checked offline, before `ray up` spends money.

Two layers. First Ray's own: its JSON schema (`ray/autoscaler/ray-schema.json`) on the file
as written, then the provider's defaults filled in and validated exactly as `ray up` does
(`prepare_config`, `validate_config`), so a default the file does not override (Ray's AWS
head starts its dashboard on 0.0.0.0) is checked too. Then the project's rules, which Ray
cannot know: every worker type declares its GPUs, nodes install the driver's versions, trials
log to a tracking server every node reaches, Tune storage is shared, token authentication is
on everywhere, and no dashboard or tracking port is open to the world.

Every problem names the field (`head_setup_commands[2]`), the value and what would be valid.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.config import read_yaml_mapping

#: What must be the same on every node as on the driver (Ray also needs the same Python).
DRIVER_PACKAGES = ("torch", "torchvision", "ray", "optuna", "mlflow", "timm")
#: Ports that must never be open to the world: Ray dashboard, GCS, client, object manager,
#: metrics; MLflow; PostgreSQL.
SERVICE_PORTS = {8265: "Ray dashboard", 6379: "Ray GCS", 10001: "Ray client",
                 8076: "Ray object manager", 8080: "Ray metrics", 5000: "MLflow",
                 5432: "PostgreSQL"}
WORLD = ("0.0.0.0", "::", "0.0.0.0/0", "::/0", "*")
SHARED_SCHEMES = ("s3://", "gs://")
REMOTE_TRACKING = re.compile(r"^(https?|databricks|postgresql|mysql|mssql)(\+\w+)?:")
STORAGE_VAR = "KARST_STORAGE"  # the Tune storage the head's searches use (--storage)


class KarstSection(BaseModel):
    """`metadata.karst` in a cluster file: what the project's rules need and Ray ignores."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    constraints: str = Field(description="the lock file nodes install from (`pip install -c`), "
                                         "relative to the cluster file")
    shared_filesystems: list[str] = Field(
        default_factory=list, description="mount points (NFS) present on every node")


class Problem(NamedTuple):
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


class Command(NamedTuple):
    field: str  # where it comes from, e.g. "head_setup_commands[1]"
    text: str


@dataclass(frozen=True)
class Role:
    """A kind of node as the rules see it: its node type and the commands that make it."""

    name: str  # "head" or the worker node type
    node_type: dict[str, Any]
    field: str  # e.g. "available_node_types.gpu_a10g"
    setup: list[Command]
    start: list[Command]

    @property
    def commands(self) -> list[Command]:
        return self.setup + self.start


@dataclass(frozen=True)
class Cluster:
    """A cluster file with Ray's defaults filled in, split by node role."""

    config: dict[str, Any]
    section: KarstSection
    directory: Path  # where the file lies: relative paths in it start here
    head: Role
    workers: list[Role]

    @property
    def roles(self) -> list[Role]:
        return [self.head, *self.workers]


def check_cluster_file(path: str | Path) -> list[Problem]:
    """Every problem with the cluster file at `path`; an empty list means it passes."""
    path = Path(path)
    raw = read_yaml_mapping(path, "cluster file")
    prepared, problems = ray_check(raw)
    if problems:
        return problems  # the project's rules need a file Ray accepts
    section, problems = _section(raw)
    if section is None:
        return problems
    cluster = _split(prepared, section, path.parent)
    return [problem for rule in RULES for problem in rule(cluster)]


def ray_check(raw: dict[str, Any]) -> tuple[dict[str, Any], list[Problem]]:
    """Ray's schema on the file as written, then Ray's defaults filled in and validated as
    `ray up` does; returns the filled-in config and the problems."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    problems = _schema_problems(raw, jsonschema)
    if problems:
        return raw, problems
    try:
        prepared = prepare_config(raw)
        validate_config(prepared)
    except jsonschema.ValidationError as err:
        return raw, [_schema_problem(err, "(with Ray's defaults) ")]
    except Exception as err:  # noqa: BLE001 -- Ray raises ValueError, ClickException, ...
        return raw, [Problem("(file)", f"Ray refuses it: {getattr(err, 'message', None) or err}")]
    return prepared, []


def _schema_problems(raw: dict[str, Any], jsonschema: Any) -> list[Problem]:
    import ray.autoscaler

    schema_file = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    validator = jsonschema.Draft7Validator(json.loads(schema_file.read_text()))
    return [_schema_problem(e) for e in sorted(validator.iter_errors(raw), key=str)]


def _schema_problem(err: Any, note: str = "") -> Problem:
    where = _field(list(err.absolute_path)) or "(top level)"
    rule = err.schema.get("description") or err.validator
    return Problem(where, f"{note}{err.message} (Ray's schema: {rule})")


def _field(parts: list[Any]) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else str(part)
    return text


def _section(raw: dict[str, Any]) -> tuple[KarstSection | None, list[Problem]]:
    data = (raw.get("metadata") or {}).get("karst")
    if data is None:
        return None, [Problem("metadata.karst", "missing: the project's section, e.g. "
                                                "{constraints: constraints.txt} (docs/cluster.md)")]
    try:
        return KarstSection.model_validate(data), []
    except ValidationError as err:
        return None, [Problem(_field(["metadata", "karst", *e["loc"]]),
                              f"{e['msg']} (got {e.get('input')!r})") for e in err.errors()]


def _split(config: dict[str, Any], section: KarstSection, directory: Path) -> Cluster:
    """Roles with their commands, each command traced back to the field it came from."""
    types, head_type = config["available_node_types"], config["head_node_type"]

    def listed(name: str) -> list[Command]:
        return [Command(f"{name}[{i}]", text) for i, text in enumerate(config.get(name) or [])]

    common = listed("setup_commands")
    head = Role("head", types[head_type], f"available_node_types.{head_type}",
                _unmerged(common, config["head_setup_commands"], "head_setup_commands"),
                listed("head_start_ray_commands"))
    global_worker = _unmerged(common, config["worker_setup_commands"], "worker_setup_commands")
    workers = []
    local = config["provider"]["type"] == "local"  # one node type, head and workers alike
    worker_types = [head_type] if local else [t for t in types if t != head_type]
    for name in worker_types:
        field = f"available_node_types.{name}"
        own = types[name].get("worker_setup_commands")
        setup = global_worker if own is None else [
            Command(f"{field}.worker_setup_commands[{i}]", t) for i, t in enumerate(own)]
        workers.append(Role(name, types[name], field, setup,
                            listed("worker_start_ray_commands")))
    return Cluster(config, section, directory, head, workers)


def _unmerged(common: list[Command], merged: list[str], name: str) -> list[Command]:
    """Ray merged `setup_commands` in front of `name`: give each part its own field back."""
    own = merged[len(common):]
    return common + [Command(f"{name}[{i}]", text) for i, text in enumerate(own)]


# ---- the project's rules: each takes the cluster and returns its problems -----------------

def workers_declare_gpus(cluster: Cluster) -> list[Problem]:
    """Trials asking for `gpu` are placed by declared GPUs; Ray cannot probe AWS offline."""
    problems = []
    local = cluster.config["provider"]["type"] == "local"
    for role in cluster.workers:
        if local:
            if not any("--num-gpus" in c.text for c in role.start if "ray start" in c.text):
                problems.append(Problem("worker_start_ray_commands", (
                    "no `ray start ... --num-gpus=N`: each on-premises worker must declare its "
                    "GPUs, e.g. --num-gpus=$(nvidia-smi --list-gpus | wc -l)")))
            continue
        resources = role.node_type.get("resources") or {}
        if not resources.get("GPU"):
            problems.append(Problem(f"{role.field}.resources", (
                f"{resources} declares no GPU; every worker type must declare its GPUs, "
                "e.g. {CPU: 4, GPU: 1} for a g5.xlarge")))
    return problems


def versions_match_driver(cluster: Cluster) -> list[Problem]:
    """Nodes install the lock file; the lock, pins in commands and Ray images match the driver."""
    lock_name = Path(cluster.section.constraints).name
    problems = _lock_problems(cluster.directory / cluster.section.constraints)
    for role in cluster.roles:
        if not any(_installs_with(c.text, lock_name) for c in role.setup):
            problems.append(Problem(_setup_field(role), (
                f"no `pip install -c .../{lock_name}` for the {role.name} node: it would install "
                f"whatever pip resolves, not the driver's {_driver_pins()}")))
    for command in _all_commands(cluster):
        for name, version in re.findall(r"\b([A-Za-z][\w.-]*)===?([\w.+!-]+)", command.text):
            want = _driver_version(name)
            if want is not None and version != want:
                problems.append(Problem(command.field, (
                    f"pins {name}=={version} but the driver has {name} {want}")))
    return problems + _image_problems(cluster.config)


def _lock_problems(lock: Path) -> list[Problem]:
    field = "metadata.karst.constraints"
    if not lock.is_file():
        return [Problem(field, f"{lock} does not exist; write it with `make constraints`")]
    pins = {}
    for line in lock.read_text().splitlines():
        name, sep, version = line.split("#")[0].strip().partition("==")
        if sep:
            pins[_normal(name)] = version.strip()
    problems = []
    for name in DRIVER_PACKAGES:
        want = _driver_version(name)
        if pins.get(name) != want:
            got = f"pins {name}=={pins[name]}" if name in pins else f"does not pin {name}"
            problems.append(Problem(field, (
                f"{lock.name} {got} but the driver has {name} {want}; regenerate it with "
                "`make constraints` (or install the driver from it)")))
    return problems


def _image_problems(config: dict[str, Any]) -> list[Problem]:
    """`rayproject/ray:2.60.0-py311-gpu` must carry the driver's Ray and Python."""
    images = [(f"docker.{k}", v) for k, v in (config.get("docker") or {}).items()
              if k.endswith("image")]
    images += [(f"available_node_types.{t}.docker.worker_image", d["docker"]["worker_image"])
               for t, d in config["available_node_types"].items()
               if "worker_image" in (d.get("docker") or {})]
    ray_version = _driver_version("ray")
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    problems = []
    for field, image in images:
        match = re.match(r"rayproject/ray(?:-ml)?:(\d+\.\d+\.\d+)-(py\d+)", image)
        if match is None or match.groups() != (ray_version, python):
            problems.append(Problem(field, (
                f"{image!r} is not Ray {ray_version} on Python {python[2]}.{python[3:]} like "
                f"the driver; use e.g. rayproject/ray:{ray_version}-{python}-gpu")))
    return problems


def tracking_is_a_server(cluster: Cluster) -> list[Problem]:
    """Trials log where the driver says; a local file there splits the records per node."""
    problems = []
    uris = _assignments(cluster.head.commands, "MLFLOW_TRACKING_URI")
    if not uris:
        problems.append(Problem(_setup_field(cluster.head), (
            "MLFLOW_TRACKING_URI is never set on the head, where the search runs: trials would "
            "log to a sqlite:///mlflow.db of their own on each node; export "
            "MLFLOW_TRACKING_URI=http://<head private IP>:5000")))
    for command in _all_commands(cluster):
        for value in _assignments([command], "MLFLOW_TRACKING_URI"):
            if not REMOTE_TRACKING.match(value):
                problems.append(Problem(command.field, (
                    f"MLFLOW_TRACKING_URI={value} is a file on one node; trials on the others "
                    "cannot log there. Use the tracking server: http://<head private IP>:5000")))
    return problems


def storage_is_shared(cluster: Cluster) -> list[Problem]:
    """Ray Tune's trial state must be reachable from every node (and survive the head)."""
    values = _assignments(cluster.head.commands, STORAGE_VAR)
    valid = f"{' or '.join(SHARED_SCHEMES)} URIs, or a path under metadata.karst." \
            f"shared_filesystems {cluster.section.shared_filesystems}"
    if not values:
        return [Problem(_setup_field(cluster.head), (
            f"{STORAGE_VAR} (Ray Tune storage for `karst search --storage`) is never set on "
            f"the head; valid: {valid}"))]
    shared = [m.rstrip("/") + "/" for m in cluster.section.shared_filesystems]
    return [Problem(c.field, f"{STORAGE_VAR}={v} is not shared storage; valid: {valid}")
            for c in cluster.head.commands for v in _assignments([c], STORAGE_VAR)
            if not (v.startswith(SHARED_SCHEMES) or any(v.startswith(m) for m in shared))]


def token_auth_everywhere(cluster: Cluster) -> list[Problem]:
    """Ray 2.60's token authentication on every node, the token from a file, never inline."""
    problems = []
    for role in cluster.roles:
        starts = [c for c in role.start if "ray start" in c.text]
        on = any("RAY_AUTH_MODE=token" in c.text for c in role.setup)
        for command in starts:
            if not on and "RAY_AUTH_MODE=token" not in command.text:
                problems.append(Problem(command.field, (
                    f"`ray start` on the {role.name} node without RAY_AUTH_MODE=token: `ray "
                    "start` leaves token authentication off unless asked (set it in the command "
                    "or export it in the node's setup commands)")))
    for command in _all_commands(cluster):
        if re.search(r"RAY_AUTH_MODE=['\"]?disabled", command.text):
            problems.append(Problem(command.field, "RAY_AUTH_MODE=disabled turns token "
                                                   "authentication off; use token"))
        if re.search(r"\bRAY_AUTH_TOKEN=", command.text):
            problems.append(Problem(command.field, (
                "the Ray token is written into the cluster file; ship ~/.ray/auth_token in "
                "file_mounts instead")))
    mounts = cluster.config.get("file_mounts") or {}
    if not any(str(remote).endswith(".ray/auth_token") for remote in mounts):
        problems.append(Problem("file_mounts", (
            f"{mounts} does not copy the token to the nodes; add "
            "'~/.ray/auth_token: ~/.ray/auth_token' (make it with `ray get-auth-token "
            "--generate`)")))
    return problems


def no_port_open_to_the_world(cluster: Cluster) -> list[Problem]:
    """Dashboards and tracking are port-forwarded over SSH, never exposed."""
    problems = []
    group = cluster.config["provider"].get("security_group") or {}
    for i, rule in enumerate(group.get("IpPermissions") or []):
        cidrs = [r.get("CidrIp") for r in rule.get("IpRanges", [])]
        cidrs += [r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])]
        exposed = _ports_of(rule)
        if any(c in WORLD for c in cidrs) and exposed:
            problems.append(Problem(f"provider.security_group.IpPermissions[{i}]", (
                f"opens {', '.join(exposed)} to {'/'.join(c for c in cidrs if c in WORLD)}; "
                "reach them through `ray dashboard` / ssh -L (docs/cluster.md), or restrict "
                "CidrIp to your network")))
    for command in _all_commands(cluster):
        dashboard = re.search(r"--dashboard-host[= ]['\"]?([^\s'\"]+)", command.text)
        if dashboard and dashboard.group(1) in WORLD:
            problems.append(Problem(command.field, (
                f"--dashboard-host={dashboard.group(1)} serves the Ray dashboard on every "
                "interface; use --dashboard-host=127.0.0.1 and `ray dashboard`")))
        server = re.search(r"mlflow server.*?(?:--host|-h)[= ]['\"]?([^\s'\"]+)", command.text)
        if server and server.group(1) in WORLD:
            problems.append(Problem(command.field, (
                f"mlflow server --host {server.group(1)} listens on every interface; bind the "
                "head's private address: --host \"$(hostname -I | cut -d' ' -f1)\"")))
    return problems


def _ports_of(rule: dict[str, Any]) -> list[str]:
    if str(rule.get("IpProtocol")) == "-1":
        return ["every port"]
    low, high = rule.get("FromPort", -1), rule.get("ToPort", -1)
    return [f"{port} ({what})" for port, what in SERVICE_PORTS.items() if low <= port <= high]


RULES: list[Callable[[Cluster], list[Problem]]] = [
    workers_declare_gpus, versions_match_driver, tracking_is_a_server, storage_is_shared,
    token_auth_everywhere, no_port_open_to_the_world]


# ---- helpers -------------------------------------------------------------------------------

def _all_commands(cluster: Cluster) -> list[Command]:
    seen, commands = set(), []
    for role in cluster.roles:
        for command in role.commands:
            if command.field not in seen:
                seen.add(command.field)
                commands.append(command)
    return commands


def _assignments(commands: list[Command], name: str) -> list[str]:
    """Values given to `name=` in the commands (enough of each to tell its scheme)."""
    return [m.strip("'\"") for c in commands
            for m in re.findall(rf"\b{name}=(['\"]?[^\s'\";]+)", c.text)]


def _installs_with(text: str, lock_name: str) -> bool:
    return "pip install" in text and re.search(
        rf"(-c|--constraint)[= ]\S*{re.escape(lock_name)}\b", text) is not None


def _setup_field(role: Role) -> str:
    return "head_setup_commands" if role.name == "head" else (
        role.setup[0].field.rsplit("[", 1)[0] if role.setup else "worker_setup_commands")


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _driver_version(name: str) -> str | None:
    """The installed version of one of DRIVER_PACKAGES; None for any other package."""
    if _normal(name) not in DRIVER_PACKAGES:
        return None
    return importlib.metadata.version(_normal(name))


def _driver_pins() -> str:
    return ", ".join(f"{n}=={_driver_version(n)}" for n in DRIVER_PACKAGES)

