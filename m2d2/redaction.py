"""Credentials out of everything this pipeline logs, writes or prints.

Tracking URIs, database URLs and object-store links may carry secrets (``http://user:pass@host``,
``postgresql+psycopg2://mlflow:pw@db/mlflow``, presigned ``...?X-Amz-Signature=...``). They reach MLflow params and
tags, the pipeline summary and the command line through configs and the environment, and every one of those is
readable by far more people than the secret was meant for. :func:`redact` is applied where values leave the
process; it masks the userinfo of every URL in a string and the values of token-like query parameters, and keeps
the rest of the URL as it was.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote_plus

__all__ = ["MASK", "SENSITIVE_QUERY_KEYS", "redact", "redact_url"]

MASK = "***"

#: Query parameters whose value is a secret, compared case-insensitively without ``-`` and ``_``
#: (``X-Amz-Signature`` -> ``xamzsignature``): presigned S3/GCS links, OAuth tokens, Azure SAS ``sig``, passwords.
SENSITIVE_QUERY_KEYS = frozenset({
    "xamzsignature", "xamzcredential", "xamzsecuritytoken", "xgoogsignature", "xgoogcredential",
    "token", "accesstoken", "refreshtoken", "idtoken", "authtoken", "sessiontoken",
    "accesskey", "accesskeyid", "secret", "secretkey", "secretaccesskey", "clientsecret", "apikey",
    "password", "passwd", "pwd", "sig", "signature",
})  # fmt: skip

_SCHEME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+.-")
# A URL inside free text ends at whitespace or a quote (or where the next URL starts).
_END = re.compile(r"[\s\"'<>`]")
# key=value after '?', '&', ';' or '#': the query, and fragments (OAuth's "#access_token=..."). The query of a
# URL that ends where a nested one starts ("?next=https://...&token=t") continues in that one, without its '?'.
_PARAM = re.compile(r"(?P<lead>[?&;#])(?P<key>[^=?&;#/]+)=(?P<value>[^&;#]*)")
# Sentence punctuation after a URL in text ("see http://u:p@host."), kept out of what is parsed.
_TRAILING = ".,;:!?)}]"


def _normal(key: str) -> str:
    return unquote_plus(key).lower().replace("-", "").replace("_", "")


def _mask_param(match: re.Match[str]) -> str:
    return f"{match['lead']}{match['key']}={MASK}" if _normal(match["key"]) in SENSITIVE_QUERY_KEYS else match[0]


def _redact_one(rest: str) -> str:
    """What follows one URL's ``scheme://``, with its userinfo and secret query values masked.

    Split by hand rather than with ``urlsplit``/``urlunsplit``: the round trip rewrites some URIs
    (``sqlite:///mlflow.db`` comes back as ``sqlite:/mlflow.db``) and rejects others (an unclosed IPv6 bracket).
    The split follows RFC 3986 as ``urlsplit`` does: the authority ends at the first ``/``, ``?`` or ``#``, and
    the userinfo is everything before its last ``@``.
    """
    stripped = rest.rstrip(_TRAILING)
    tail = rest[len(stripped) :]  # set aside while parsing, put back as it was (an IPv6 host's ']' too)
    cut = re.search(r"[/?#]", stripped)
    authority, after = (stripped[: cut.start()], stripped[cut.start() :]) if cut else (stripped, "")
    if "@" in authority:
        authority = f"{MASK}@{authority.rpartition('@')[2]}"
    return f"{authority}{_PARAM.sub(_mask_param, after)}{tail}"


def redact_url(s: str) -> str:
    """``s`` with the credentials of every URL inside it masked (``http://u:p@host`` -> ``http://***@host``).

    Masks the userinfo (``user:pass@`` and a bare ``user@``) and the values of token-like query parameters
    (:data:`SENSITIVE_QUERY_KEYS`); everything else, text around the URLs included, is kept as it is.
    """
    if "://" not in s:  # the common case, and the cheap one: no URL, nothing to parse
        return s
    # Each "://" starts a URL whose scheme is the run of scheme characters before it. Found by scanning for the
    # separator rather than with one regex over the string, which would backtrack quadratically on long values.
    seps = [m.start() for m in re.finditer("://", s)]
    starts = []
    for i, sep in enumerate(seps):
        start, floor = sep, (seps[i - 1] + 3 if i else 0)
        while start > floor and s[start - 1] in _SCHEME_CHARS:
            start -= 1
        starts.append(start)
    out, pos = [], 0
    for i, sep in enumerate(seps):
        limit = starts[i + 1] if i + 1 < len(seps) else len(s)  # "http://a,http://b" is two URLs
        end = _END.search(s, sep + 3, limit)
        stop = end.start() if end else limit
        out += [s[pos : sep + 3], _redact_one(s[sep + 3 : stop])]
        pos = stop
    out.append(s[pos:])
    return "".join(out)


def redact(obj: Any) -> Any:
    """A copy of ``obj`` with :func:`redact_url` applied to every string in it, keys included.

    Walks mappings, dataclass instances (which come back as dicts, as they are logged), lists, tuples
    (named tuples keep their type) and sets; other values are returned as they are.
    """
    if isinstance(obj, str):
        return redact_url(obj)
    if isinstance(obj, Mapping):
        return {redact(k): redact(v) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: redact(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    if isinstance(obj, tuple):
        items = [redact(v) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
    if isinstance(obj, set | frozenset):
        return type(obj)(redact(v) for v in obj)
    return obj
