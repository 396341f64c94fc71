"""Test machinery shared by `tests/` and `bench/`: never imported by the product packages.

- `testing.net.free_port`: a free TCP port on 127.0.0.1.
- `testing.s3.MotoS3`: moto's S3 server on 127.0.0.1, reset to empty, with s3fs options.
- `testing.faults_proxy.FaultProxy`: an HTTP proxy that injects 503 SlowDown, 500 and resets.
"""
