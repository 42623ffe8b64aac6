"""The project's DVC remote: where state shared between machines lives (design §7).

A worker on a fresh machine clones the repo, pulls what its stages need (run cache
included), runs, and pushes. This module writes the one piece of that which belongs in
the repo, the remote's location, into ``.dvc/config``. Credentials and region never go
there: the repo is shared and the AWS environment (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``, ``AWS_PROFILE``, ...) already says them
to DVC, boto3 and every other AWS client on the machine.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from pipeline.errors import UserError, redact_url

DEFAULT_NAME = "storage"

# DVC has no setting that makes `dvc push`/`dvc pull` carry the run cache (DVC 3.x: only
# the --run-cache flag), so every command we print spells it out. --allow-missing: the
# stages of tasks that have not run anywhere yet have no outputs to pull, and a plain
# `dvc pull` fails on them (exit 1) after fetching everything else.
PUSH_COMMAND = "dvc push --run-cache"
PULL_COMMAND = "dvc pull --run-cache --allow-missing"

# Options of DVC's S3 (and other) remotes that hold secrets. They may live in the
# git-ignored .dvc/config.local or the environment, never in the shared .dvc/config.
SECRET_OPTIONS = (
    "access_key_id", "secret_access_key", "session_token", "password", "account_key", "sas_token",
    "connection_string", "client_secret", "gdrive_client_secret", "key_secret", "oss_key_secret",
)
# Region and credential files are per machine too (design §6: "never from the repo").
MACHINE_OPTIONS = ("region", "profile", "credentialpath")

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_REMOTE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


class RemoteError(UserError):
    """A remote that cannot be configured as asked; the message names what and why."""


@dataclass(frozen=True)
class RemoteSpec:
    name: str
    url: str
    endpoint_url: str | None

    @property
    def is_s3(self) -> bool:
        return self.url.startswith("s3://")

    @property
    def bucket(self) -> str | None:
        return urlsplit(self.url).netloc if self.is_s3 else None


def _refuse_embedded_credentials(url: str, what: str) -> None:
    parts = urlsplit(url)
    query = parts.query.lower()
    if "@" in parts.netloc or any(k in query for k in ("credential", "signature", "secret", "token", "key=")):
        raise RemoteError(
            f"{what} {redact_url(url)} carries credentials; credentials are never stored in the repo: "
            "give them through the AWS environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY or AWS_PROFILE)"
        )


def validate(url: str, endpoint_url: str | None = None, name: str = DEFAULT_NAME) -> RemoteSpec:
    """Check a remote's URL, endpoint and name; return them normalised."""
    if not _REMOTE_NAME.match(name):
        raise RemoteError(f"remote name {name!r}: use lowercase letters, digits, '-' and '_'")
    url = url.strip()
    if not url:
        raise RemoteError("remote URL is empty: give s3://bucket/prefix or a local folder")
    _refuse_embedded_credentials(url, "remote URL")
    scheme = urlsplit(url).scheme
    if scheme == "s3":
        parts = urlsplit(url)
        if not _BUCKET.match(parts.netloc):
            raise RemoteError(
                f"remote URL {url}: {parts.netloc!r} is not an S3 bucket name "
                "(3-63 lowercase letters, digits, '.' or '-'); expected s3://bucket/prefix"
            )
        if parts.query or parts.fragment:
            raise RemoteError(f"remote URL {url}: expected s3://bucket/prefix, without '?' or '#'")
        url = f"s3://{parts.netloc}{parts.path.rstrip('/')}"
    elif scheme and re.match(r"^[a-z][a-z0-9+.-]*://", url, re.IGNORECASE):
        raise RemoteError(f"remote URL {url}: unsupported scheme {scheme}://; expected s3://bucket/prefix or a local folder")
    elif Path(url).exists() and not Path(url).is_dir():
        raise RemoteError(f"remote URL {url}: a local remote must be a folder, and this is a file")
    if endpoint_url is not None:
        endpoint_url = endpoint_url.strip()
        _refuse_embedded_credentials(endpoint_url, "endpoint URL")
        parts = urlsplit(endpoint_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise RemoteError(f"endpoint URL {endpoint_url}: expected http(s)://host[:port]")
        if scheme != "s3":
            raise RemoteError(f"--endpoint-url {endpoint_url} applies to s3:// remotes only, not to {url}")
    return RemoteSpec(name=name, url=url, endpoint_url=endpoint_url)


def find_project(start: Path | None = None) -> Path:
    """The DVC project holding ``start`` (default: the working directory)."""
    start = (start or Path.cwd()).resolve()
    for folder in (start, *start.parents):
        if (folder / ".dvc").is_dir():
            return folder
    raise RemoteError(f"{start} is not inside a DVC project (no .dvc folder above it); run `dvc init` first")


def check_reachable(spec: RemoteSpec) -> None:
    """Fail in bounded time, with one line naming bucket and endpoint, if the S3 bucket
    cannot be listed with this machine's AWS environment (the stream source's client and
    error wording: one S3 implementation)."""
    if not spec.is_s3:
        return
    from pipeline.stream.s3 import SourceError, call_s3, s3_client

    client = s3_client(spec.endpoint_url)
    try:
        # A listing, not head_bucket: HEAD answers carry no error code to tell a missing
        # bucket from a wrong endpoint.
        call_s3(lambda: client.list_objects_v2(Bucket=spec.bucket, MaxKeys=1),
                bucket=spec.bucket, endpoint_url=spec.endpoint_url)
    except SourceError as exc:
        raise RemoteError(f"{exc}; or pass --no-check to configure it anyway") from None


def _require_s3_plugin() -> None:
    try:
        import dvc_s3  # noqa: F401
    except ImportError:
        raise RemoteError("s3:// remotes need DVC's S3 plugin: pip install 'dvc-s3>=3.2'") from None


def configure(spec: RemoteSpec, project: Path, check: bool = True) -> dict:
    """Make ``spec`` the project's default DVC remote (what ``dvc remote add -d -f`` and
    ``dvc remote modify NAME endpointurl`` write), and return the remote's section as written."""
    from dvc.config import Config, ConfigError

    if spec.is_s3:
        _require_s3_plugin()
    if check:
        check_reachable(spec)
    config = Config(dvc_dir=str(project / ".dvc"))
    section = {"url": spec.url}
    if spec.endpoint_url:
        section["endpointurl"] = spec.endpoint_url
    try:
        with config.edit("repo") as conf:
            # Replacing the whole section (as `dvc remote add -f` does) also drops any
            # secret an older version of this remote had in the shared file.
            conf["remote"][spec.name] = section
            conf["core"]["remote"] = spec.name
            # Raising inside the edit leaves the file as it was.
            refuse_stored_secrets(conf, project / ".dvc" / "config")
    except ConfigError as exc:
        raise RemoteError(f"{project / '.dvc' / 'config'}: {exc}") from None
    return section


def refuse_stored_secrets(conf: dict, where: Path) -> None:
    """Fail if a shared DVC config holds a secret or a per-machine option of any remote
    (left there by hand or by an older tool), naming the option, never its value."""
    found = [
        f"remote '{name}' option {option}"
        for name, section in conf.get("remote", {}).items()
        for option in section
        if option in SECRET_OPTIONS or option in MACHINE_OPTIONS
    ]
    if found:
        raise RemoteError(
            f"{where} (committed to git) holds {', '.join(found)}: remove them "
            "(`dvc remote modify --unset NAME OPTION`) and give them through the AWS environment, "
            "or `dvc remote modify --local NAME OPTION VALUE` for this machine only"
        )
