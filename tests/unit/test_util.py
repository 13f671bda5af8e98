import os
import subprocess
import sys
import time

import pytest

from vmfork import util
from vmfork.errors import Busy, InvalidArgument
from vmfork.locking import file_lock, try_lock
from vmfork.procs import ProcRef


@pytest.mark.parametrize("name", ["a", "web-1", "x" * 63, "0abc9"])
def test_valid_names(name):
    assert util.validate_name(name) == name


@pytest.mark.parametrize(
    "name,why",
    [
        ("", "empty"),
        ("-a", "starting"),
        ("a-", "starting"),
        ("A", "lowercase"),
        ("a_b", "lowercase"),
        ("x" * 64, "longer than 63"),
        ("a.b", "lowercase"),
        ("a b", "lowercase"),
    ],
)
def test_invalid_names(name, why):
    with pytest.raises(InvalidArgument, match=why):
        util.validate_name(name)


def test_ids_fixed_length_and_distinct():
    ids = {util.new_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(len(i) == util.ID_LEN and util.is_id(i) for i in ids)


@pytest.mark.parametrize(
    "text,mib", [("256M", 256), ("2G", 2048), ("512MiB", 512), ("1024", 1024), ("64m", 64)]
)
def test_parse_memory(text, mib):
    assert util.parse_memory(text) == mib


@pytest.mark.parametrize("text", ["", "abc", "-1M", "12X", "1.5G", "32M", "100T", "1536K"])
def test_parse_memory_rejects(text):
    with pytest.raises(InvalidArgument, match="invalid memory size"):
        util.parse_memory(text)


def test_atomic_write_json_replaces_whole(tmp_path):
    p = tmp_path / "m.json"
    util.atomic_write_json(p, {"a": 1})
    util.atomic_write_json(p, {"b": 2})
    assert util.read_json(p) == {"b": 2}
    assert [x.name for x in tmp_path.iterdir()] == ["m.json"]  # no temp file left behind


def test_file_lock_excludes_other_process(tmp_path):
    lock = tmp_path / "l.lock"
    code = (
        "import sys, time; from pathlib import Path; from vmfork.locking import file_lock\n"
        f"with file_lock(Path({str(lock)!r}), what='x', timeout=0):\n"
        "    print('held', flush=True); time.sleep(30)\n"
    )
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        with (
            pytest.raises(Busy, match=f"held by pid {p.pid}"),
            file_lock(lock, what="instance 'x'", timeout=0.2),
        ):
            pass
        assert try_lock(lock) is None
    finally:
        p.kill()
        p.wait()
    # the kernel drops a dead holder's lock: no stale lock after a crash
    with file_lock(lock, what="x", timeout=1):
        pass


def test_procref_detects_exit_and_pid_reuse_guard():
    p = subprocess.Popen(["sleep", "30"])
    ref = ProcRef.of(p.pid)
    assert ref.alive()
    assert not ProcRef(p.pid, ref.start + 1).alive()  # same pid, other start time: not ours
    ref.kill(timeout=2)
    assert not ref.alive()
    p.wait()
    assert ref.wait_exit(0)


def test_procref_zombie_is_dead():
    p = subprocess.Popen(["true"])
    ref = ProcRef.of(p.pid)
    deadline = time.monotonic() + 5
    while ref.alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not ref.alive()
    with pytest.raises(ChildProcessError):
        os.waitpid(p.pid, 0)  # already reaped by alive()


@pytest.mark.parametrize(
    "text,line",
    [
        ("plain [/] text", "plain [/] text"),
        ("two\nlines", "two\\nlines"),
        ("cr\rtab\tend", "cr\\rtab\\tend"),
        ("\x1b[2Jclear", "\\x1b[2Jclear"),
        ("nul\x00del\x7fc1\x9b", "nul\\x00del\\x7fc1\\x9b"),
        ("sep\u2028para\u2029", "sep\\u2028para\\u2029"),
        ("é ü 日本", "é ü 日本"),
    ],
)
def test_one_line_escapes_control_characters(text, line):
    assert util.one_line(text) == line
