"""Fixtures shared by every test package."""

from __future__ import annotations

import pytest

from testing.s3 import MotoS3


@pytest.fixture
def moto_s3():
    """A fresh, empty moto S3 server on 127.0.0.1 (a `testing.s3.MotoS3`)."""
    with MotoS3() as server:
        yield server
