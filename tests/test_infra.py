"""infra/: the compose stack, the Kubernetes worker files, the image and the S3 policy,
checked by parsing and against each other, conf/, the code and the local stack (no Docker
or Kubernetes here to run them)."""

from __future__ import annotations

import json
import os
import re
import subprocess
from urllib.parse import urlsplit

import pytest
import yaml
from support.common import REPO

INFRA = REPO / "infra"
POOLS = {"cpu", "gpu"}
DEPLOYMENTS = {"recall-update/scheduled", "recall-benchmark/on-demand", "recall-step/cpu", "recall-step/gpu"}
WORKERS = {"worker-cpu": "cpu", "worker-gpu": "gpu"}
# What every process that runs `recall` needs in a team stack, though libraries read it
# (MLflow, boto3, Prefect): the worker services must set each.
RUNTIME_ENV = {
    "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL",
    "PREFECT_API_URL", "PREFECT_API_AUTH_STRING",
}
# Variables the code reads that a worker service must not or need not set, and why. A new
# variable in the code fails test_every_variable_the_code_reads_is_set_for_the_workers
# until it is set in infra/compose.yaml or explained here.
NOT_SET_FOR_WORKERS = {
    "DVC_ROOT": "set by DVC for each stage",
    "DVC_EXP_NAME": "set by DVC for an experiment",
    "RECALL_PIPELINE_RUN": "set by the flows for each stage process",
    "RECALL_CONF_DIR": "tests point the code at a copied conf/",
    "AWS_ENDPOINT_URL_S3": "AWS_ENDPOINT_URL serves the same purpose and is set",
    "PATH": "the image's",
    "PREFECT_PORT": "the port of `make prefect`'s server on a developer's machine",
    "RECALL_EVENTS_TOKEN": "the bucket-event relay's, not a worker's",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "the arrival check turns it off for itself (setdefault)",
    "RECALL_GIT_URL": "flows/local.py deploy-k8s reads it on the machine that applies infra/k8s/prefect.yaml",
    "S3_ADMIN_ACCESS_KEY": "the S3 server's admin: only compose's s3-config one-shot",
    "S3_ADMIN_SECRET_KEY": "the S3 server's admin: only compose's s3-config one-shot",
    "RECALL_S3_ACCESS_KEY": "s3-config's name for the workers' key; the workers get it as AWS_ACCESS_KEY_ID",
    "RECALL_S3_SECRET_KEY": "s3-config's name for the workers' key; the workers get it as AWS_SECRET_ACCESS_KEY",
}
SECRET_WORDS = ("PASSWORD", "SECRET", "AUTH_STRING", "ACCESS_KEY", "TOKEN")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((INFRA / "compose.yaml").read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


@pytest.fixture(scope="module")
def job_template() -> dict:
    return json.loads((INFRA / "k8s" / "gpu-base-job-template.json").read_text())


def _env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def _command(service: dict) -> list[str]:
    command = service.get("command") or []
    return command.split() if isinstance(command, str) else [str(part) for part in command]


def _host_port(service: dict, container_port: int) -> tuple[str, int]:
    for mapping in service.get("ports", []):
        host, published, target = str(mapping).rsplit(":", 2) if str(mapping).count(":") == 2 else ("", *str(mapping).split(":"))
        if int(target) == container_port:
            return host, int(published)
    raise AssertionError(f"container port {container_port} not published")


def _code_env_reads() -> set[str]:
    pattern = re.compile(r"""(?:os\.environ\.get|os\.getenv|os\.environ\.setdefault)\(\s*["']([A-Z0-9_]+)["']|os\.environ\[\s*["']([A-Z0-9_]+)["']\s*\]""")
    names = set()
    for folder in ("pipeline", "flows", "hydra_plugins"):
        for path in (REPO / folder).rglob("*.py"):
            for match in pattern.finditer(path.read_text()):
                names.add(match.group(1) or match.group(2))
    return names


# --------------------------------------------------------------------------- compose


def test_compose_has_the_whole_stack_with_health_checks_and_named_volumes(compose, services):
    assert {"postgres", "s3", "s3-config", "s3-init", "mlflow", "prefect-server", *WORKERS} <= set(services)
    for name in ("postgres", "s3", "mlflow", "prefect-server"):
        assert services[name].get("healthcheck", {}).get("test"), f"{name}: no health check"
    declared = set(compose.get("volumes") or {})
    used = {str(v).split(":", 1)[0] for s in services.values() for v in s.get("volumes", [])}
    named = {v for v in used if not v.startswith((".", "/"))}
    assert named and named <= declared, f"volumes used but not declared: {named - declared}"
    assert {"postgres-data", "s3-data"} <= named


def test_servers_use_postgresql_s3_artifacts_and_their_auth(services):
    mlflow = services["mlflow"]
    command, env = _command(mlflow), _env(mlflow)
    assert "--app-name=basic-auth" in command
    assert env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://mlflow:")
    assert any(part.startswith("--artifacts-destination=s3://") for part in command)
    assert env["MLFLOW_FLASK_SERVER_SECRET_KEY"] and env["MLFLOW_AUTH_ADMIN_PASSWORD"]
    auth_ini = (INFRA / "mlflow" / "basic_auth.ini").read_text()
    assert not re.search(r"^\s*admin_password\s*=", auth_ini, re.M), "the admin password belongs in infra/.env"

    prefect = _env(services["prefect-server"])
    assert prefect["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://prefect:")
    assert prefect["PREFECT_SERVER_API_AUTH_STRING"].startswith("${")

    init_sql = (INFRA / "postgres" / "init-databases.sh").read_text()
    assert "CREATE DATABASE mlflow" in init_sql and "CREATE DATABASE prefect" in init_sql


def test_ports_are_on_loopback_and_agree_with_conf_and_the_local_stack(services):
    from devtools.localstack import STACK_PORTS

    server_uri = yaml.safe_load((REPO / "conf" / "tracking" / "server.yaml").read_text())["uri"]
    for service, port, local_name in (("mlflow", 5000, "mlflow"), ("prefect-server", 4200, "prefect"), ("s3", 9000, "s3")):
        host, published = _host_port(services[service], port)
        assert host == "127.0.0.1", f"{service} published beyond loopback"
        assert published == STACK_PORTS[local_name], f"{service}: compose {published}, make stack {STACK_PORTS[local_name]}"
    assert urlsplit(server_uri).port == _host_port(services["mlflow"], 5000)[1]
    for service in services.values():
        for mapping in service.get("ports", []):
            assert str(mapping).startswith("127.0.0.1:"), mapping


def test_workers_serve_the_cpu_and_gpu_pools_and_only_gpu_reserves_the_gpu(services):
    for name, pool in {**WORKERS, "worker-gpu-on-cpu": "gpu"}.items():
        command = _command(services[name])
        assert command[:3] == ["prefect", "worker", "start"]
        assert command[command.index("--pool") + 1] == pool
    devices = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert "deploy" not in services["worker-cpu"] and "deploy" not in services["worker-gpu-on-cpu"]
    assert "cu" in str(services["worker-gpu"]["build"]["args"]["TORCH_VARIANT"])
    # A device reservation fails `up` on a host without one: only with `--profile gpu`.
    assert services["worker-gpu"]["profiles"] == ["gpu"] and services["worker-gpu-on-cpu"]["profiles"] == ["cpu-only"]
    assert not any(s.get("deploy") for s in services.values() if not s.get("profiles"))


def test_services_writing_the_checkout_run_as_its_owner_in_the_image_code_path(services):
    dockerfile = (INFRA / "docker" / "Dockerfile").read_text()
    # The image installs its code editable from where the checkout is mounted, so a mounted
    # checkout's code is what runs (and what DVC hashes).
    assert re.findall(r"^WORKDIR (\S+)$", dockerfile, re.M)[-1] == "/srv/recall"
    assert "pip install --no-deps -e ." in dockerfile and "/opt/recall" not in dockerfile
    for name, service in services.items():
        if "..:/srv/recall" in [str(v) for v in service.get("volumes", [])]:
            assert service["user"].startswith("${RECALL_UID:?"), f"{name}: writes the checkout as the image's user"
            assert _env(service)["HOME"] in service["tmpfs"], f"{name}: no writable home"
    ignored = set((REPO / ".dockerignore").read_text().split())
    assert {".dvc/cache", ".dvc/tmp", ".dvc/config.local"} <= ignored
    assert 'ARG TORCH_INDEX_URL=' in dockerfile and '--index-url "${TORCH_INDEX_URL}/${TORCH_VARIANT}"' in dockerfile


def test_prefect_deploy_creates_the_pools_before_the_deployments(services):
    assert _command(services["prefect-deploy"]) == ["python", "-m", "flows.local", "configure"]
    for name in (*WORKERS, "worker-gpu-on-cpu"):
        assert services[name]["depends_on"]["prefect-deploy"]["condition"] == "service_completed_successfully"


def test_version_floors_cover_what_the_files_use():
    import tomllib

    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    requirements = {Requirement(d).name: Requirement(d) for d in
                    tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]}
    # MLFLOW_AUTH_ADMIN_* and --allowed-hosts: checked against 3.17 only.
    assert not requirements["mlflow"].specifier.contains(Version("3.16.9"))
    # PREFECT_FLOWS_HEARTBEAT_FREQUENCY and run_shell_script's `shell`: 3.7.
    assert not requirements["prefect"].specifier.contains(Version("3.6.9"))
    for path in (REPO / "prefect.yaml", INFRA / "k8s" / "prefect.yaml"):
        declared = SpecifierSet(yaml.safe_load(path.read_text())["prefect-version"])
        assert declared == requirements["prefect"].specifier, f"{path.name}: {declared}"


