"""Cold boot to agent-ready with each guest kernel (``VMFORK_KERNEL``), interleaved.

    python -m vmfork.bench.boot_kernels [--runs 5] [--memory 256] [--out docs/bench/boot_kernels.json]

Each kernel gets its own data dir under the work dir (its own image; the kernel built from
source comes from the shared cache). Boots alternate between the kernels; per boot the QEMU
process's CPU time (user + system) when the agent first answers, and the wall time of
``Manager.run``. CPU time is what compares on a loaded host: TCG's work for the boot, less
the time spent waiting for a core.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

KERNELS = ("debian", "source")


def _say(kernel: str, msg: str) -> None:
    print(f"[{kernel}] {msg}", flush=True)


def _summary(xs: list[float]) -> dict[str, Any]:
    return {"median": round(statistics.median(xs), 3), "min": round(min(xs), 3), "max": round(max(xs), 3),
            "samples": [round(x, 3) for x in xs]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vmfork.bench.boot_kernels", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5, help="boots per kernel [5]")
    ap.add_argument("--memory", type=int, default=256, help="guest MiB [256]")
    ap.add_argument("--kernels", default=",".join(KERNELS), help="comma-separated VMFORK_KERNEL values")
    ap.add_argument("--work", type=Path, default=None, help="work dir [a temp dir under /var/tmp]")
    ap.add_argument("--out", type=Path, default=None, help="write the JSON here too")
    args = ap.parse_args(argv)

    from vmfork.bench import probes
    from vmfork.hypervisor.base import vmm_record
    from vmfork.images import ensure_image
    from vmfork.instances.manager import Manager

    kernels = [k.strip() for k in args.kernels.split(",") if k.strip()]
    work = args.work or Path(tempfile.mkdtemp(prefix="vmfork-bench-boot-", dir="/var/tmp"))
    cpu: dict[str, list[float]] = {k: [] for k in kernels}
    wall: dict[str, list[float]] = {k: [] for k in kernels}
    info: dict[str, dict[str, Any]] = {}
    old = os.environ.get("VMFORK_KERNEL")
    try:
        managers = {}
        for k in kernels:
            os.environ["VMFORK_KERNEL"] = k
            m = Manager(work / f"data-{k}")
            managers[k] = m
            im = ensure_image(m.dd.images, functools.partial(_say, k))
            info[k] = {"image": im.short, "kernel_version": im.kernel_version,
                       "vmlinux_bytes": im.vmlinux.stat().st_size}
        for i in range(args.runs):
            for k in kernels if i % 2 == 0 else reversed(kernels):
                os.environ["VMFORK_KERNEL"] = k
                m = managers[k]
                t0 = time.monotonic()
                inst = m.run(f"b{i}", memory_mib=args.memory)
                dt = time.monotonic() - t0
                ref = vmm_record(inst.g)
                c = probes.cpu_seconds(ref.pid) if ref is not None else float("nan")
                m.rm(f"b{i}", force=True)
                cpu[k].append(c)
                wall[k].append(dt)
                print(f"run {i} {k:7s} QEMU CPU {c:5.2f} s  wall {dt:5.2f} s  ({inst.accel})", flush=True)
    finally:
        if old is None:
            os.environ.pop("VMFORK_KERNEL", None)
        else:
            os.environ["VMFORK_KERNEL"] = old
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    result: dict[str, Any] = {
        "what": f"cold boot to agent-ready, {args.memory} MiB, interleaved, {args.runs} runs per kernel",
        "loadavg_end": os.getloadavg(),
        "kernels": {k: {**info[k], "qemu_cpu_s": _summary(cpu[k]), "wall_s": _summary(wall[k])} for k in kernels},
    }
    if len(kernels) == 2:
        a, b = kernels
        result[f"cpu_{b}_over_{a}"] = round(statistics.median(cpu[b]) / statistics.median(cpu[a]), 3)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
