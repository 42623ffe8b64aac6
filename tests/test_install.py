"""`make install` hands pip's settings to uv: a user whose pip reads a private index, local
wheels or constraints gets the same versions from uv as from pip."""

from devtools.install import pip_settings, uv_arguments

LISTING = """\
:env:.cert='/etc/ssl/certs/ca-certificates.crt'
:env:.default-timeout='180'
:env:.find-links='/opt/wheels'
global.constraint='/etc/xdg/pip/constraints.txt'
global.extra-index-url='file:///opt/pypi/simple file:///opt/pypi-more/simple'
global.find-links='/opt/ignored-by-env'
global.index-url='https://mirror.example/simple'
user.index-url='https://not-for-install.example/simple'
"""


def test_pip_settings_give_uv_the_same_indexes_wheels_and_constraints():
    args, env = uv_arguments(pip_settings(LISTING))
    pairs = list(zip(args[::2], args[1::2]))
    assert ("--index-strategy", "unsafe-best-match") in pairs  # pip's choice across indexes
    assert ("--index-url", "https://mirror.example/simple") in pairs
    assert [v for k, v in pairs if k == "--extra-index-url"] == ["file:///opt/pypi/simple", "file:///opt/pypi-more/simple"]
    # PIP_FIND_LINKS overrides the config file's value, as it does for pip.
    assert [v for k, v in pairs if k == "--find-links"] == ["/opt/wheels"]
    assert [v for k, v in pairs if k == "--constraint"] == ["/etc/xdg/pip/constraints.txt"]
    assert env == {"SSL_CERT_FILE": "/etc/ssl/certs/ca-certificates.crt", "UV_HTTP_TIMEOUT": "180"}


def test_no_pip_settings_leave_uv_on_its_defaults():
    assert uv_arguments(pip_settings("")) == (["--index-strategy", "unsafe-best-match"], {})


def test_the_environment_imports_torch_from_compiled_bytecode():
    """uv leaves bytecode uncompiled unless asked; with PYTHONDONTWRITEBYTECODE set nothing
    writes it later, and every stage's process then compiles torch's sources again."""
    import importlib.util
    from pathlib import Path

    import torch

    assert Path(importlib.util.cache_from_source(torch.__file__)).exists()
