"""The security review's traversal payload against a real S3 API (moto server on loopback): object keys with
``..`` listed by s3fs as they are never leave the download folder."""

from __future__ import annotations

import os

import pytest

from m2d2 import io
from m2d2.io import UnsafePathError
from tests.helpers import moto_s3

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_download_dir_refuses_traversal_keys_from_a_real_s3_server(tmp_path):
    """The review's payload: an object key ``model/../../../../tmp/x`` listed by s3fs as it is."""
    import boto3

    target = tmp_path / "a" / "b" / "c" / "download"
    with moto_s3("exports") as endpoint:
        client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test", aws_secret_access_key="test",
                              region_name="us-east-1")
        client.put_object(Bucket="exports", Key="model/config.json", Body=b"{}")
        client.put_object(Bucket="exports", Key="model/../../../escaped", Body=b"payload")
        os.environ.update(AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test", AWS_ENDPOINT_URL_S3=endpoint)
        try:
            with pytest.raises(UnsafePathError, match=r"'\.\.'"):
                io.download_dir("s3://exports/model", target)
        finally:
            for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL_S3"):
                os.environ.pop(key, None)
    assert not any(tmp_path.rglob("escaped")) and not target.exists()  # refused before anything was written
