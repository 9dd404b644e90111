"""URLs with credentials in them (`scheme://user:password@host`) and their redaction, wherever a URL
is shown or stored: config checks refuse them, tracking redacts every value it sends."""
from __future__ import annotations

import re

URL_CREDENTIALS = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@")


def redact_url_credentials(value: str) -> str:
    """`scheme://user:password@host` -> `scheme://***@host`, anywhere inside value."""
    return URL_CREDENTIALS.sub(lambda m: m.group("scheme") + "***@", value)