def test_every_variable_the_code_reads_is_set_for_the_workers(services):
    read = _code_env_reads()
    assert "MLFLOW_TRACKING_URI" in read  # the scan finds what it should
    for name in WORKERS:
        env = _env(services[name])
        missing = sorted((read | RUNTIME_ENV) - set(env) - set(NOT_SET_FOR_WORKERS))
        assert not missing, f"{name}: not set: {missing} (set them in infra/compose.yaml or explain them in NOT_SET_FOR_WORKERS)"
        assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
        assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
        assert urlsplit(env["AWS_ENDPOINT_URL"]).hostname == "s3"


def test_prefect_yaml_variables_and_pools_agree_with_compose(services):
    worker_env = _env(services["worker-cpu"])
    # The pull steps' variables are read by the workers when a flow run starts.
    pull = json.dumps(yaml.safe_load((REPO / "prefect.yaml").read_text())["pull"])
    assert set(re.findall(r"\{\{\s*\$([A-Z0-9_]+)\s*\}\}", pull)) <= set(worker_env)
    prefect_yaml = REPO / "prefect.yaml"
    text = prefect_yaml.read_text()
    uncommented = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    placeholders = set(re.findall(r"\{\{\s*\$([A-Z0-9_]+)\s*\}\}", uncommented))
    assert "RECALL_PROJECT_DIR" in placeholders  # the scan finds what it should
    env = _env(services["prefect-deploy"])
    missing = placeholders - set(env)
    assert not missing, f"prefect.yaml reads {sorted(missing)}; compose's prefect-deploy does not set them"
    spec = yaml.safe_load(text)
    pools = {d["work_pool"]["name"] for d in spec["deployments"]}
    assert pools <= POOLS
    names = {d["name"] for d in spec["deployments"]}
    assert {n.split("/")[1] for n in DEPLOYMENTS} <= names


