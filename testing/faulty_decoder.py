"""A video-decoder child that misbehaves on request: the real `preprocessing.video` serve loop
with a fault injected before chosen sources are opened.

    VideoDecoderProcess(cfg, child_module="testing.faulty_decoder")

with `HIGEN_DECODER_FAULTS` = JSON {source: fault} in the parent's environment (the child
inherits it; `plan` writes it). Every other source decodes normally, so a test can check
that the worker carries on. The fault runs inside the child's request handler, where a real
decoder failure would happen, so the parent sees exactly what a hostile file would cause:

- `abort`       SIGABRT, as ffmpeg's `av_assert0` does          -> decoder_crash
- `segfault`    a NULL read, SIGSEGV                            -> decoder_crash
- `hang`        never answers                                   -> timeout
- `eat_memory`  one allocation the size of the RLIMIT_AS        -> out_of_memory
- `raise`       an unexpected Python exception                  -> decode_error
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

from preprocessing import video

ENV = "HIGEN_DECODER_FAULTS"
FAULTS = ("abort", "segfault", "hang", "eat_memory", "raise")


def plan(faults: dict[str, str]) -> str:
    """The value of `ENV` that makes the child inject `faults` ({source: fault})."""
    unknown = sorted(set(faults.values()) - set(FAULTS))
    if unknown:
        raise ValueError(f"unknown fault(s) {unknown}; known: {', '.join(FAULTS)}")
    return json.dumps(faults)


def inject(fault: str, memory_mb: int) -> None:
    if fault == "abort":
        os.abort()
    elif fault == "segfault":
        import ctypes

        ctypes.string_at(0)
    elif fault == "hang":
        time.sleep(10**6)
    elif fault == "eat_memory":
        # One block as large as the whole limit: only RLIMIT_AS can refuse it (untouched pages).
        hog = np.empty(memory_mb << 20, dtype=np.uint8)
        del hog
    elif fault == "raise":
        raise RuntimeError("injected fault: raise")


def main(argv: list[str]) -> None:
    faults = json.loads(os.environ.get(ENV, "{}"))
    memory_mb = int(argv[2])
    real_open_clip = video.open_clip

    def open_clip(path, data, key, req):
        if path in faults:
            inject(faults[path], memory_mb)
        return real_open_clip(path, data, key, req)

    # `_answer` looks `open_clip` up in the module at call time: the fault fires inside its
    # error handling, like a decoder failure on a hostile file would.
    video.open_clip = open_clip
    video.serve(int(argv[0]), int(argv[1]), memory_mb, *argv[3:4])


if __name__ == "__main__":
    main(sys.argv[1:])
