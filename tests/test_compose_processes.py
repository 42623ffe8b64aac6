"""infra/compose.yaml's own commands, run here as host processes (no Docker daemon here).

Each service built from the project's image starts with exactly its compose ``command``,
``environment``, ``working_dir`` and health check, in ``depends_on`` order, after the
rewrites a container network makes unnecessary: service host names and ports point at
loopback ports of this test, container paths at host folders (bind mounts at the files they
mount, named volumes and tmpfs at temporary folders, /srv/recall at the project's copy), and
PYTHONPATH stands for the image's editable install. PostgreSQL (Debian's package, running
the same init script) and moto's server (for SeaweedFS) stand in for the two other images.
Not emulated: ``user:`` (the test runs as whoever runs it), device reservations, images.

The fast tests check the parsing, the order and the rewriting; the slow one starts the stack
and checks what a team sees on its first day.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import pytest
import yaml
from support.common import REPO, free_port

COMPOSE_FILE = REPO / "infra" / "compose.yaml"
DOCKERFILE = REPO / "infra" / "docker" / "Dockerfile"
PROJECT_IMAGE = "recall:"
CHECKOUT_IN_IMAGE = "/srv/recall"
# The images compose pulls, and what stands in for each here.
STAND_INS = {"postgres": "Debian's PostgreSQL", "s3": "moto's S3 server"}
# The port each service listens on inside its container (the health checks and the other
# services' URLs name it).
CONTAINER_PORTS = {"postgres": 5432, "s3": 9000, "mlflow": 5000, "prefect-server": 4200}
PROFILE = "gpu"  # the GPU host's profile: worker-gpu's command runs here on the CPU


class ComposeError(ValueError):
    """infra/compose.yaml uses something this runner does not handle; the message names it."""


_VARIABLE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:\?|:-|\?|-)([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def interpolate(value: str, env: Mapping[str, str], where: str) -> str:
    """compose's interpolation: ``${VAR}``, ``${VAR:-default}``, ``${VAR:?message}`` (an
    error naming ``where`` and VAR when unset or empty), ``$$`` for a literal ``$``."""

    def replace(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1) or match.group(4)
        operator, argument = match.group(2), match.group(3)
        value = env.get(name)
        if operator in (":?", "?") and (value is None or (operator == ":?" and value == "")):
            raise ComposeError(f"{where}: {name} is required: {argument}")
        if operator in (":-", "-") and (value is None or (operator == ":-" and value == "")):
            return argument
        return value or ""

    return _VARIABLE.sub(replace, value)


def load(path: Path = COMPOSE_FILE) -> dict:
    return yaml.safe_load(path.read_text())


def active_services(compose: dict, profiles: set[str]) -> dict[str, dict]:
    """The services ``up`` starts with ``profiles``: those without a profile, and those in one."""
    return {name: s for name, s in compose["services"].items() if not s.get("profiles") or set(s["profiles"]) & profiles}


def start_order(services: dict[str, dict]) -> list[str]:
    """Every service after what it depends on (compose's order), ties in file order."""
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in order:
            return
        if name in visiting:
            raise ComposeError(f"depends_on cycle: {' -> '.join((*chain, name))}")
        if name not in services:
            raise ComposeError(f"{chain[-1]} depends on {name!r}, which is not started (a profile?)")
        visiting.add(name)
        for dependency in services[name].get("depends_on") or {}:
            visit(dependency, (*chain, name))
        visiting.discard(name)
        order.append(name)

    for name in services:
        visit(name, ())
    return order


def image_workdir(dockerfile: Path = DOCKERFILE) -> str:
    return re.findall(r"^WORKDIR (\S+)$", dockerfile.read_text(), re.M)[-1]


def image_env(dockerfile: Path = DOCKERFILE) -> dict[str, str]:
    """The image's ``ENV`` settings (``ENV A=1 \\`` continued lines)."""
    text = dockerfile.read_text().replace("\\\n", " ")
    env = {}
    for line in re.findall(r"^ENV (.+)$", text, re.M):
        for item in shlex.split(line):
            key, _, value = item.partition("=")
            env[key] = value
    return env


@dataclass
class Process:
    """One service as a host process: ``argv`` in ``cwd`` with ``env``; ``health`` the
    rewritten health check (None: none); ``one_shot``: compose waits for it to exit 0."""

    name: str
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    health: list[str] | None
    one_shot: bool
    paths: dict[str, Path] = field(default_factory=dict)


class HostRewriter:
    """Container names, ports and paths -> this host's loopback ports and folders."""

    def __init__(self, ports: Mapping[str, int], checkout: Path, image_code: Path, scratch: Path):
        self.ports = dict(ports)  # service -> host port
        self.checkout, self.image_code, self.scratch = checkout, image_code, scratch

    def address(self, text: str, own: str | None = None) -> str:
        """``//service:port`` and ``@service:port`` -> loopback and the service's host port;
        for ``own`` service also its loopback/any-address forms, bare port arguments
        (``--port=5000``, ``-s3.port=9000``, ``--port 5000``) and a 0.0.0.0 bind."""
        for service, port in CONTAINER_PORTS.items():
            if service in self.ports:
                text = re.sub(rf"(?<=[/@]){re.escape(service)}:{port}\b", f"127.0.0.1:{self.ports[service]}", text)
        if own in self.ports:
            port = CONTAINER_PORTS[own]
            text = re.sub(rf"(?<=[/@])(?:127\.0\.0\.1|localhost|0\.0\.0\.0):{port}\b", f"127.0.0.1:{self.ports[own]}", text)
            text = re.sub(rf"^((?:-{{1,2}}[\w.-]*port=)?){port}$", rf"\g<1>{self.ports[own]}", text)
            text = "127.0.0.1" if text == "0.0.0.0" else text.replace("=0.0.0.0", "=127.0.0.1")
        return text

    def mounts(self, name: str, service: dict) -> dict[str, Path]:
        """Container path -> host path, for the service's volumes and tmpfs, and the image's
        own code at /srv/recall unless a mount replaces it."""
        paths = {CHECKOUT_IN_IMAGE: self.image_code}
        for volume in service.get("volumes") or []:
            source, target = str(volume).split(":")[:2]
            if source == "..":
                paths[target] = self.checkout
            elif source.startswith("./"):
                paths[target] = COMPOSE_FILE.parent / source[2:]
            elif source.startswith(("/", "~")):
                raise ComposeError(f"{name}: host path {source} mounted; mount a repository file or a named volume")
            else:
                paths[target] = self.scratch / "volumes" / source
        for target in service.get("tmpfs") or []:
            paths[target] = self.scratch / "tmpfs" / name / target.strip("/").replace("/", "_")
        return paths

    @staticmethod
    def path(text: str, paths: Mapping[str, Path]) -> str:
        """Container paths in ``text`` -> host paths, the longest (most specific) first."""
        for target in sorted(paths, key=len, reverse=True):
            text = re.sub(rf"(?<![\w/]){re.escape(target)}(?=$|[/\s'\"])", str(paths[target]), text)
        return text

    def rewrite(self, text: str, paths: Mapping[str, Path], own: str | None) -> str:
        return self.path(self.address(text, own), paths)


def _argv(value, where: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return shlex.split(value)
    if not isinstance(value, list):
        raise ComposeError(f"{where}: expected a list or a string, got {type(value).__name__}")
    return [str(part) for part in value]


def host_process(name: str, service: dict, env_file: Mapping[str, str], rewriter: HostRewriter,
                 base_env: Mapping[str, str]) -> Process:
    """``service`` of compose as a host process: its entrypoint + command, its environment
    (interpolated from ``env_file``), its working_dir (else the image's), its health check."""
    paths = rewriter.mounts(name, service)
    where = f"{COMPOSE_FILE.name}: service {name}"
    # Not applied here (this test runs as whoever runs it), but compose refuses to start
    # without its values.
    interpolate(str(service.get("user", "")), env_file, f"{where}: user")
    argv = [rewriter.rewrite(interpolate(a, env_file, where), paths, name)
            for a in _argv(service.get("entrypoint"), f"{where}: entrypoint") + _argv(service.get("command"), f"{where}: command")]
    if not argv and str(service.get("image", "")).startswith(PROJECT_IMAGE):
        raise ComposeError(f"{where}: no command (the image's CMD is not run here)")
    environment = service.get("environment") or {}
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    env = dict(base_env)
    for key, value in environment.items():
        env[key] = rewriter.rewrite(interpolate(str(value), env_file, f"{where}: {key}"), paths, name)
    cwd = Path(rewriter.path(service.get("working_dir") or image_workdir(), paths))
    health = None
    if test := (service.get("healthcheck") or {}).get("test"):
        kind, *rest = _argv(test, f"{where}: healthcheck")
        if kind == "CMD-SHELL":
            rest = ["sh", "-c", *rest]
        elif kind != "CMD":
            raise ComposeError(f"{where}: healthcheck {kind!r}: expected CMD or CMD-SHELL")
        health = [rewriter.rewrite(interpolate(a, env_file, where), paths, name) for a in rest]
    one_shot = str(service.get("restart", "no")) == "no"
    return Process(name, argv, env, cwd, health, one_shot, paths)


def env_file_values(uid: int, gid: int) -> dict[str, str]:
    """An infra/.env as a team fills it in: every name of infra/.env.example, random secrets."""
    names = [line.split("=", 1)[0] for line in (REPO / "infra" / ".env.example").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    values = {name: secrets.token_hex(16) for name in names}
    values.update(RECALL_UID=str(uid), RECALL_GID=str(gid), RECALL_GPU_TORCH_VARIANT="",
                  MLFLOW_ADMIN_USERNAME="recall-admin", RECALL_MLFLOW_USERNAME="recall-worker",
                  PREFECT_API_AUTH_STRING=f"recall:{secrets.token_hex(16)}",
                  S3_ADMIN_ACCESS_KEY="admin" + secrets.token_hex(4), RECALL_S3_ACCESS_KEY="recall" + secrets.token_hex(4))
    return values


# --------------------------------------------------------------------------- fast: the file


@pytest.fixture(scope="module")
def compose() -> dict:
    return load()


@pytest.fixture
def rewriter(tmp_path) -> HostRewriter:
    ports = {service: 40000 + i for i, service in enumerate(CONTAINER_PORTS)}
    return HostRewriter(ports, tmp_path / "checkout", REPO, tmp_path / "scratch")


def test_every_active_service_is_the_projects_image_or_has_a_stand_in(compose):
    for profiles in (set(), {"gpu"}, {"cpu-only"}):
        services = active_services(compose, profiles)
        foreign = {name for name, s in services.items() if not str(s.get("image", "")).startswith(PROJECT_IMAGE)}
        assert foreign == set(STAND_INS), foreign
        # The stand-ins are what the images are: the same major PostgreSQL, an S3 API.
        assert services["postgres"]["image"].startswith("postgres:")
    assert not str(compose["services"]["s3"]["image"]).endswith(":latest"), "pin the S3 server's image"


def test_start_order_follows_depends_on_and_the_gpu_worker_needs_its_profile(compose):
    default = start_order(active_services(compose, set()))
    assert "worker-gpu" not in default and "worker-gpu-on-cpu" not in default
    order = start_order(active_services(compose, {PROFILE}))
    for name, service in active_services(compose, {PROFILE}).items():
        for dependency in service.get("depends_on") or {}:
            assert order.index(dependency) < order.index(name), f"{name} before {dependency}"
    # The deployments need the pools, the workers the deployments' pools: prefect-deploy
    # creates the pools itself and the workers wait for it.
    assert order.index("prefect-deploy") < order.index("worker-cpu") < order.index("worker-gpu")
    assert {"worker-gpu-on-cpu"} <= set(start_order(active_services(compose, {"cpu-only"})))
    with pytest.raises(ComposeError, match="cycle"):
        start_order({"a": {"depends_on": {"b": {}}}, "b": {"depends_on": {"a": {}}}})
    with pytest.raises(ComposeError, match="not started"):
        start_order({"a": {"depends_on": {"missing": {}}}})


def test_interpolation_is_composes(compose):
    env = {"SET": "value", "EMPTY": ""}
    assert interpolate("a ${SET} $$HOME ${UNSET:-fallback} ${EMPTY:-fb}", env, "x") == "a value $HOME fallback fb"
    with pytest.raises(ComposeError, match=r"service mlflow: UNSET is required: set in infra/.env"):
        interpolate("${UNSET:?set in infra/.env}", env, "service mlflow")
    with pytest.raises(ComposeError, match="EMPTY is required"):
        interpolate("${EMPTY:?must be set}", env, "here")


def test_host_rewriting_points_services_at_loopback_and_paths_at_host_folders(compose, rewriter, tmp_path):
    env_file = env_file_values(os.getuid(), os.getgid())
    services = compose["services"]
    mlflow = host_process("mlflow", services["mlflow"], env_file, rewriter, {})
    assert mlflow.argv[:2] == ["mlflow", "server"]
    assert "--host=127.0.0.1" in mlflow.argv and "--port=40002" in mlflow.argv
    assert mlflow.env["MLFLOW_BACKEND_STORE_URI"] == f"postgresql://mlflow:{env_file['MLFLOW_DB_PASSWORD']}@127.0.0.1:40000/mlflow"
    assert mlflow.env["MLFLOW_S3_ENDPOINT_URL"] == "http://127.0.0.1:40001"
    assert mlflow.env["MLFLOW_AUTH_CONFIG_PATH"] == str(REPO / "infra" / "mlflow" / "basic_auth.ini")
    assert mlflow.cwd == tmp_path / "scratch" / "volumes" / "mlflow-auth"
    assert "http://127.0.0.1:40002/health" in " ".join(mlflow.health)
    # The names a client inside compose sends stay as they are: the allowed hosts.
    allowed = next(a.split("=", 1)[1].split(",") for a in mlflow.argv if a.startswith("--allowed-hosts="))
    from mlflow.server.security_utils import is_allowed_host_header

    assert is_allowed_host_header(allowed, "mlflow:5000") and is_allowed_host_header(allowed, "127.0.0.1:5000")
    assert not is_allowed_host_header(allowed, "evil.example:5000")

    worker = host_process("worker-cpu", services["worker-cpu"], env_file, rewriter, {})
    assert worker.argv == ["prefect", "worker", "start", "--pool", "cpu", "--type", "process"]
    assert worker.cwd == tmp_path / "checkout"
    assert worker.env["RECALL_PROJECT_DIR"] == str(tmp_path / "checkout")
    assert worker.env["PREFECT_API_URL"] == "http://127.0.0.1:40003/api"
    assert worker.env["HOME"].startswith(str(tmp_path / "scratch" / "tmpfs"))
    assert worker.env["MLFLOW_TRACKING_PASSWORD"] == env_file["RECALL_MLFLOW_PASSWORD"]

    identities = host_process("s3-config", services["s3-config"], env_file, rewriter, {})
    assert identities.argv[-1] == str(tmp_path / "scratch" / "volumes" / "s3-config" / "identities.json")
    postgres = host_process("postgres", services["postgres"], env_file, rewriter, {})
    assert postgres.health[:2] == ["sh", "-c"] and "-h 127.0.0.1" in postgres.health[2]
    # A path that merely starts like a mount point is not one.
    assert HostRewriter.path("/srv/recallx /srv/recall/a", {"/srv/recall": Path("/h")}) == "/srv/recallx /h/a"
    with pytest.raises(ComposeError, match="service x: no command"):
        host_process("x", {"image": "recall:cpu"}, env_file, rewriter, {})
    assert HostRewriter.path("/srv/recall", {"/srv/recall": Path("/h")}) == "/h"
    with pytest.raises(ComposeError, match="RECALL_UID is required"):
        host_process("worker-cpu", services["worker-cpu"], {}, rewriter, {})


def test_every_project_service_runs_a_program_the_environment_has(compose, rewriter):
    env_file = env_file_values(os.getuid(), os.getgid())
    for name, service in active_services(compose, {PROFILE, "cpu-only"}).items():
        if name in STAND_INS:
            continue
        process = host_process(name, service, env_file, rewriter, {})
        program = Path(sys.executable).parent / process.argv[0]
        assert program.exists() or shutil.which(process.argv[0]), f"{name}: {process.argv[0]} not installed"
        if process.argv[:2] == ["python", "-m"]:
            module = process.argv[2]
            __import__(module)  # the module compose names exists in this checkout
    assert image_workdir() == CHECKOUT_IN_IMAGE


def test_the_mlflow_server_has_what_basic_auth_imports():
    # `mlflow server --app-name basic-auth` imports Flask-WTF (mlflow[auth]); the image and
    # this environment install the `stack`/`test` extras, which name mlflow[auth].
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(d.startswith("mlflow[auth]") for d in extras["stack"])
    __import__("flask_wtf")


# --------------------------------------------------------------------------- slow: the stack


def _wait(check, what: str, timeout: float, log: Path | None = None, alive=lambda: True) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return
        if not alive() or time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            raise AssertionError(f"{what}: not ready after {timeout:.0f} s\n{tail}")
        time.sleep(1)


def _succeeds(argv: list[str], env: Mapping[str, str], cwd: Path) -> bool:
    try:
        return subprocess.run(argv, env=dict(env), cwd=cwd, capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _request(url: str, host: str | None = None, auth: str | None = None, body: dict | None = None) -> int:
    request = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    if host:
        request.add_unredirected_header("Host", host)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:  # not listening (yet)
        return 0


@pytest.mark.slow
@pytest.mark.stack
@pytest.mark.timeout(2400)
def test_the_compose_stack_as_processes_runs_an_update_on_a_batch(tmp_path, monkeypatch):
    import boto3
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings
    from support.projects import sh
    from support.stream import SETUP, STREAM_TINY, task_stages, upload_batch

    from devtools.localstack import LocalStack, _postgres_bindir
    from devtools.scratch import scratch_project
    from devtools.servers import stop

    started = time.monotonic()
    compose = load()
    services = active_services(compose, {PROFILE})
    order = start_order(services)
    ports = {name: free_port() for name in CONTAINER_PORTS}
    env_file = env_file_values(os.getuid(), os.getgid())
    scratch = tmp_path / "scratch"
    logs = tmp_path / "logs"
    logs.mkdir()
    image_home = tmp_path / "image-home"
    image_home.mkdir()
    for key in [k for k in os.environ if k.startswith(("AWS_", "MLFLOW_", "PREFECT_", "RECALL_"))]:
        monkeypatch.delenv(key)
    s3_endpoint = f"http://127.0.0.1:{ports['s3']}"

    # The team's checkout: the stream demo, its DVC remote in the stack's bucket.
    source, ledger, remote = "s3://recall-stream/incoming", "s3://recall-dvc/recall-state/ledger", "s3://recall-dvc/dvc"
    overrides = ["experiment=stream_demo", f"dataset.source={source}", f"dataset.ledger_uri={ledger}"]
    checkout = scratch_project(tmp_path / "checkout", STREAM_TINY, compose=overrides,
                               folders=("pipeline", "conf", "flows"), files=("dvc.yaml", ".gitignore", "prefect.yaml"))
    sh(checkout, "recall", "remote", remote, "--endpoint-url", s3_endpoint, "--no-check")  # the S3 API starts below
    sh(checkout, "git", "add", "-A")
    sh(checkout, "git", "commit", "-qm", "the team's remote")
    batches = tmp_path / "producer"
    sh(checkout, "recall", "stream-demo", str(batches), "--batches", "1")

    rewriter = HostRewriter(ports, checkout, REPO, scratch)
    # The image's environment: its ENV, its user's home, its programs; PYTHONPATH for its
    # editable install at /srv/recall (the checkout where one is mounted, else this code).
    base = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "HOME": str(image_home),
            "LANG": "C.UTF-8", "TMPDIR": str(tmp_path), **image_env()}
    processes: dict[str, subprocess.Popen] = {}
    stack = LocalStack(scratch / "postgres", {"postgres": ports["postgres"]})
    (stack.root).mkdir(parents=True)
    # The stand-in PostgreSQL takes infra/.env's passwords and runs the init script compose mounts.
    (stack.root / "secrets.json").write_text(json.dumps({
        "postgres": env_file["POSTGRES_PASSWORD"], "mlflow": env_file["MLFLOW_DB_PASSWORD"],
        "prefect": env_file["PREFECT_DB_PASSWORD"], "s3_access_key": "-", "s3_secret_key": "-"}))
    timings: dict[str, float] = {}
    try:
        for name in order:
            began = time.monotonic()
            if name == "postgres":
                stack.start_postgres()
                process = host_process(name, services[name], env_file, rewriter, base)
                env = {**process.env, "PGPORT": str(ports["postgres"]),
                       "PATH": f"{_postgres_bindir()}{os.pathsep}{base['PATH']}"}
                _wait(lambda: _succeeds(process.health, env, tmp_path), "postgres health check", 120)
                timings[name] = time.monotonic() - began
                continue
            if name == "s3":
                log = logs / "s3.log"
                with open(log, "wb") as handle:
                    processes[name] = subprocess.Popen(
                        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(ports["s3"])],
                        stdout=handle, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **base})
                _wait(lambda: _request(f"{s3_endpoint}/moto-api/") == 200, "the S3 stand-in", 60, log,
                      lambda: processes["s3"].poll() is None)
                continue
            process = host_process(name, services[name], env_file, rewriter, base)
            for host_path in process.paths.values():
                if not host_path.exists():
                    host_path.mkdir(parents=True)
            env = {**process.env, "PYTHONPATH": str(checkout if process.paths[CHECKOUT_IN_IMAGE] == checkout else REPO)}
            if name.startswith("worker-"):
                env["PREFECT_WORKER_QUERY_SECONDS"] = "2"  # the test's only departure: polls faster
            log = logs / f"{name}.log"
            with open(log, "wb") as handle:
                processes[name] = subprocess.Popen(process.argv, cwd=process.cwd, env=env, stdout=handle,
                                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                                   start_new_session=True)
            if process.one_shot:
                returncode = processes[name].wait(timeout=600)
                assert returncode == 0, f"{name} exited {returncode}:\n{log.read_text(errors='replace')[-3000:]}"
            elif process.health:
                _wait(lambda: _succeeds(process.health, env, process.cwd), f"{name}'s health check", 300, log,
                      lambda: processes[name].poll() is None)
            timings[name] = time.monotonic() - began

        # s3-config wrote the S3 server's identities: the workers' user has the policy's grants.
        identities = json.loads((scratch / "volumes" / "s3-config" / "identities.json").read_text())["identities"]
        worker_user = next(i for i in identities if i["credentials"][0]["accessKey"] == env_file["RECALL_S3_ACCESS_KEY"])
        assert "Write:recall-dvc/dvc/*" in worker_user["actions"] and "Read:recall-stream/incoming/*" in worker_user["actions"]
        assert not any(a.startswith("Write:recall-stream") for a in worker_user["actions"])

        # MLflow as a client inside compose reaches it: `Host: mlflow:5000`, the workers' user.
        mlflow_url = f"http://127.0.0.1:{ports['mlflow']}/api/2.0/mlflow/experiments/search"
        worker_auth = f"{env_file['RECALL_MLFLOW_USERNAME']}:{env_file['RECALL_MLFLOW_PASSWORD']}"
        assert _request(mlflow_url, "mlflow:5000", worker_auth, {"max_results": 5}) == 200
        assert _request(mlflow_url, "mlflow:5000", None, {"max_results": 5}) == 401
        assert _request(mlflow_url, "evil.example:5000", worker_auth, {"max_results": 5}) == 403

        # prefect-deploy made the four deployments on the pools the workers serve.
        api = {PREFECT_API_URL: f"http://127.0.0.1:{ports['prefect-server']}/api",
               PREFECT_API_AUTH_STRING: env_file["PREFECT_API_AUTH_STRING"]}
        with temporary_settings(api), get_client(sync_client=True) as client:
            deployments = {f"{client.read_flow(d.flow_id).name}/{d.name}": d.work_pool_name for d in client.read_deployments()}
        assert deployments == {"recall-update/scheduled": "cpu", "recall-benchmark/on-demand": "cpu",
                               "recall-step/cpu": "cpu", "recall-step/gpu": "gpu"}

        # A batch lands; one recall-update/scheduled run takes it through both workers.
        s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1",
                          aws_access_key_id=env_file["RECALL_S3_ACCESS_KEY"], aws_secret_access_key=env_file["RECALL_S3_SECRET_KEY"])
        assert {b["Name"] for b in s3.list_buckets()["Buckets"]} == {"recall-artifacts", "recall-dvc", "recall-stream"}
        upload_batch(s3, batches, "batch-001", bucket="recall-stream")
        began = time.monotonic()
        with temporary_settings(api):
            run = run_deployment("recall-update/scheduled", parameters={"source": source, "overrides": overrides},
                                 timeout=1800, poll_interval=3, as_subflow=False)
        timings["recall-update run"] = time.monotonic() - began
        worker_logs = "\n".join((logs / f"{n}.log").read_text(errors="replace")[-3000:] for n in ("worker-cpu", "worker-gpu"))
        assert run.state.is_completed(), f"{run.state}\n{worker_logs}"
        with temporary_settings(api), get_client(sync_client=True) as client:
            steps = [r for r in client.read_flow_runs(limit=200) if r.parameters.get("pipeline_run") == str(run.id)]
        assert all(r.state.is_completed() for r in steps)
        assert sorted(s for r in steps for s in r.parameters["stages"]) == sorted(SETUP | task_stages(1) | {"report"})
        assert {r.work_pool_name for r in steps} == {"cpu", "gpu"}, "both workers picked up stages"
        # The stages ran in the mounted checkout, and its outputs went to the shared remote.
        assert (checkout / "dvc.lock").exists()
        assert s3.list_objects_v2(Bucket="recall-dvc", Prefix="dvc/files/md5/")["KeyCount"] > 0
    finally:
        for name in reversed(list(processes)):
            stop(processes[name])
        stack.down()
        if stack.pg_home != stack.root:
            shutil.rmtree(stack.pg_home, ignore_errors=True)
    timings["total"] = time.monotonic() - started
    print("compose as processes: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()), file=sys.stderr)
