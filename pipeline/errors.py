"""The two kinds of error the CLI turns into one clear line, and their exit codes.

Every error a user can cause (bad input, a config that cannot be used, a missing or
corrupt file) derives from :class:`UserError`: exit 2, the flows do not retry it. A server
or source that does not answer derives from :class:`Unavailable`: exit 75 (sysexits'
EX_TEMPFAIL), the flows retry it. A new error class picks one of the two and is handled
everywhere at once; anything else is a bug (exit 1, ``recall -v`` for the traceback).
"""

from __future__ import annotations

BAD_INPUT_EXIT_CODE = 2
UNAVAILABLE_EXIT_CODE = 75


class UserError(ValueError):
    """The input's fault; the message names the file, class, key, bucket or batch."""


class Unavailable(Exception):
    """A server or source the step needs does not answer; it may in a minute."""


def exit_code_of(exc: BaseException) -> int:
    """75 for a server that does not answer (checked first: an unreachable source is also a
    source error), 2 for any other error the user caused."""
    return UNAVAILABLE_EXIT_CODE if isinstance(exc, Unavailable) else BAD_INPUT_EXIT_CODE


def redact_url(url: str) -> str:
    """``url`` fit for a message or a log: any user:password part becomes ``***@`` and any
    query (where a presigned URL keeps its signature) ``***``. The one redaction rule."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    netloc = f"***@{parts.netloc.rsplit('@', 1)[1]}" if "@" in parts.netloc else parts.netloc
    return parts._replace(netloc=netloc, query="***" if parts.query else "").geturl()


def redact_urls_in(text: str) -> str:
    """Free text (an exception's message) with every URL in it passed through :func:`redact_url`."""
    import re

    return re.sub(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+", lambda m: redact_url(m.group(0)), text)
