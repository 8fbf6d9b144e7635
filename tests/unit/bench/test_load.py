"""The load generator's window bookkeeping: how busy the whole machine was."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from bench.load import CpuWindow, machine_ticks


def test_machine_ticks_count_idle_and_iowait_as_not_busy(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    # user nice system idle iowait irq softirq steal guest guest_nice
    stat.write_text("cpu  100 5 20 300 10 1 2 3 7 0\ncpu0 1 2 3 4 5 6 7 8 9 10\n")
    assert machine_ticks(stat) == (131, 441)
    stat.write_text("cpu  garbage\n")
    assert machine_ticks(stat) is None
    assert machine_ticks(tmp_path / "absent") is None


def test_a_window_measures_the_machine_busy_while_a_thread_spins() -> None:
    def spin(seconds: float) -> None:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass

    async def main() -> tuple[float | None, float | None]:
        now = time.perf_counter()
        window = CpuWindow(time.process_time, now, now + 0.5)
        await asyncio.to_thread(spin, 0.6)  # one core busy for the whole window
        return window.machine_busy_percent(), await window.ms_per_image(10)

    busy, cpu_ms = asyncio.run(main())
    # At least the spinning core was busy (anything else running only adds to it).
    assert busy is not None and 0.8 * 100 / (os.cpu_count() or 1) <= busy <= 100
    assert cpu_ms is not None and cpu_ms > 0  # this process's CPU over the window, per image
