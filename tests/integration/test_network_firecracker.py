"""Issue 13 at the VMM level on a REAL Firecracker binary: a NIC in an instance's namespace,
a snapshot, and its load by a fork in the fork's own namespace.

Guests do not reach userspace under this host's KVM (see test_firecracker_vmm), so what is
checked is what the VMM does: it runs in the instance's namespace, opens that namespace's
``tap0`` (the TAP gets a carrier once a VMM attaches), and a fork's VMM loads the snapshot
in the fork's namespace, attached to the fork's ``tap0`` (the same name: nothing to
override), while the source's stays detached.

Everything happens inside a namespace this test makes (the driver below runs there, with
``nsenter --net``), removed at the end.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vmfork.images import Image

pytestmark = [pytest.mark.vm, pytest.mark.slow, pytest.mark.timeout(600)]

DRIVER = r'''
import json, os, secrets, shutil, sys, time
from pathlib import Path
from vmfork import network
from vmfork.forkvm import clone_file, clone_tree
from vmfork.hypervisor.base import VMConfig
from vmfork.hypervisor.firecracker import FirecrackerHypervisor
from vmfork.images import load_image
from vmfork.instances.manager import _guest_skip
from vmfork.layout import GuestDir

data, images, digest = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
image = load_image(images, digest)
hv = FirecrackerHypervisor()
out = {}

def tap_state(ns):
    import subprocess
    link = json.loads(subprocess.run(["ip", "-n", ns, "-j", "link", "show", "tap0"], capture_output=True,
                                     text=True, check=True).stdout)[0]
    return "NO-CARRIER" not in link["flags"]

def netns_of(pid):
    return os.stat(f"/proc/{pid}/ns/net").st_ino

# ids of our own each run: namespaces are named after them, machine-wide
src_id, fork_id = "srcnet" + secrets.token_hex(3), "frknet" + secrets.token_hex(3)
lease = network.ensure(data, src_id, network.NetSpec(mode="default"), None)
g = GuestDir(data / "guests" / src_id)
g.ensure_dirs()
g.metadata.write_text(json.dumps({"id": src_id, "cid": 3}))
clone_file(image.overlay_template, g.disk)
cfg = VMConfig("firecracker", 256, 1, "kvm", digest, hv.kernel_cmdline("kvm", "src") + " " + network.guest_cmdline(),
               hv.version(), id=src_id, tap=network.TAP, netns=lease.netns, mac=network.GUEST_MAC)
procs = []
try:
    out["src_tap_before"] = tap_state(lease.netns)
    proc = hv.boot(g, cfg, image)
    procs.append(proc)
    time.sleep(1)
    out["src_vmm_alive"] = proc.alive()
    out["src_vmm_in_its_netns"] = netns_of(proc.pid) == os.stat(f"/run/netns/{lease.netns}").st_ino
    out["src_tap_attached"] = tap_state(lease.netns)
    g.snapshot_tmp.mkdir(parents=True)
    hv.save(g, cfg, proc, g.snapshot_tmp)
    (g.snapshot_tmp / "config.json").write_text(json.dumps(cfg.to_json()))
    os.rename(g.snapshot_tmp, g.snapshot_latest)
    for _ in range(100):  # the VMM is gone; its TAP loses the carrier as its fds are released
        if not tap_state(lease.netns):
            break
        time.sleep(0.1)
    out["src_tap_after_save"] = tap_state(lease.netns)

    f = GuestDir(data / "guests" / fork_id)
    clone_tree(g.path, f.path, skip=_guest_skip)
    f.ensure_dirs()
    f.metadata.write_text(json.dumps({"id": fork_id, "cid": 3}))
    flease = network.ensure(data, fork_id, network.NetSpec(mode="default"), None)
    fcfg = VMConfig.from_json(json.loads((f.snapshot_latest / "config.json").read_text()))
    fcfg.id, fcfg.netns = fork_id, flease.netns
    os.rename(f.snapshot_latest, f.restoring)
    fproc = hv.restore(f, fcfg, image, f.restoring).proc
    procs.append(fproc)
    out["fork_vmm_in_its_netns"] = netns_of(fproc.pid) == os.stat(f"/run/netns/{flease.netns}").st_ino
    out["fork_tap_attached"] = tap_state(flease.netns)
    out["src_tap_still_detached"] = not tap_state(lease.netns)
    out["addresses"] = [lease.ip, flease.ip]
finally:
    for p in procs:
        p.kill(timeout=2)
    network.release(data, src_id)
    network.release(data, fork_id)
    out["netns_left"] = [n for n in (lease.netns, f"vmfork-{fork_id}") if os.path.exists(f"/run/netns/{n}")]
print(json.dumps(out))
'''


def test_nic_in_the_instance_namespace_and_a_fork_loads_in_its_own(image: Image, tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces, TAP devices)")
    for tool in ("ip", "nft", "nsenter"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (make setup)")
    from tests.integration.test_firecracker_vmm import firecracker_or_skip

    hv = firecracker_or_skip(image)
    ns = f"vft-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        r = subprocess.run(["nsenter", f"--net=/run/netns/{ns}", sys.executable, "-c", DRIVER,
                            str(tmp_path / "data"), str(image.dir.parent), image.digest],
                           capture_output=True, text=True, timeout=300,
                           env=os.environ | {"VMFORK_CONFINE": "0", "VMFORK_FIRECRACKER_BIN": hv.binary})
        assert r.returncode == 0, r.stderr[-3000:]
        out = json.loads(r.stdout.strip().splitlines()[-1])
    finally:
        subprocess.run(["ip", "netns", "delete", ns], check=False)
    assert out["src_tap_before"] is False  # no VMM attached yet
    assert out["src_vmm_alive"] and out["src_vmm_in_its_netns"] and out["src_tap_attached"]
    assert out["src_tap_after_save"] is False  # the source VMM stopped
    assert out["fork_vmm_in_its_netns"] and out["fork_tap_attached"] and out["src_tap_still_detached"]
    assert out["addresses"][0] != out["addresses"][1]
    assert out["netns_left"] == []
