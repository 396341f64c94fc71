"""A real S3 API for tests: moto's `ThreadedMotoServer` on 127.0.0.1, reached through s3fs."""

from __future__ import annotations

import logging
import urllib.request
from typing import Any


class MotoS3:
    """Starts moto on 127.0.0.1 and empties it (moto keeps buckets per process, across servers)."""

    def __init__(self, key: str = "testing", secret: str = "testing", region: str = "eu-west-1"):
        from moto.server import ThreadedMotoServer

        self.key, self.secret, self.region = key, secret, region
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)

    def start(self) -> MotoS3:
        self.server.start()
        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto logs every request otherwise
        reset = f"{self.endpoint}/moto-api/reset"
        urllib.request.urlopen(urllib.request.Request(reset, method="POST"), timeout=10).close()
        return self

    def stop(self) -> None:
        self.server.stop()

    @property
    def host_port(self) -> tuple[str, int]:
        host, port = self.server.get_host_and_port()
        return host, int(port)

    @property
    def endpoint(self) -> str:
        return "http://{}:{}".format(*self.host_port)

    def options(self, endpoint: str | None = None) -> dict[str, Any]:
        """fsspec/s3fs storage options; `endpoint` overrides moto's (e.g. a fault proxy)."""
        return {
            "key": self.key,
            "secret": self.secret,
            "client_kwargs": {"endpoint_url": endpoint or self.endpoint, "region_name": self.region},
        }

    def fs(self):
        import s3fs

        return s3fs.S3FileSystem(**self.options())

    def overrides(self, prefix: str = "storage.options", endpoint: str | None = None) -> list[str]:
        """The same options as `section.field=value` overrides for our CLIs."""
        o = self.options(endpoint)
        return [
            f"{prefix}.key={o['key']}",
            f"{prefix}.secret={o['secret']}",
            f"{prefix}.client_kwargs.endpoint_url={o['client_kwargs']['endpoint_url']}",
            f"{prefix}.client_kwargs.region_name={o['client_kwargs']['region_name']}",
        ]

    def __enter__(self) -> MotoS3:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
