"""`make stack`: the team stack of infra/compose.yaml without containers (PostgreSQL, an S3
API with the buckets, MLflow, Prefect), on 127.0.0.1, state and PIDs in one folder.

One module, over 400 lines: one class owning every process of the stack, its ports,
state folder and PIDs, so start and stop cannot disagree.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from devtools.scratch import CHECKOUT
from devtools.servers import StackError, wait_http
from pipeline.compat import TELEMETRY_OFF

# The compose file's host ports (tests/test_infra.py checks they agree), so the same client
# settings reach either stack. PostgreSQL's is not one of them: it stays off 5432, where a
# system PostgreSQL may listen.
STACK_PORTS = {"postgres": 55432, "s3": 9000, "mlflow": 5000, "prefect": 4200}


STACK_BUCKETS = ("recall-artifacts", "recall-dvc", "recall-stream")


ARTIFACTS_DESTINATION = "s3://recall-artifacts/mlflow"


# The workers' S3 grants: an AWS IAM policy, translated for SeaweedFS (compose's S3 server).
S3_POLICY = CHECKOUT / "infra" / "iam" / "recall-least-privilege-policy.json"


# SeaweedFS's identity actions (weed/s3api/auth_credentials.go, Identity.CanDo: "Action:bucket"
# or a wildcard "Action:bucket/prefix*") that cover each S3 action of the policy. Bucket-level
# reads (ListBucket, its multipart variant) become List on the whole bucket: SeaweedFS has no
# s3:prefix conditions. GetBucketLocation needs no grant there.
SEAWEEDFS_ACTIONS = {
    "s3:GetObject": "Read", "s3:PutObject": "Write", "s3:DeleteObject": "Write",
    "s3:AbortMultipartUpload": "Write", "s3:ListMultipartUploadParts": "Write",
    "s3:ListBucket": "List", "s3:ListBucketMultipartUploads": "List", "s3:GetBucketLocation": None,
}


# Stopped in this order (clients before the database).
STACK_SERVICES = ("prefect", "mlflow", "s3", "postgres")


def ensure_buckets(client) -> list[str]:
    """Create the stack's buckets that ``client``'s S3 API lacks; returns those created.
    compose's one-shot s3-init and `make stack` both call it."""
    existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
    created = [bucket for bucket in STACK_BUCKETS if bucket not in existing]
    for bucket in created:
        client.create_bucket(Bucket=bucket)
    return created


def seaweedfs_identities(policy: dict, admin: tuple[str, str], worker: tuple[str, str],
                         policy_name: str = str(S3_POLICY)) -> dict:
    """SeaweedFS's S3 identities: ``admin`` (access key, secret key) with every right, and
    ``worker`` with the grants of ``policy`` (an AWS IAM policy of Allow statements)."""
    actions: set[str] = set()
    for statement in policy["Statement"]:
        if statement.get("Effect") != "Allow":
            raise StackError(f"{policy_name}: statement {statement.get('Sid')!r}: only Allow statements translate")
        for action in statement["Action"]:
            if action not in SEAWEEDFS_ACTIONS:
                raise StackError(f"{policy_name}: statement {statement.get('Sid')!r}: {action} has no SeaweedFS "
                                 f"equivalent in SEAWEEDFS_ACTIONS (pipeline/devstack.py)")
            if SEAWEEDFS_ACTIONS[action] is None:
                continue
            for resource in statement["Resource"]:
                target = resource.removeprefix("arn:aws:s3:::")
                if target == resource:
                    raise StackError(f"{policy_name}: resource {resource!r} is not an S3 ARN")
                actions.add(f"{SEAWEEDFS_ACTIONS[action]}:{target}")
    for name, (key, secret) in (("admin", admin), ("worker", worker)):
        if not key or not secret:
            raise StackError(f"S3 identities: the {name}'s access key or secret key is empty")
    return {"identities": [
        {"name": "admin", "credentials": [{"accessKey": admin[0], "secretKey": admin[1]}],
         "actions": ["Admin", "Read", "Write", "List", "Tagging"]},
        {"name": "recall", "credentials": [{"accessKey": worker[0], "secretKey": worker[1]}],
         "actions": sorted(actions)},
    ]}


def write_private(path: Path, text: str, mode: int = 0o600) -> None:
    """Write ``text`` to ``path`` atomically (a temporary file beside it, renamed over it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _program(name: str) -> str:
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else (shutil.which(name) or name)


def _postgres_bindir() -> Path:
    """Debian keeps the server programs out of PATH, under /usr/lib/postgresql/<version>/bin."""
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parent.parent.name))
    if not versions:
        raise StackError("PostgreSQL is not installed: `apt-get install -y postgresql` (Debian's package)")
    return versions[-1].parent


def _as_postgres_user() -> list[str]:
    """PostgreSQL refuses to run as root: as root, run its programs as the package's user."""
    if os.geteuid() != 0:
        return []
    return ["runuser", "-u", "postgres", "--"]