def test_buckets_agree_between_s3_init_the_policy_the_services_and_the_local_stack(services):
    from devtools.localstack import ARTIFACTS_DESTINATION, STACK_BUCKETS

    # s3-init creates the local stack's buckets with the same function (ensure_buckets).
    assert _command(services["s3-init"]) == ["python", "-m", "devtools.localstack", "s3-buckets"]
    created = set(STACK_BUCKETS)
    policy = json.loads((INFRA / "iam" / "recall-least-privilege-policy.json").read_text())
    policy_buckets = {r.split(":::")[1].split("/")[0] for s in policy["Statement"] for r in s["Resource"]}
    assert policy_buckets == created
    worker_env = _env(services["worker-cpu"])
    used = {urlsplit(worker_env[key]).netloc for key in ("RECALL_DVC_REMOTE", "RECALL_SOURCE")}
    artifacts = next(p.split("=", 1)[1] for p in _command(services["mlflow"]) if p.startswith("--artifacts-destination="))
    assert artifacts == ARTIFACTS_DESTINATION
    used.add(urlsplit(artifacts).netloc)
    assert used == created


def test_policy_reads_the_source_writes_the_remote_artifacts_and_ledger():
    policy = json.loads((INFRA / "iam" / "recall-least-privilege-policy.json").read_text())

    def actions_on(prefix: str) -> set[str]:
        return {a for s in policy["Statement"] if s["Effect"] == "Allow" for r in s["Resource"]
                if r.startswith(f"arn:aws:s3:::{prefix}") for a in s["Action"]}

    assert actions_on("recall-stream/") == {"s3:GetObject"}  # the source is never written
    assert {"s3:GetObject", "s3:PutObject"} <= actions_on("recall-dvc/dvc/")
    assert {"s3:GetObject", "s3:PutObject"} <= actions_on("recall-dvc/recall-state/ledger/")
    assert "s3:DeleteObject" not in actions_on("recall-dvc/recall-state/ledger/")  # entries are write-once
    assert {"s3:GetObject", "s3:PutObject"} <= actions_on("recall-artifacts/mlflow/")
    assert not any("*" in a for s in policy["Statement"] for a in s["Action"])


