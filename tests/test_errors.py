"""One error boundary: every error a user can cause exits 2, a server that does not answer 75."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.errors import BAD_INPUT_EXIT_CODE, UNAVAILABLE_EXIT_CODE, Unavailable, UserError

REPO = Path(__file__).resolve().parents[1]
# Raised and caught inside one module (private, or named here), never reaching the CLI.
INTERNAL = {"pipeline.stream.ledger.EntryTaken", "pipeline.stream.s3.MissingKey", "devtools.servers.StackError"}


def _exception_classes():
    for path in sorted((REPO / "pipeline").rglob("*.py")):
        module = path.relative_to(REPO).with_suffix("").as_posix().replace("/", ".").removesuffix(".__init__")
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef) and (node.name.endswith(("Error", "Mismatch", "Unavailable", "Unreachable"))
                                                   or any(getattr(b, "id", "") in ("Exception", "ValueError", "RuntimeError")
                                                          for b in node.bases)):
                yield module, node.name


def test_every_error_class_is_a_user_error_or_unavailable():
    """A new error class cannot be forgotten by the CLI: it derives from one of the two."""
    classes = [(m, n) for m, n in _exception_classes() if f"{m}.{n}" not in INTERNAL and not n.startswith("_")]
    assert len(classes) > 10
    loose = []
    for module, name in classes:
        cls = getattr(importlib.import_module(module), name)
        if cls in (UserError, Unavailable):
            continue
        if not issubclass(cls, (UserError, Unavailable)):
            loose.append(f"{module}.{name}")
    assert not loose, f"error classes outside the boundary (exit 1 and retried by the flows): {loose}"


@pytest.mark.parametrize("error, code", [
    ("pipeline.method.head.HeadError", BAD_INPUT_EXIT_CODE),
    ("pipeline.stages._common.TaskInputError", BAD_INPUT_EXIT_CODE),
    ("pipeline.tracking.runs.TrackingServerError", UNAVAILABLE_EXIT_CODE),
    ("pipeline.stream.s3.SourceUnreachable", UNAVAILABLE_EXIT_CODE),
])
def test_the_cli_exits_with_the_errors_code(monkeypatch, error, code):
    from pipeline import cli
    from pipeline.stages import report as report_stage

    module, name = error.rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name)

    def fail(*args, **kwargs):
        raise cls("task 3: what went wrong, named")

    monkeypatch.setattr(report_stage, "summary", fail)
    result = CliRunner().invoke(cli.app, ["summary"])
    assert result.exit_code == code
    assert "what went wrong, named" in result.output


def test_one_redaction_rule_for_every_url_in_a_message():
    from pipeline.errors import redact_url, redact_urls_in

    assert redact_url("http://user:secret@127.0.0.1:5000/api") == "http://***@127.0.0.1:5000/api"
    assert redact_url("https://bucket.s3.example/key?X-Amz-Signature=abc") == "https://bucket.s3.example/key?***"
    assert redact_url("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    text = redact_urls_in("lost http://u:p@a.example/x, then s3://k:s@bucket/p?token=t")
    assert "secret" not in text and ":p@" not in text and "token" not in text and "***@a.example/x" in text
