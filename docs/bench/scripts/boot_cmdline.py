"""Boot vmfork's image with vmfork's QEMU command line but a given kernel command line (and
optionally another initramfs); print wall and QEMU CPU time to the first agent answer.

    python boot_cmdline.py DATA_DIR "console=ttyS0 ..." RUNS [INITRAMFS]

DATA_DIR holds one instance booted by vmfork (its run/config.json gives the image and
config). Used for the cold-boot comparison in ../README.md (round 2, part B).
"""

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from vmfork.forkvm import clone_file
from vmfork.guest.agent import AgentClient, wait_ready
from vmfork.hypervisor.base import VMConfig
from vmfork.hypervisor.qemu import QemuHypervisor
from vmfork.images import load_image


def boot(dd: Path, cmdline: str, initramfs: str | None) -> tuple[float, float]:
    cfgj = json.loads(next(dd.glob("guests/*/run/config.json")).read_text())
    image = load_image(dd / "images", cfgj["image_digest"])
    d = dd / "boot-cmdline"
    shutil.rmtree(d, ignore_errors=True)
    (d / "run").mkdir(parents=True)
    (d / "logs").mkdir()
    clone_file(image.overlay_template, d / "disk.raw")
    argv = QemuHypervisor().argv(VMConfig.from_json(cfgj | {"cmdline": cmdline, "id": "bootcmp"}), image)
    if initramfs:
        argv[argv.index("-initrd") + 1] = initramfs
    t0 = time.monotonic()
    p = subprocess.Popen(argv, cwd=d, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    try:
        with wait_ready(lambda: AgentClient.connect_unix(d / "run/agent.sock", 2.0), 300,
                        alive=lambda: p.poll() is None):
            wall = time.monotonic() - t0
            st = Path(f"/proc/{p.pid}/stat").read_text().rsplit(")", 1)[1].split()
            cpu = (int(st[11]) + int(st[12])) / os.sysconf("SC_CLK_TCK")
    finally:
        p.kill()
        p.wait()
        shutil.rmtree(d, ignore_errors=True)
    return wall, cpu


if __name__ == "__main__":
    dd, cmdline, runs = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    initrd = sys.argv[4] if len(sys.argv) > 4 else None
    ws, cs = zip(*(boot(dd, cmdline, initrd) for _ in range(runs)), strict=True)
    print(f"wall median {statistics.median(ws):.2f} s {[round(x, 2) for x in ws]}; "
          f"QEMU CPU median {statistics.median(cs):.2f} s {[round(x, 2) for x in cs]}")