# --------------------------------------------------------------------------- secrets


def test_every_secret_comes_from_the_git_ignored_env_file(services):
    compose_text = "\n".join(
        line for line in (INFRA / "compose.yaml").read_text().splitlines() if not line.lstrip().startswith("#")
    )
    interpolated = set(re.findall(r"\$\{([A-Z0-9_]+)", compose_text))
    example = {}
    for line in (INFRA / ".env.example").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            example[key] = value
    assert set(example) == interpolated, set(example) ^ interpolated
    assert all(value == "" for value in example.values()), "infra/.env.example lists names, not values"
    for name, service in services.items():
        for key, value in _env(service).items():
            if any(word in key for word in SECRET_WORDS):
                assert "${" in value, f"{name}: {key} is not taken from infra/.env"
    # Required ones stop compose when missing instead of starting with an empty password.
    for variable in interpolated - {"RECALL_GPU_TORCH_VARIANT"}:
        assert re.search(rf"\$\{{{variable}:\?", compose_text), f"{variable} has no `:?` guard"
    ignored = subprocess.run(["git", "check-ignore", "-q", "infra/.env"], cwd=REPO)
    assert ignored.returncode == 0, "infra/.env is not git-ignored"


def test_no_secret_values_in_the_repository():
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    patterns = [re.compile(p) for p in (r"AKIA[0-9A-Z]{16}", r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
                                         "password" + "1234",  # MLflow's old default admin password
                                         r"postgres(?:ql)?(?:\+\w+)?://[^:\s/]+:[^${\s@]+@")]
    for name in tracked.split("\0"):
        path = REPO / name
        if not name or not path.is_file() or path.suffix in {".png", ".safetensors", ".pt"} or path.stat().st_size > 1_000_000:
            continue
        text = path.read_text(errors="ignore")
        for pattern in patterns:
            match = pattern.search(text)
            assert match is None, f"{name}: looks like a secret: {match.group(0)[:40]}"
    secrets = list(yaml.safe_load_all((INFRA / "k8s" / "secret.example.yaml").read_text()))
    assert secrets and all(v == "" for s in secrets for v in s["stringData"].values())


# --------------------------------------------------------------------------- Kubernetes


