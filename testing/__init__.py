"""Test machinery shared by `tests/` and `bench/`: never imported by the product packages.

- `testing.net.free_port`: a free TCP port on 127.0.0.1.
- `testing.s3.MotoS3`: moto's S3 server on 127.0.0.1, reset to empty, with s3fs options.
- `testing.faults_proxy.FaultProxy`: an HTTP proxy that injects 503 SlowDown, 500 and resets.
- `testing.faulty_decoder`: a video-decoder child that aborts, segfaults, hangs, runs out of
  memory or raises on chosen sources (`VideoDecoderProcess(child_module=...)`).
- `testing.hostile`: the hostile media/caption corpus, each row with its exact expected outcome.
- `testing.prep_job`: the prep job as a killable subprocess, the small corpus with its reference
  run, and checks of an output root.
- `testing.flaky_s3`: the prep job writing to moto S3 through the fault proxy, and a bucket check.
"""
