"""Issue 8, CLI defects that need no guest: bad data dirs, read-only commands that must
create nothing, bad option values, and one escaped line per error.

Each runs the real ``vmfork`` in a subprocess (tests/conftest.py::CLI).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import CLI

READ_ONLY = [["ps"], ["inspect", "x"], ["logs", "x"], ["image", "ls"], ["doctor"]]


def one_error_line(r: subprocess.CompletedProcess[bytes], code: int | None = None) -> str:
    """The error of a failed command: exactly one line, no traceback."""
    err = r.stderr.decode()
    assert r.returncode != 0, (r.returncode, err)
    if code is not None:
        assert r.returncode == code, err
    assert "Traceback" not in err, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("vmfork: error: "), err
    return err


def tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.mark.parametrize("args", [["ps"], ["run", "x"], ["image", "build"], ["inspect", "x"]])
def test_data_dir_is_a_file(tmp_path: Path, args: list[str]) -> None:
    f = tmp_path / "afile"
    f.write_text("mine\n")
    err = one_error_line(CLI(f)(*args, check=False))
    assert f"data dir '{f}': not a directory" in err
    assert f.read_text() == "mine\n"


@pytest.mark.parametrize("args", [["ps"], ["run", "x"], ["logs", "x"]])
def test_data_dir_under_a_file(tmp_path: Path, args: list[str]) -> None:
    f = tmp_path / "afile"
    f.write_text("mine\n")
    err = one_error_line(CLI(f / "sub" / "data")(*args, check=False))
    assert f"'{f}' is not a directory" in err
    assert tree(tmp_path) == ["afile"]


@contextlib.contextmanager
def read_only_tmpfs(mnt: Path, subdirs: tuple[str, ...] = ()) -> Iterator[Path]:
    """A tmpfs on ``mnt`` holding ``subdirs`` (mode 0700), remounted read-only."""
    if os.geteuid() != 0:
        pytest.skip("mounting a read-only tmpfs needs root")
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(mnt)], check=True)
    try:
        for d in subdirs:
            (mnt / d).mkdir(0o700)
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


@pytest.mark.parametrize("subdirs", [(), ("guests", "images", "locks")], ids=["empty", "laid-out"])
@pytest.mark.parametrize("args", [["run", "x"], ["image", "build"]])
def test_data_dir_on_read_only_filesystem(tmp_path: Path, subdirs: tuple[str, ...],
                                          args: list[str]) -> None:
    with read_only_tmpfs(tmp_path / "ro", subdirs) as ro:
        err = one_error_line(CLI(ro)(*args, check=False))
        assert f"data dir '{ro}'" in err and "read-only file system" in err


@pytest.mark.parametrize("subdirs", [(), ("guests", "images", "locks")], ids=["empty", "laid-out"])
def test_ps_reads_a_data_dir_on_a_read_only_filesystem(tmp_path: Path, subdirs: tuple[str, ...]) -> None:
    """ps writes nothing, so a read-only data dir is no error: it lists what is there."""
    with read_only_tmpfs(tmp_path / "ro", subdirs) as ro:
        r = CLI(ro)("ps", "--json", check=False)
        assert r.returncode == 0, r.stderr
        assert r.stdout.decode().strip() == "[]"


@pytest.mark.parametrize("args", READ_ONLY, ids=lambda a: "-".join(a))
def test_read_only_commands_create_nothing_in_an_empty_data_dir(tmp_path: Path, args: list[str]) -> None:
    """An existing but empty data dir stays empty (ps used to make guests/, images/, locks/)."""
    data = tmp_path / "data"
    data.mkdir(0o700)
    r = CLI(data)(*args, check=False)
    if args[0] in ("inspect", "logs"):
        assert "instance 'x' not found" in one_error_line(r, 3)
    else:
        assert r.returncode == 0, r.stderr
    assert tree(tmp_path) == ["data"]


@pytest.mark.parametrize("args", READ_ONLY, ids=lambda a: "-".join(a))
def test_read_only_commands_create_nothing(tmp_path: Path, args: list[str]) -> None:
    cli = CLI(tmp_path / "no" / "such" / "data")
    r = cli(*args, check=False)
    if args[0] in ("inspect", "logs"):
        assert "instance 'x' not found" in one_error_line(r, 3)
    else:
        assert r.returncode == 0, r.stderr
    if args == ["doctor"]:
        assert "does not exist yet" in r.stdout.decode()
    assert tree(tmp_path) == []


def test_write_command_makes_a_private_data_dir(tmp_path: Path) -> None:
    """A data dir is created 0700, and an existing one made by an older vmfork is tightened."""
    cli = CLI(tmp_path / "data")
    cli("rm", "nosuch", check=False)  # fails after the data dir is made
    old = tmp_path / "old"
    for d in ("", "guests", "images", "locks"):
        (old / d).mkdir(0o755, exist_ok=True)
        os.chmod(old / d, 0o755)
    CLI(old)("rm", "nosuch", check=False)
    for root in (cli.data_dir, old):
        for d in ("", "guests", "images", "locks"):
            assert oct((root / d).stat().st_mode & 0o777) == oct(0o700), root / d


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "0", "-1", "1e10"])
def test_exec_timeout_must_be_finite_and_positive(tmp_path: Path, value: str) -> None:
    # the value is checked before the instance is looked up: no guest needed to see it
    r = CLI(tmp_path / "d")("exec", "nosuch", "--timeout", value, "--", "true", check=False)
    assert f"invalid --timeout '{float(value)}'" in one_error_line(r, 2)


@pytest.mark.parametrize("value", ["-1", "-100"])
def test_logs_tail_negative_is_refused(tmp_path: Path, value: str) -> None:
    r = CLI(tmp_path / "d")("logs", "nosuch", "--tail", value, check=False)
    assert f"invalid --tail '{value}'" in one_error_line(r, 2)


@pytest.mark.parametrize(
    "name,shown",
    [
        ("a\nb", "invalid name 'a\\nb'"),
        ("a\rb\tc", "invalid name 'a\\rb\\tc'"),
        ("x\x1b[31mred", "invalid name 'x\\x1b[31mred'"),
        ("[/]", "invalid name '[/]'"),  # rich markup: a MarkupError traceback before
        ("[bold red]loud[/bold red]", "invalid name '[bold red]loud[/bold red]'"),
        (":thumbs_up:", "invalid name ':thumbs_up:'"),  # not turned into an emoji
    ],
)
def test_errors_are_one_escaped_line(tmp_path: Path, name: str, shown: str) -> None:
    r = CLI(tmp_path / "d")("run", name, check=False)
    assert shown in one_error_line(r, 2)


def test_markup_in_env_option_is_printed_verbatim(tmp_path: Path) -> None:
    r = CLI(tmp_path / "d")("exec", "nosuch", "-e", "[/]", "--", "true", check=False)
    assert "invalid --env '[/]'" in one_error_line(r, 2)


def test_piped_output_is_not_wrapped(tmp_path: Path) -> None:
    """Output to a pipe keeps each line whole (rich wrapped at 80 columns before)."""
    long = tmp_path / ("d" * 100) / "data"
    r = CLI(long)("doctor", check=False)
    assert any(str(long) in line and "does not exist yet" in line for line in r.stdout.decode().splitlines())
    err = one_error_line(CLI(tmp_path / "d")("run", "x" * 200, check=False), 2)
    assert "x" * 200 in err
