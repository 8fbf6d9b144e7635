"""The demo model `make serve` built must clear its bar on this CPU: val top-1 >= 0.935 and
loc >= 0.90, as the exported ModelSpec records them (measured through the serving path).
Seeded training repeats itself on one machine but moves with the CPU's math kernels, so
CI checks the bar wherever it runs and prints the CPU the figures came from."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from service.model.layout import published_versions  # noqa: E402
from service.model.sessions import read_metadata  # noqa: E402
from service.model.spec import ModelSpec  # noqa: E402

BAR = {"onnx_top1": 0.935, "onnx_loc_acc": 0.90}


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            flags = Path("/proc/cpuinfo").read_text()
            return line.split(":", 1)[1].strip() + (
                " (AVX-512)" if "avx512f" in flags else " (no AVX-512)"
            )
    return "unknown CPU"


def main() -> int:
    versions = published_versions(ROOT / "models" / "demo")
    if not versions:
        print("no models/demo: run make demo-model first", file=sys.stderr)
        return 2
    path = versions[max(versions)]
    spec = ModelSpec.from_metadata(read_metadata(path), source=str(path))
    figures = {key: spec.metrics.get(key, 0.0) for key in BAR}
    shown = ", ".join(f"{k} {v}" for k, v in figures.items())
    print(f"demo model {path} on {cpu_name()}: {shown}")
    short = [f"{k} {figures[k]} < {bar}" for k, bar in BAR.items() if figures[k] < bar]
    if short:
        print("the demo model misses its bar: " + "; ".join(short), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