def _placeholders(value) -> set[str]:
    return set(re.findall(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}", json.dumps(value)))


def test_gpu_job_template_defines_every_variable_it_uses_and_requests_the_gpu(job_template):
    variables = set(job_template["variables"]["properties"])
    used = _placeholders(job_template["job_configuration"])
    assert used <= variables, f"undeclared: {used - variables}"
    pod = job_template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    for side in ("requests", "limits"):
        assert container["resources"][side]["nvidia.com/gpu"] == "{{ gpu_count }}"
    assert pod["nodeSelector"] == "{{ node_selector }}" and pod["tolerations"] == "{{ tolerations }}"
    defaults = job_template["variables"]["properties"]
    assert defaults["gpu_count"]["default"] >= 1
    assert any(t.get("key") == "nvidia.com/gpu" for t in defaults["tolerations"]["default"])
    secret_names = {s["metadata"]["name"] for s in yaml.safe_load_all((INFRA / "k8s" / "secret.example.yaml").read_text())}
    assert defaults["runtime_secret_name"]["default"] in secret_names


def test_gpu_job_template_passes_prefects_own_checks(job_template):
    pytest.importorskip("prefect")
    from prefect.server.schemas.actions import validate_base_job_template

    validate_base_job_template(job_template)
    broken = json.loads(json.dumps(job_template))
    broken["job_configuration"]["job_manifest"]["spec"]["extra"] = "{{ undeclared }}"
    with pytest.raises(ValueError, match="undeclared"):
        validate_base_job_template(broken)


def test_gpu_job_template_renders_a_kubernetes_job_requesting_the_gpu(job_template):
    pytest.importorskip("prefect_kubernetes")
    import asyncio

    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    # client: no block or variable references to resolve, so none is needed.
    configuration = asyncio.run(KubernetesWorkerJobConfiguration.from_template_and_values(
        job_template, {"image": "registry.invalid/recall:gpu", "gpu_count": 2}, client=object()))
    pod = configuration.job_manifest["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["containers"][0]["envFrom"] == [{"secretRef": {"name": "recall-runtime"}}]


def test_helm_worker_values_point_the_gpu_pool_at_the_template_and_the_auth_secret():
    values = yaml.safe_load((INFRA / "k8s" / "values-worker.yaml").read_text())["worker"]
    # A pool of its own: the chart's init container rewrites an existing pool's template.
    assert values["config"]["workPool"] == "gpu-k8s" and values["config"]["type"] == "kubernetes"
    k8s_deployments = yaml.safe_load((INFRA / "k8s" / "prefect.yaml").read_text())["deployments"]
    assert {d["work_pool"]["name"] for d in k8s_deployments} == {"gpu-k8s"}
    assert "gpu-k8s" not in {d["work_pool"]["name"] for d in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]}
    # The worker's image is the installed Prefect's release, not a tag that floats ahead of
    # the server.
    from importlib.metadata import version

    assert values["image"]["prefectTag"] == f"{version('prefect')}-python3.11-kubernetes"
    assert values["apiConfig"] == "selfHostedServer"
    assert values["selfHostedServerApiConfig"]["apiUrl"].endswith(":4200/api")
    auth = values["selfHostedServerApiConfig"]["basicAuth"]
    assert auth["enabled"] and auth["existingSecret"] and "authString" not in auth
    secret_names = {s["metadata"]["name"] for s in yaml.safe_load_all((INFRA / "k8s" / "secret.example.yaml").read_text())}
    assert auth["existingSecret"] in secret_names
    assert values["config"]["baseJobTemplate"]["existingConfigMapName"] in (INFRA / "k8s" / "values-worker.yaml").read_text()


# --------------------------------------------------------------------------- image


def test_dockerfile_pins_torch_as_pyproject_and_runs_unprivileged():
    import tomllib

    dockerfile = (INFRA / "docker" / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", dockerfile, re.M))
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = dict(d.split("==") for d in dependencies if "==" in d)
    assert args["TORCH_VERSION"] == pins["torch"] and args["TORCHVISION_VERSION"] == pins["torchvision"]
    assert args["TORCH_VARIANT"] == "cpu"
    assert re.search(r"^USER (?!root)\w+", dockerfile, re.M)
    assert '"prefect", "worker", "start"' in dockerfile
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".venv", ".git", "infra/.env"} <= set(ignored)


def test_the_gpu_k8s_job_has_no_empty_env_and_its_flow_runs_take_the_fresh_machine_steps(job_template, monkeypatch):
    pytest.importorskip("prefect_kubernetes")
    import asyncio
    import uuid

    from prefect.client.schemas.objects import FlowRun
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.utilities.templating import apply_values
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    spec = yaml.safe_load((INFRA / "k8s" / "prefect.yaml").read_text())
    (deployment,) = spec["deployments"]
    commit = "0123456789abcdef0123456789abcdef01234567"
    # What `prefect deploy` does to a deployment (prefect cli/deploy/_core.py: env
    # placeholders from the applying machine's environment, unset ones left as they are),
    # with flows/local.py deploy-k8s's environment, on a machine where the compose
    # settings are unset.
    for name in ("MLFLOW_TRACKING_URI", "RECALL_DVC_REMOTE", "RECALL_PROJECT_DIR", "RECALL_SOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RECALL_GIT_URL", "https://git.example/recall.git")
    monkeypatch.setenv("RECALL_GIT_COMMIT", commit)
    applied = apply_values(deployment, dict(os.environ), remove_notset=False)
    job_variables = applied["work_pool"]["job_variables"]

    configuration = asyncio.run(KubernetesWorkerJobConfiguration.from_template_and_values(
        job_template, {**job_variables, "image": "registry.invalid/recall:gpu"}, client=object()))
    flow_run = FlowRun(id=uuid.uuid4(), name="gpu-step", flow_id=uuid.uuid4())
    # The worker's own settings (the chart gives it the server's URL).
    with temporary_settings({PREFECT_API_URL: "http://prefect-server.recall.svc.cluster.local:4200/api"}):
        configuration.prepare_for_flow_run(flow_run)
    container = configuration.job_manifest["spec"]["template"]["spec"]["containers"][0]
    env = {item["name"]: item.get("value") for item in container["env"]}
    empty = sorted(name for name, value in env.items() if not value or "{{" in str(value))
    assert not empty, f"empty or unresolved in the job's env (they would beat the Secret's envFrom): {empty}"
    # MLflow's and S3's settings come from the runtime Secret only.
    assert not {"MLFLOW_TRACKING_URI", "RECALL_DVC_REMOTE", "AWS_ACCESS_KEY_ID"} & set(env)
    assert container["envFrom"] == [{"secretRef": {"name": "recall-runtime"}}]
    assert env["RECALL_GIT_COMMIT"] == commit and env["PREFECT__FLOW_RUN_ID"] == str(flow_run.id)
    assert container["args"] == ["prefect", "flow-run", "execute"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1

    # `prefect flow-run execute` runs the deployment's pull steps, resolving their `{{ $VAR }}`
    # from the pod's environment (prefect deployments/steps/core.py): the applied commit is
    # cloned, its code installed, the shared remote pulled.
    steps = spec["pull"]  # kept unresolved by `prefect deploy` (cli/deploy/_core.py)
    pod_env = {**env, "RECALL_DVC_REMOTE": "s3://recall-dvc/dvc"}
    clone = apply_values(steps[0]["prefect.deployments.steps.git_clone"], pod_env)
    assert clone == {"id": "clone", "repository": "https://git.example/recall.git", "commit_sha": commit}
    assert [next(iter(step)) for step in steps] == [
        "prefect.deployments.steps.git_clone", "prefect.deployments.steps.set_working_directory",
        "prefect.deployments.steps.run_shell_script", "prefect.deployments.steps.run_shell_script"]
    assert "pip install" in steps[2]["prefect.deployments.steps.run_shell_script"]["script"]
    assert "dvc pull --run-cache" in steps[3]["prefect.deployments.steps.run_shell_script"]["script"]
    # A step run on a fresh machine works in its clone and sends its outputs back.
    assert deployment["parameters"] == {"project_dir": ".", "push": True}


def test_deploy_k8s_refuses_without_a_clone_url(tmp_path, monkeypatch):
    from flows.local import deploy_kubernetes

    with pytest.raises(RuntimeError, match="RECALL_GIT_URL is not set"):
        deploy_kubernetes(tmp_path, {"RECALL_GIT_URL": ""})
