"""``python -m vmfork.bench.snapshots [--quick] [--out DIR]``: named snapshots on this machine.

- N-way fork to standby: ``snapshot fork --count N`` (one pass) against N single in-process
  forks of the same snapshot, on a loop-mounted XFS with reflink (target <= 0.25x);
- the pause of a live snapshot of a running 256 MiB and 2 GiB guest (target: 2 GiB over
  256 MiB <= 1.5x), with part of the guest's RAM written before and a little between;
- the digest of a 2 GiB mem-file (sparse-aware SHA-256) against plain SHA-256 of all of it;
- export and import throughput against ``tar --sparse | zstd`` of the same files.

Writes ``OUT/snapshots.json`` and ``OUT/snapshots.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from vmfork.bench import probes
from vmfork.bench.stats import median

MiB = 1 << 20


def _time(fn: Any) -> float:
    t0 = time.monotonic()
    fn()
    return time.monotonic() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vmfork.bench.snapshots", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="fewer forks and runs")
    ap.add_argument("--out", type=Path, default=Path("docs/bench"))
    ap.add_argument("--work", type=Path, default=Path("/var/tmp"))
    args = ap.parse_args(argv)
    count = 20 if args.quick else 100
    runs = 1 if args.quick else 3
    pauses = 3 if args.quick else 7
    started = time.monotonic()

    def say(msg: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {msg}", file=sys.stderr, flush=True)

    from vmfork.instances.manager import Manager
    from vmfork.instances.snapshot_ops import store
    from vmfork.snapshots.archive import export, import_

    res: dict[str, Any] = {"schema": "vmfork-bench-snapshots/1", "count": count, "runs": runs,
                           "host": probes.host_facts(), "records": {}}
    rec = res["records"]
    with tempfile.TemporaryDirectory(prefix="vmfork-bench-snap-", dir=args.work) as work, \
            probes.loop_fs("xfs", 16384, Path(work)) as mnt:
        m = Manager(mnt / "data", say)

        def sh(name: str, script: str) -> str:
            r = m.exec(name, ["sh", "-c", script], timeout=600)
            return r.stdout.decode().strip()

        # --- N-way fork vs N single forks (to standby) ---------------------------------------
        m.run("tpl", memory_mib=256)
        sh("tpl", "dd if=/dev/urandom of=/run/fill bs=1M count=100 2>/dev/null; sync")
        m.snapshot_create("tpl", "tpl-snap")
        batch, single = [], []
        for r in range(runs):
            say(f"{count}-way fork, run {r + 1}")
            t = _time(lambda: m.snapshot_fork("tpl-snap", "b", count=count))
            batch.append(t)
            for i in range(1, count + 1):
                m.rm(f"b-{i}")

            def singles() -> None:
                for i in range(count):
                    m.snapshot_fork("tpl-snap", f"s{i}")

            single.append(_time(singles))
            for i in range(count):
                m.rm(f"s{i}")
        rec["fork_count_ms"] = round(median(batch) * 1000, 1)
        rec["fork_single_xN_ms"] = round(median(single) * 1000, 1)
        rec["fork_count_vs_singles"] = round(median(batch) / median(single), 3)

        # --- the digest of a 2 GiB mem-file ----------------------------------------------------
        # --- live snapshot pause: 256 MiB vs 2 GiB ---------------------------------------------
        for mib in (256, 2048):
            name = f"live{mib}"
            m.run(name, memory_mib=mib)
            fill = int(mib * 0.45)
            sh(name, f"dd if=/dev/urandom of=/run/fill bs=1M count={fill} 2>/dev/null; sync")
            samples = []
            for k in range(pauses):
                sh(name, f"dd if=/dev/urandom of=/run/fill bs=1M count=8 conv=notrunc seek={k * 8} 2>/dev/null")
                snap, _t = m.snapshot_create(name, f"{name}-{k}")
                samples.append(float(snap.pause_ms or 0))
                store(m).rm(snap.id)
            rec[f"pause_{mib}_ms"] = round(median(samples), 2)
            rec[f"pause_{mib}_samples"] = samples
            if mib == 2048:
                snap, _t = m.snapshot_create(name, "digest-2g")
                rec |= _digest_times(snap.dir / "memory")
                store(m).rm(snap.id)
            m.rm(name, force=True)
        rec["pause_2048_over_256"] = round(rec["pause_2048_ms"] / rec["pause_256_ms"], 3)

        # --- export / import vs tar --sparse | zstd --------------------------------------------
        st = store(m)
        snap = st.find("tpl-snap")
        arch = Path(work) / "a.tar.zst"
        with open(arch, "wb") as f:
            t_exp = _time(lambda: export(st, snap, f, image_dir=None, progress=lambda _m: None))
        size = arch.stat().st_size

        def imp() -> None:
            with open(arch, "rb") as f:
                import_(st, f, name="imported", images=m.dd.images, hypervisor_problem=lambda _h: None,
                        progress=lambda _m: None)

        t_imp = _time(imp)
        base = Path(work) / "b.tar.zst"
        t_tar = _time(lambda: subprocess.run(
            f"tar --sparse -C {snap.dir} -cf - . | zstd -q -3 -T0 -c > {base}", shell=True, check=True))
        out = Path(work) / "untar"
        out.mkdir()
        t_untar = _time(lambda: subprocess.run(f"zstd -q -d -c {base} | tar -x -C {out} -f -", shell=True, check=True))
        rec["archive_mib"] = round(size / MiB, 1)
        rec["logical_mib"] = round(snap.logical_bytes / MiB, 1)
        rec["export_ms"] = round(t_exp * 1000, 1)
        rec["import_ms"] = round(t_imp * 1000, 1)
        rec["tar_zstd_ms"] = round(t_tar * 1000, 1)
        rec["unzstd_untar_ms"] = round(t_untar * 1000, 1)
        rec["export_vs_tar"] = round(t_exp / t_tar, 3)
        rec["import_vs_untar"] = round(t_imp / t_untar, 3)
        m.rm("tpl", force=True)
    res["duration_s"] = round(time.monotonic() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "snapshots.json").write_text(json.dumps(res, indent=2) + "\n")
    md = _markdown(rec, count)
    (args.out / "snapshots.md").write_text(md)
    print(md)
    return 0


def _digest_times(mem: Path) -> dict[str, float]:
    from vmfork.snapshots.digest import file_digest

    t_z = _time(lambda: file_digest(mem))

    def plain() -> None:
        h = hashlib.sha256()
        with open(mem, "rb") as f:
            while b := f.read(MiB):
                h.update(b)

    t_p = _time(plain)
    return {"digest_2g_allocated_mib": round(probes.allocated_bytes(mem) / MiB, 1),
            "digest_2g_sparse_ms": round(t_z * 1000, 1), "digest_2g_plain_sha256_ms": round(t_p * 1000, 1)}


def _markdown(r: dict[str, Any], count: int) -> str:
    b = io.StringIO()
    b.write("# Named snapshots: measured (`python -m vmfork.bench.snapshots`)\n\n")
    b.write("| what | measured | target |\n|---|---|---|\n")
    b.write(f"| {count}-way fork to standby vs {count} single in-process forks (XFS) | "
            f"{r['fork_count_vs_singles']}x ({r['fork_count_ms']} vs {r['fork_single_xN_ms']} ms) | <= 0.25x |\n")
    b.write(f"| live snapshot pause, 2 GiB over 256 MiB guest (XFS) | {r['pause_2048_over_256']}x "
            f"({r['pause_2048_ms']} vs {r['pause_256_ms']} ms) | <= 1.5x; 256 MiB < 100 ms |\n")
    b.write(f"| digest of a 2 GiB mem-file ({r['digest_2g_allocated_mib']} MiB allocated), sparse-aware SHA-256 "
            f"vs plain SHA-256 | {r['digest_2g_sparse_ms']} vs {r['digest_2g_plain_sha256_ms']} ms | - |\n")
    b.write(f"| export ({r['logical_mib']} MiB logical -> {r['archive_mib']} MiB) vs `tar --sparse \\| zstd` | "
            f"{r['export_vs_tar']}x ({r['export_ms']} vs {r['tar_zstd_ms']} ms) | - |\n")
    b.write(f"| import (every digest checked) vs `zstd -d \\| tar -x` | {r['import_vs_untar']}x "
            f"({r['import_ms']} vs {r['unzstd_untar_ms']} ms) | - |\n")
    return b.getvalue()


if __name__ == "__main__":
    sys.exit(main())
