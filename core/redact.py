"""Storage secrets never reach a file or the console: configs are redacted before they are written.

fsspec storage options carry credentials under many names (s3fs `key`/`secret`/`token`, botocore
`aws_secret_access_key`, gcsfs `token`, adlfs `account_key`/`sas_token`/`client_secret`, http
`password` or an `Authorization` header). Any key whose name contains one of the words below is
replaced, at any depth, so the rest of the config (endpoint, region) stays readable.
"""

from __future__ import annotations

from typing import Any

REDACTED = "<redacted>"
SECRET_WORDS = ("key", "secret", "token", "passw", "credential", "auth", "signature", "sas", "cookie")


def is_secret_name(name: str) -> bool:
    low = str(name).lower()
    return any(word in low for word in SECRET_WORDS)


def redact_secrets(value: Any) -> Any:
    """A copy of `value` (dicts, lists, scalars) with the values of secret-named keys replaced."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out[k] = REDACTED if is_secret_name(k) and v is not None else redact_secrets(v)
        return out
    if isinstance(value, (list, tuple)):
        return [redact_secrets(v) for v in value]
    return value