def _zombie(pid: int) -> bool:
    """Exited but not yet reaped by its parent (the process that started the stack, while
    it runs): gone for every purpose here."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not _zombie(pid)


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getpgid(int(entry.name)) == pgid and not _zombie(int(entry.name)):
                    members.append(int(entry.name))
            except (ProcessLookupError, PermissionError):
                pass
    return members


class LocalStack:
    """The stack's folder: ``secrets.json`` (0600: database passwords), ``stack.json``
    (ports, URLs), ``pids/<service>``, ``logs/<service>.log``, ``pgdata/``."""

    def __init__(self, root: str | Path, ports: dict[str, int] | None = None):
        self.root = Path(root).resolve()
        self.ports = {**STACK_PORTS, **(ports or {})}
        self.logs = self.root / "logs"
        self.pids = self.root / "pids"

    @property
    def pg_home(self) -> Path:
        """Where PostgreSQL's data and socket live: in the stack's folder, unless its user
        cannot reach that folder (as root, under a 0700 home or pytest's temporary folders):
        then in a folder of its own under /var/tmp, named after the stack's folder. The choice
        is recorded so that restarts find the same cluster."""
        record = self.root / "pg-home"
        if record.exists():
            return Path(record.read_text().strip())
        self.root.mkdir(parents=True, exist_ok=True)
        home = self.root
        reachable = subprocess.run([*_as_postgres_user(), "test", "-x", str(self.root)]).returncode == 0
        if not reachable:
            import hashlib

            home = Path("/var/tmp") / f"recall-stack-{hashlib.sha256(str(self.root).encode()).hexdigest()[:12]}"
            home.mkdir(mode=0o700, exist_ok=True)
            self._chown_postgres(home)
        record.write_text(f"{home}\n")
        return home

    @property
    def pgdata(self) -> Path:
        return self.pg_home / "pgdata"

    @property
    def pgsocket(self) -> Path:
        return self.pg_home / "pgsocket"

    # ---- settings a client needs (no passwords but the S3 stand-in's dummy keys)
    @property
    def urls(self) -> dict[str, str]:
        return {
            "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{self.ports['mlflow']}",
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.ports['s3']}",
            "PREFECT_API_URL": f"http://127.0.0.1:{self.ports['prefect']}/api",
        }

    def _secrets(self) -> dict[str, str]:
        path = self.root / "secrets.json"
        if path.exists():
            return json.loads(path.read_text())
        values = {
            "postgres": secrets.token_hex(16), "mlflow": secrets.token_hex(16), "prefect": secrets.token_hex(16),
            # moto accepts any keys; random ones keep real credentials out of the stack.
            "s3_access_key": "stack" + secrets.token_hex(4), "s3_secret_key": secrets.token_hex(16),
        }
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(values, handle)
        return values

    def s3_env(self) -> dict[str, str]:
        keys = self._secrets()
        return {"AWS_ACCESS_KEY_ID": keys["s3_access_key"], "AWS_SECRET_ACCESS_KEY": keys["s3_secret_key"],
                "AWS_DEFAULT_REGION": "us-east-1"}

    def database_url(self, role: str, driver: str = "postgresql") -> str:
        return f"{driver}://{role}:{self._secrets()[role]}@127.0.0.1:{self.ports['postgres']}/{role}"

    def _record(self, service: str, pid: int) -> None:
        self.pids.mkdir(parents=True, exist_ok=True)
        (self.pids / service).write_text(f"{pid}\n")

    def recorded(self) -> dict[str, int]:
        return {p.name: int(p.read_text()) for p in sorted(self.pids.glob("*"))} if self.pids.exists() else {}

    # ---- PostgreSQL
    def _pg(self, program: str, *args: str, **kwargs) -> subprocess.CompletedProcess:
        command = [*_as_postgres_user(), str(_postgres_bindir() / program), *args]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120, **kwargs)
        if result.returncode != 0:
            raise StackError(f"PostgreSQL: {program} failed: {result.stderr.strip()[-1500:]}")
        return result

    def _chown_postgres(self, *paths: Path) -> None:
        if os.geteuid() == 0:
            for path in paths:
                shutil.chown(path, "postgres", "postgres")

    def start_postgres(self) -> int:
        fresh = not (self.pgdata / "PG_VERSION").exists()
        if fresh:
            self.pgdata.mkdir(parents=True, exist_ok=True, mode=0o700)
            pwfile = self.pg_home / ".pgpass-init"
            pwfile.write_text(self._secrets()["postgres"] + "\n")
            self._chown_postgres(self.pgdata, pwfile)
            try:
                self._pg("initdb", "-D", str(self.pgdata), "-U", "postgres", "--auth-local=trust",
                         "--auth-host=scram-sha-256", f"--pwfile={pwfile}", "--encoding=UTF8", "--locale=C")
            finally:
                pwfile.unlink(missing_ok=True)
        self.pgsocket.mkdir(exist_ok=True, mode=0o700)
        self._chown_postgres(self.pgsocket)
        options = (f"-c listen_addresses=127.0.0.1 -p {self.ports['postgres']} "
                   f"-c unix_socket_directories={self.pgsocket}")
        self._pg("pg_ctl", "-D", str(self.pgdata), "-l", str(self.pg_home / "postgres.log"), "-o", options, "-w", "-t", "60", "start")
        pid = int((self.pgdata / "postmaster.pid").read_text().split()[0])
        self._record("postgres", pid)
        if fresh:
            # The roles and databases as compose's postgres image makes them: the same script,
            # passwords in its environment, never on a command line.
            script = CHECKOUT / "infra" / "postgres" / "init-databases.sh"
            env = {"PATH": f"{_postgres_bindir()}{os.pathsep}{os.environ.get('PATH', os.defpath)}",
                   "PGHOST": str(self.pgsocket), "PGPORT": str(self.ports["postgres"]), "POSTGRES_USER": "postgres",
                   "MLFLOW_DB_PASSWORD": self._secrets()["mlflow"], "PREFECT_DB_PASSWORD": self._secrets()["prefect"]}
            # On stdin and from the cluster's folder: PostgreSQL's user may not reach the checkout.
            # runuser resets PATH; `env` sets it again.
            command = [*_as_postgres_user(), "env", f"PATH={env['PATH']}", "bash", "-s"]
            result = subprocess.run(command, env={**os.environ, **env}, input=script.read_text(), cwd=self.pg_home,
                                    capture_output=True, text=True, timeout=120)
            if result.returncode != 0:
                raise StackError(f"PostgreSQL: {script} failed: {result.stderr.strip()[-1500:]}")
        return pid

    def stop_postgres(self, timeout: float = 60) -> None:
        pid = self.recorded().get("postgres")
        if pid is None:
            return
        if _alive(pid) and "postgres" in _cmdline(pid):
            os.kill(pid, signal.SIGINT)  # "fast" shutdown: ends sessions, no recovery at next start
            deadline = time.monotonic() + timeout
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            if _alive(pid):
                os.kill(pid, signal.SIGQUIT)
        (self.pids / "postgres").unlink(missing_ok=True)

    # ---- processes started here: each the leader of its own session, stopped as a group
    def _spawn(self, service: str, command: list[str], env: dict[str, str]) -> subprocess.Popen:
        self.logs.mkdir(parents=True, exist_ok=True)
        with open(self.logs / f"{service}.log", "ab") as log_file:
            process = subprocess.Popen(command, env={**os.environ, **env}, stdout=log_file, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True, cwd=self.root)
        self._record(service, process.pid)
        return process

    def start_s3(self, timeout: float = 60) -> None:
        port = self.ports["s3"]
        process = self._spawn("s3", [_program("moto_server"), "-H", "127.0.0.1", "-p", str(port)], {})
        endpoint = self.urls["AWS_ENDPOINT_URL"]
        wait_http(f"{endpoint}/moto-api/", "moto_server (S3)", self.logs / "s3.log", lambda: process.poll() is None, timeout)
        import boto3

        client = boto3.client("s3", endpoint_url=endpoint, **{
            "aws_access_key_id": self.s3_env()["AWS_ACCESS_KEY_ID"],
            "aws_secret_access_key": self.s3_env()["AWS_SECRET_ACCESS_KEY"], "region_name": "us-east-1"})
        ensure_buckets(client)

    def start_mlflow(self, timeout: float = 180) -> None:
        env = {
            # Read by `mlflow server` as --backend-store-uri: the password stays off the command line.
            "MLFLOW_BACKEND_STORE_URI": self.database_url("mlflow"),
            "MLFLOW_S3_ENDPOINT_URL": self.urls["AWS_ENDPOINT_URL"],
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            **TELEMETRY_OFF,
            **self.s3_env(),
        }
        process = self._spawn("mlflow", [
            _program("mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.ports["mlflow"]), "--workers", "1",
            "--artifacts-destination", ARTIFACTS_DESTINATION,
        ], env)
        wait_http(f"{self.urls['MLFLOW_TRACKING_URI']}/health", "mlflow server", self.logs / "mlflow.log",
                   lambda: process.poll() is None, timeout)

    def start_prefect(self, timeout: float = 180) -> bool:
        try:
            import prefect  # noqa: F401
        except ImportError:
            return False
        home = self.root / "prefect"
        home.mkdir(parents=True, exist_ok=True)
        env = {
            "PREFECT_HOME": str(home),
            "PREFECT_API_DATABASE_CONNECTION_URL": self.database_url("prefect", "postgresql+asyncpg"),
            **TELEMETRY_OFF,
            "PREFECT_API_URL": self.urls["PREFECT_API_URL"],
        }
        process = self._spawn("prefect", [
            _program("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(self.ports["prefect"]),
        ], env)
        wait_http(f"{self.urls['PREFECT_API_URL']}/health", "prefect server", self.logs / "prefect.log",
                   lambda: process.poll() is None, timeout)
        return True

    def stop_service(self, service: str, timeout: float = 30) -> None:
        if service == "postgres":
            return self.stop_postgres()
        pid = self.recorded().get(service)
        if pid is None:
            return
        members = _group_members(pid)
        if members:
            os.killpg(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while _group_members(pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            if _group_members(pid):
                os.killpg(pid, signal.SIGKILL)
        (self.pids / service).unlink(missing_ok=True)

    # ---- the whole stack
    def up(self) -> dict[str, str]:
        if running := [s for s, pid in self.recorded().items() if _alive(pid)]:
            raise StackError(f"{self.root}: already running ({', '.join(running)}); `make stack-down` first")
        try:
            self.start_postgres()
            self.start_s3()
            self.start_mlflow()
            with_prefect = self.start_prefect()
        except BaseException:
            self.down()
            raise
        settings = {**self.urls, **self.s3_env()}
        if not with_prefect:
            settings.pop("PREFECT_API_URL")
        (self.root / "stack.json").write_text(json.dumps({"ports": self.ports, "settings": settings}, indent=2) + "\n")
        env_file = self.root / "env"
        env_file.write_text("".join(f"export {k}={v}\n" for k, v in settings.items()))
        return settings

    def down(self) -> list[str]:
        stopped = []
        for service in STACK_SERVICES:
            if service in self.recorded():
                self.stop_service(service)
                stopped.append(service)
        return stopped


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _s3_command(args: list[str]) -> int:
    """compose's S3 one-shots: ``s3-identities FILE`` (s3-config) and ``s3-buckets`` (s3-init)."""
    if args[0] == "s3-identities":
        if len(args) != 2:
            print("usage: python -m pipeline.devstack s3-identities FILE", file=sys.stderr)
            return 2
        env = os.environ
        try:
            missing = [k for k in ("S3_ADMIN_ACCESS_KEY", "S3_ADMIN_SECRET_KEY", "RECALL_S3_ACCESS_KEY",
                                   "RECALL_S3_SECRET_KEY") if not env.get(k)]
            if missing:
                raise StackError(f"S3 identities: {', '.join(missing)} not set")
            identities = seaweedfs_identities(
                json.loads(S3_POLICY.read_text()), (env["S3_ADMIN_ACCESS_KEY"], env["S3_ADMIN_SECRET_KEY"]),
                (env["RECALL_S3_ACCESS_KEY"], env["RECALL_S3_SECRET_KEY"]))
            # 0644: SeaweedFS drops to its own user; the file sits on a volume only it and
            # this one-shot mount.
            write_private(Path(args[1]), json.dumps(identities, indent=2) + "\n", mode=0o644)
        except StackError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(f"S3 identities: admin, recall ({len(identities['identities'][1]['actions'])} grants) -> {args[1]}")
        return 0
    import boto3

    created = ensure_buckets(boto3.client("s3"))
    print(f"buckets: {', '.join(STACK_BUCKETS)} (created: {', '.join(created) or 'none'})")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.devstack up|down [folder]`` (infra/local/up and down), and
    ``s3-identities FILE`` / ``s3-buckets`` (infra/compose.yaml's S3 one-shots)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("s3-identities", "s3-buckets"):
        return _s3_command(args)
    if not args or args[0] not in ("up", "down"):
        print("usage: python -m pipeline.devstack up|down [folder, default .stack] | s3-identities FILE | s3-buckets",
              file=sys.stderr)
        return 2
    stack = LocalStack(args[1] if len(args) > 1 else ".stack")
    try:
        if args[0] == "up":
            settings = stack.up()
            print(f"stack up; its settings: source {stack.root / 'env'}")
            for key in ("MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "PREFECT_API_URL"):
                if key in settings:
                    print(f"  {key}={settings[key]}")
            print(f"  buckets: {', '.join(STACK_BUCKETS)}; logs in {stack.logs}")
        else:
            stopped = stack.down()
            print(f"stopped: {', '.join(stopped)}" if stopped else f"{stack.root}: nothing recorded as running")
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
