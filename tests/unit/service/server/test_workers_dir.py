"""The supervisor's working directory: locked while its owner (or an inherited worker)
lives, swept by the next supervisor only once nobody holds it."""

from __future__ import annotations

import multiprocessing
import os
import signal
from pathlib import Path

from service.server.workers_dir import LOCK_NAME, PREFIX, WorkersDirectory, sweep


def _hold_until_killed(path: str, ready: object) -> None:
    directory = WorkersDirectory.create(Path(path))
    (directory.path / "held").touch()
    ready.set()  # type: ignore[attr-defined]
    signal.pause()


def test_a_live_directory_is_kept_and_a_dead_ones_is_swept(tmp_path: Path) -> None:
    context = multiprocessing.get_context("fork")
    ready = context.Event()
    holder = context.Process(target=_hold_until_killed, args=(str(tmp_path), ready))
    holder.start()
    try:
        assert ready.wait(30)
        [held] = [p for p in tmp_path.glob(PREFIX + "*") if (p / "held").exists()]
        mine = WorkersDirectory.create(tmp_path)  # sweeps, but the holder is alive
        assert held.is_dir() and mine.path.is_dir()
        assert sweep(tmp_path) == 0
    finally:
        holder.kill()  # SIGKILL: no chance to clean up
        holder.join(10)
    assert held.is_dir()
    assert sweep(tmp_path) == 1  # the killed holder's, not the one this process holds
    assert not held.exists() and mine.path.is_dir()
    mine.remove()
    assert list(tmp_path.iterdir()) == []


def test_a_forked_child_keeps_the_directory_locked_after_its_parent_closes(
    tmp_path: Path,
) -> None:
    """Workers inherit the lock: the directory is in use until the last of them exits."""
    directory = WorkersDirectory.create(tmp_path)
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # a worker: waits until told to exit
        os.close(write)
        os.read(read, 1)
        os._exit(0)
    os.close(read)
    directory._lock.close()  # the supervisor is gone; its worker is not
    assert sweep(tmp_path) == 0
    os.write(write, b"x")
    os.waitpid(child, 0)
    assert sweep(tmp_path) == 1
    assert not directory.path.exists()


def test_only_directories_with_a_lock_file_are_swept(tmp_path: Path) -> None:
    """One being made, or an older server's without a lock, may be in use: left alone."""
    unlocked = tmp_path / (PREFIX + "old")
    unlocked.mkdir()
    (tmp_path / (PREFIX + "file")).write_text("not a directory")
    other = tmp_path / "unrelated"
    other.mkdir()
    (other / LOCK_NAME).touch()
    assert sweep(tmp_path) == 0
    assert unlocked.is_dir() and other.is_dir()
