"""Hiding credentials in text that may be shown: logs, status, error messages, pages, metrics."""

from __future__ import annotations

import re
from typing import Iterable

# user:password@ in a URL, up to the last @ before the path (a password may contain @).
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/\s]+@")
# key=value settings that carry secrets, in URL queries and GStreamer descriptions: rtspsrc's and
# souphttpsrc's user-pw and proxy-pw, SRT's passphrase, password=, ..._token=, ..._secret=.
_SECRET_SETTING = re.compile(
    r"(?i)\b(?P<key>[\w-]*(?:passphrase|password|passwd|-pw|secret|token))=(?:\"(?:[^\"\\]|\\.)*\"|'[^']*'|[^\s&!,;]*)"
)


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with ``user:password@`` in URLs, secret-looking ``key=value`` settings and every
    string in ``secrets`` replaced by ``***``."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    text = _USERINFO.sub(lambda match: f"{match.group('scheme')}***@", text)
    return _SECRET_SETTING.sub(lambda match: f"{match.group('key')}=***", text)
