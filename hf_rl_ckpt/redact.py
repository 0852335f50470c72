"""Secrets out of everything hf_rl_ckpt writes or pushes: config.yaml, model cards, the training configuration.

A secret is found two ways, since configurations name them in many ways and command lines
and URLs carry them inside ordinary values:

- by key: a value under a key that names a secret (token, secret, password/passwd/pwd,
  api/access/private key, key ids, auth/authorization, credential, cookie, connection
  string, s3fs's bare `key`) is replaced whole. Booleans and numbers stay (`hub_private: true`
  is a setting, not a secret);
- by value: in every string, a password in a URL (`postgres://user:PW@host`), a bearer or basic
  `Authorization` value, a Hugging Face token (`hf_...`), an AWS access key id (`AKIA...`), a
  GitHub/OpenAI-style key (`ghp_...`, `sk-...`), a private key block, and the value of a
  command-line option whose name names a secret (`--hub_token=...`, `--password X`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

REDACTED = "<redacted>"

# `key` alone: s3fs's access key id; `account_key`, `connection_string`, `sas_token`: Azure's (adlfs).
_SECRET_NAME = (
    r"token|secret|passw|pwd|api_?key|apikey|access_?key|private_?key|key_?id|^key$|account_key|auth(?!ors?$)|credential|cookie"
    r"|connection_?string|signature|session_?id"
)
SECRET_KEY = re.compile(_SECRET_NAME, re.IGNORECASE)

_SECRET_VALUES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(-----END [A-Z ]*PRIVATE KEY-----|$)", re.DOTALL), REDACTED),
    (re.compile(r"(?P<keep>[a-z][a-z0-9+.-]*://[^/\s:@]*:)[^@/\s]+(?=@)", re.IGNORECASE), rf"\g<keep>{REDACTED}"),
    (re.compile(r"(?P<keep>\b(?:bearer|basic)\s+)(?=[A-Za-z0-9._~+/=-]*\d)[A-Za-z0-9._~+/=-]{16,}", re.IGNORECASE), rf"\g<keep>{REDACTED}"),
    (re.compile(rf"(?P<keep>--?[\w.-]*(?:{_SECRET_NAME})[\w.-]*(?:=|\s+))(?!-)\S+", re.IGNORECASE), rf"\g<keep>{REDACTED}"),
    (re.compile(r"\bhf_[A-Za-z0-9]{20,}"), REDACTED),
    (re.compile(r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA)[A-Z0-9]{16}\b"), REDACTED),
    (re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{30,}|github_pat_\w{30,}|sk-[A-Za-z0-9_-]{20,}|xox[abpr]-[A-Za-z0-9-]{10,})"), REDACTED),
)


_SECRET_OPTION = re.compile(rf"--?[\w.-]*(?:{_SECRET_NAME})[\w.-]*", re.IGNORECASE)


def redact_text(text: str) -> str:
    """`text` with every secret-looking value in it replaced by '<redacted>' (URL passwords, tokens, keys, secret options)."""
    for pattern, replacement in _SECRET_VALUES:
        text = pattern.sub(replacement, text)
    return text


def redact_secrets(value: Any) -> Any:
    """Copy of a nested dict/list/str with secrets replaced by '<redacted>': values under secret-naming keys, secrets inside strings."""
    if isinstance(value, Mapping):
        return {key: _redact_under(key, item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):  # an argv list: the item after `--password` is its value
        return [
            REDACTED if index and _SECRET_OPTION.fullmatch(str(value[index - 1])) else redact_secrets(item) for index, item in enumerate(value)
        ]
    if isinstance(value, str):
        return redact_text(value)
    return value


def _redact_under(key: Any, value: Any) -> Any:
    if isinstance(key, str) and SECRET_KEY.search(key) and value is not None and not isinstance(value, (bool, int, float)):
        return REDACTED
    return redact_secrets(value)
