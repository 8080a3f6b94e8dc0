"""The object-store retry layer (``m2d2.io.retrying``): what counts as transient, the backoff, the error that names
the object. The drill against a real S3 API behind a fault-injecting proxy is tests/integration/test_storage_faults.py."""

from __future__ import annotations

import errno
import random

import pytest

from m2d2 import io
from m2d2.io import RetryPolicy, StorageError, is_transient, retrying

FAST = RetryPolicy(attempts=4, base_s=0.0, cap_s=0.0)


class Flaky:
    """Fails with ``errors`` in turn, then returns ``"ok"``; counts its calls."""

    def __init__(self, *errors: BaseException):
        self.errors, self.calls = list(errors), 0

    def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


def test_transient_faults_are_retried_until_the_operation_succeeds():
    before = io.retry_counts()
    op = Flaky(OSError(errno.EBUSY, "SlowDown"), ConnectionResetError(), TimeoutError())
    assert retrying(op, "s3://bucket/key", "read", FAST) == "ok" and op.calls == 4
    assert io.retry_counts()["retried"] - before["retried"] == 3


@pytest.mark.parametrize("error", [FileNotFoundError("gone"), PermissionError("denied"), ValueError("bad input"),
                                   OSError(errno.EINVAL, "malformed"), io.UnsafePathError("../x")])
def test_permanent_errors_are_raised_at_once(error):
    op = Flaky(error)
    with pytest.raises(type(error)):
        retrying(op, "s3://bucket/key", "read", FAST)
    assert op.calls == 1


def test_a_store_that_keeps_failing_gives_a_storage_error_naming_the_object():
    op = Flaky(*[OSError(errno.EREMOTEIO, "InternalError")] * 10)
    with pytest.raises(StorageError, match=r"s3://bucket/ckpt/model\.safetensors: write failed 4 times") as caught:
        retrying(op, "s3://bucket/ckpt/model.safetensors", "write", FAST)
    assert op.calls == 4 and caught.value.uri == "s3://bucket/ckpt/model.safetensors"
    assert isinstance(caught.value, OSError) and isinstance(caught.value.__cause__, OSError)
    assert not is_transient(caught.value)  # an outer retry loop does not multiply the attempts


def test_a_local_path_is_tried_once():
    op = Flaky(OSError(errno.EIO, "disk"))
    with pytest.raises(OSError, match="disk"):
        retrying(op, "/data/file", "read", FAST)
    assert op.calls == 1


def test_sdk_and_http_client_errors_are_classified():
    import aiohttp
    from botocore import exceptions as boto

    def client_error(status: int, code: str) -> boto.ClientError:
        return boto.ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")

    assert is_transient(client_error(503, "SlowDown")) and is_transient(client_error(500, "InternalError"))
    assert is_transient(client_error(400, "Throttling"))
    assert not is_transient(client_error(404, "NoSuchKey")) and not is_transient(client_error(403, "AccessDenied"))
    assert is_transient(boto.ConnectionClosedError(endpoint_url="http://s3"))
    assert is_transient(boto.ReadTimeoutError(endpoint_url="http://s3"))
    assert is_transient(aiohttp.ServerDisconnectedError())
    assert not is_transient(RuntimeError("a bug"))


def test_backoff_is_exponential_capped_and_jittered(monkeypatch):
    policy = RetryPolicy(attempts=8, base_s=0.5, cap_s=4.0)
    rng = random.Random(0)
    waits = [[policy.wait(n, rng) for _ in range(200)] for n in (1, 2, 3, 6)]
    assert [max(w) <= bound for w, bound in zip(waits, (0.5, 1.0, 2.0, 4.0), strict=True)] == [True] * 4
    assert max(waits[3]) > 2.0 and min(waits[3]) < 1.0  # spread over the whole window: clients do not retry together
    monkeypatch.setenv("M2D2_STORAGE_ATTEMPTS", "3")
    monkeypatch.setenv("M2D2_STORAGE_BACKOFF_S", "0.1")
    assert RetryPolicy.from_env() == RetryPolicy(3, 0.1, 30.0)
    monkeypatch.setenv("M2D2_STORAGE_ATTEMPTS", "many")
    with pytest.raises(ValueError, match="M2D2_STORAGE_ATTEMPTS"):
        RetryPolicy.from_env()
    with pytest.raises(ValueError, match="attempts >= 1"):
        RetryPolicy(attempts=0)
