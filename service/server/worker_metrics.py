"""The metrics endpoint of a server with worker processes: every worker's series added up
(prometheus_client's multiprocess mode), showing only the models and versions a live worker
serves."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Set by the supervisor, before any worker imports prometheus_client (its value class is
# chosen at import): prometheus_client's multiprocess mode, every process's values in files
# in this directory. This module imports prometheus_client only when it is used.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


class ServedOnly:
    """Every worker's metrics added up, showing only served model names and versions.

    prometheus_client's multiprocess files keep every label set a worker ever wrote, so
    the series of a version that was unloaded would live on; this keeps what a live
    worker reports serving (or loading, or failing) and the fixed ``_unknown``/``""``.
    """

    def __init__(self, directory: Path, served: Any):
        from prometheus_client.multiprocess import MultiProcessCollector

        self.inner = MultiProcessCollector(None, path=str(directory))
        self.served = served

    def collect(self) -> Iterator[Any]:
        versions, models = self.served()
        for family in self.inner.collect():
            family.samples = [s for s in family.samples if shown_series(s.labels, versions, models)]
            yield family


def shown_series(labels: dict[str, str], versions: set[tuple[str, str]], models: set[str]) -> bool:
    model = labels.get("model")
    if model is None or model in ("", "_unknown"):
        return True
    if model not in models:
        return False
    version = labels.get("version", "")
    return version == "" or (model, version) in versions
