"""What may be sent to MLflow: nothing whose key looks like a secret, no credentials inside a URL,
no value longer than MLflow takes. URL credentials are redacted by the one helper for that,
`disent.io.urls.redact_url_credentials`."""
from __future__ import annotations

import re
from typing import Any

from disent.io.urls import redact_url_credentials

MAX_PARAM_VALUE = 6000  # MLflow's limit on a param value
SECRET_KEY = re.compile(r"(key|secret|token|password|passwd|credential|auth)", re.IGNORECASE)


def looks_secret(key: str) -> bool:
    """True when the last part of a dotted key names a secret (`s3.secret_access_key`, `auth_token`)."""
    return bool(SECRET_KEY.search(key.rsplit(".", 1)[-1]))


def safe_value(value: Any) -> str:
    """A param or tag value as MLflow gets it: stringified, URL credentials redacted, capped."""
    return redact_url_credentials("" if value is None else str(value))[:MAX_PARAM_VALUE]


def safe_params(flat: dict[str, Any]) -> dict[str, str]:
    """MLflow params from a flattened config: secrets skipped, values stringified and capped."""
    return {key: safe_value(value) for key, value in flat.items() if not looks_secret(key)}


def safe_tags(tags: dict[str, Any]) -> dict[str, str]:
    """MLflow tags: secrets and None values skipped, values stringified and capped."""
    return {key: safe_value(value) for key, value in tags.items() if value is not None and not looks_secret(key)}
