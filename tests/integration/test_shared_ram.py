"""Issue 16: forks run from one shared, read-only template mem-file (``hypervisor.shared_ram``).

Real QEMU guests on a loop XFS with reflink, VMMs unconfined (QEMU 7.2 must open the
template read-write even to map it private; under confinement forks keep their own clones).
Checked: the forks map the template private and share its pages; no write of a fork
reaches it; the source restored and written while its forks run changes nothing in them;
a fork's standby writes its own pages into its own file (never the template's inode) and
its restore sees its source's state and its own writes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import CLI, data_dir_on
from tests.integration.test_fork_isolation import fingerprint

pytestmark = [pytest.mark.vm, pytest.mark.slow]

UNCONFINED = {"VMFORK_CONFINE": "0"}
BLOB = "/dev/shm/blob"


@pytest.fixture()
def xfs(tmp_path: Path) -> Iterator[CLI]:
    with data_dir_on("xfs", tmp_path) as cli:
        yield cli


def run(cli: CLI, *args: str) -> str:
    return cli(*args, env=UNCONFINED).stdout.decode().strip()


def sh(cli: CLI, name: str, script: str) -> str:
    return run(cli, "exec", name, "--", "sh", "-c", script)


def info(cli: CLI, name: str) -> dict[str, object]:
    d = json.loads(run(cli, "inspect", name, "--json"))
    assert isinstance(d, dict)
    return d


def template_mapping(pid: int) -> tuple[Path, int, int] | None:
    """(template path, Rss kB, Pss kB) of the VMM's private mapping of a template."""
    lines = Path(f"/proc/{pid}/smaps").read_text().splitlines()
    for i, line in enumerate(lines):
        f = line.split(maxsplit=5)
        if len(f) == 6 and "/templates/" in f[5] and f[1] == "rw-p":
            fields = {x.split(":")[0]: x.split()[1] for x in lines[i + 1:i + 24] if ":" in x and x.split()[-1] == "kB"}
            return Path(f[5].removesuffix(" (deleted)")), int(fields["Rss"]), int(fields["Pss"])
    return None


def test_forks_share_the_template_and_never_write_it(xfs: CLI) -> None:
    cli = xfs
    run(cli, "run", "src", "--memory", "256")
    blob_md5 = sh(cli, "src", f"head -c 33554432 /dev/urandom > {BLOB}; md5sum {BLOB} | cut -d' ' -f1")
    run(cli, "standby", "src")
    for name in ("a", "b"):
        run(cli, "fork", "src", name)
        run(cli, "restore", name)
        assert sh(cli, name, f"md5sum {BLOB} | cut -d' ' -f1") == blob_md5  # warmed: reads its source's state

    maps = {n: template_mapping(int(str(info(cli, n)["pid"]))) for n in ("a", "b")}
    assert maps["a"] is not None and maps["b"] is not None, f"forks do not map a template: {maps}"
    template = maps["a"][0]
    assert maps["b"][0] == template
    src_mem = Path(str(info(cli, "src")["dir"])) / "snapshots/snapshot-latest/memory"
    assert template.stat().st_ino != src_mem.stat().st_ino
    _, rss, pss = maps["b"]
    assert pss < rss * 0.75, f"the template's pages are not shared: Rss {rss} kB, Pss {pss} kB"
    before = fingerprint(template)

    mine_md5 = sh(cli, "a", "head -c 16777216 /dev/urandom > /dev/shm/mine; md5sum /dev/shm/mine | cut -d' ' -f1")
    # The source resumes over its own snapshot and rewrites its state while its forks run.
    run(cli, "restore", "src")
    new_md5 = sh(cli, "src", f"head -c 33554432 /dev/urandom > {BLOB}; md5sum {BLOB} | cut -d' ' -f1")
    assert new_md5 != blob_md5
    for name in ("a", "b"):
        assert sh(cli, name, f"md5sum {BLOB} | cut -d' ' -f1") == blob_md5, f"{name} saw its source's later writes"
    assert sh(cli, "b", "cat /dev/shm/mine 2>/dev/null | wc -c") == "0"  # a's writes are a's own
    assert fingerprint(template) == before

    # Standby of a fork: its own pages into its own clone, never the template.
    run(cli, "standby", "a")
    snap = Path(str(info(cli, "a")["dir"])) / "snapshots/snapshot-latest"
    cfg = json.loads((snap / "config.json").read_text())
    assert cfg["snapshot_type"] == "devices" and cfg["template"] == ""
    own = (snap / "memory").stat()
    assert (own.st_dev, own.st_ino) != (template.stat().st_dev, template.stat().st_ino)
    assert fingerprint(template) == before
    for _ in range(2):  # restored from the device-state snapshot, and again from the next one
        run(cli, "restore", "a")
        assert sh(cli, "a", f"md5sum {BLOB} /dev/shm/mine | cut -d' ' -f1") == f"{blob_md5}\n{mine_md5}"
        run(cli, "standby", "a")
    assert fingerprint(template) == before
    assert sh(cli, "b", f"md5sum {BLOB} | cut -d' ' -f1") == blob_md5
