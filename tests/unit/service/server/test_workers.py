"""The supervisor's plan for its workers: each gets its share of the server-wide bounds."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from service.server.config_loading import load_settings
from service.server.worker_metrics import MULTIPROC_ENV
from service.server.workers import Supervisor


def test_workers_share_the_server_wide_memory_bounds(tmp_path: Path) -> None:
    settings = load_settings(
        model_repository=tmp_path,
        port=0,
        http_port=None,
        metrics_port=None,
        max_decode_pixels=90_000_000,
        max_image_pixels=40_000_000,
        max_inflight_bytes=300_000_000,
        max_image_bytes=20_000_000,
    )
    previous = os.environ.get(MULTIPROC_ENV)
    for count, pixels, inflight in ((2, 45_000_000, 150_000_000), (3, 40_000_000, 100_000_000)):
        supervisor = Supervisor(settings, count)
        try:
            worker = supervisor.prepare()
        finally:
            for sock in supervisor.sockets:
                sock.close()
            shutil.rmtree(supervisor.directory, ignore_errors=True)
            if previous is None:
                os.environ.pop(MULTIPROC_ENV, None)
            else:
                os.environ[MULTIPROC_ENV] = previous
        # 90 M / 3 would be 30 M: below one 40 M image, which must still fit.
        assert (worker.max_decode_pixels, worker.max_inflight_bytes) == (pixels, inflight)
        assert worker.port != 0 and worker.metrics_port is None
