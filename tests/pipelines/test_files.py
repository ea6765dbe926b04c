"""The shared-file helpers of pipelines/files.py: whole files for concurrent readers and writers,
and a lock that one holder at a time gets."""

import threading
import time

import pytest

from pipelines import files


def test_readers_see_one_whole_version_while_threads_write_and_no_partial_file_is_left(tmp_path):
    path = tmp_path / "record.json"
    versions = {name: name * 200_000 for name in "ab"}  # large enough to be written in pieces
    files.write_whole(path, versions["a"])
    seen, done = set(), threading.Event()

    def write(name: str) -> None:
        for _ in range(30):
            files.write_whole(path, versions[name])

    def read() -> None:
        while not done.is_set():
            seen.add(path.read_text(encoding="utf-8"))

    reader = threading.Thread(target=read)
    reader.start()
    writers = [threading.Thread(target=write, args=(name,)) for name in "ab"]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join()
    done.set()
    reader.join()

    assert seen <= set(versions.values())
    assert [entry.name for entry in tmp_path.iterdir()] == ["record.json"]


def test_a_write_that_fails_leaves_the_old_file_and_nothing_beside_it(tmp_path):
    path = tmp_path / "record.json"
    files.write_whole(path, "old")

    with pytest.raises(UnicodeEncodeError):
        files.write_whole(path, "new \ud800")  # fails once the partial file is open

    assert path.read_text() == "old"
    assert [entry.name for entry in tmp_path.iterdir()] == ["record.json"]


def test_the_lock_has_one_holder_at_a_time_and_makes_its_folder(tmp_path):
    lock = tmp_path / "home" / "server.lock"
    events = []

    def hold(name: str, seconds: float) -> None:
        with files.locked(lock):
            events.append(f"{name} in")
            time.sleep(seconds)
            events.append(f"{name} out")

    first = threading.Thread(target=hold, args=("first", 0.3))
    first.start()
    while not events:
        time.sleep(0.01)
    second = threading.Thread(target=hold, args=("second", 0))
    second.start()
    first.join()
    second.join()

    assert events == ["first in", "first out", "second in", "second out"]
