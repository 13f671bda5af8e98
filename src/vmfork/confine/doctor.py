"""What confinement a VMM gets on this host, checked by doing it (for ``vmfork doctor``)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from vmfork.confine import QEMU_SANDBOX, cgroups, ids, mode

Check = tuple[str, str, str]  # name, status (ok/warn/fail/info), detail


def _probe_launch(work: Path) -> str | None:
    """Start ``true`` the way a VMM is started (namespaces, pivot_root, uid of nobody,
    no_new_privs); None if that worked, else why not."""
    from vmfork.confine.launch import Spec, child_setup, host_root_entries

    guest = work / "guest"
    root = work / "root"
    guest.mkdir()
    root.mkdir()
    links, dirs = host_root_entries()
    spec = Spec(uid=65534, gid=65534, groups=(), mountpoint=str(root), guest_dir=str(guest), ro_dirs=(),
                root_links=links, root_dirs=dirs)
    true = shutil.which("true") or "/bin/true"
    try:
        p = subprocess.run([true], cwd=guest, preexec_fn=child_setup(spec), capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as e:
        return str(e)
    if p.returncode != 0:
        return p.stderr.decode(errors="replace").strip() or f"exit {p.returncode}"
    return None


def _probe_sandbox(binary: str) -> str | None:
    try:
        p = subprocess.run([binary, "-sandbox", QEMU_SANDBOX, "-M", "none", "-nodefaults", "-display", "none",
                            "-monitor", "stdio"], input=b"quit\n", capture_output=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as e:
        return str(e)
    return None if p.returncode == 0 else (p.stderr.decode(errors="replace").strip() or f"exit {p.returncode}")


def checks(data_dir: Path, qemu_binary: str | None) -> list[Check]:
    out: list[Check] = []
    m = mode()
    if m == "0":
        return [("confinement", "warn", "off (VMFORK_CONFINE=0): every VMM runs as vmfork's user, unconfined")]
    if os.geteuid() != 0:
        return [("confinement", "warn" if m == "auto" else "fail",
                 "vmfork does not run as root: VMMs run as this user, without their own uid, namespaces or cgroups")]
    first, last = ids.uid_range()
    reg = ids.registry()
    claimed = sum(1 for f in reg.iterdir() if f.name.isdigit()) if reg.is_dir() else 0
    out.append(("vmm uids", "ok", f"one per instance from {first}-{last} (VMFORK_UID_RANGE), "
                                  f"{claimed} claimed in {reg}"))
    work = Path(tempfile.mkdtemp(prefix=".confine-probe-", dir=data_dir))
    try:
        problem = _probe_launch(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out.append(("vmm namespaces", "fail" if problem else "ok",
                f"cannot start a confined process: {problem}" if problem else
                "private mount (pivot_root to a minimal tree), network and IPC namespaces; "
                "/proc shows the VMM's own processes only; no_new_privs"))
    out.append(("pid namespace", "info", "not used: the recorded pid must be the VMM itself (recovery finds "
                                         "VMMs by pid and cwd); /proc inside is hidepid=invisible instead"))
    h, why = cgroups.detect()
    if h is None:
        out.append(("cgroups", "fail", f"{why}: no per-instance limits, VMMs cannot be confined"))
    else:
        knobs = ["memory", "pids"] + (["cpu"] if "cpu" in h.dirs else [])
        io = cgroups.io_weight_file(h)
        detail = f"{why}; limits: {', '.join(knobs)}" + (f", I/O weight ({io})" if io else "")
        out.append(("cgroups", "ok", detail))
        if io is None:
            out.append(("I/O weight", "warn", "no io.weight/blkio.weight on this host: --io-weight is refused"))
    if qemu_binary and shutil.which(qemu_binary):
        problem = _probe_sandbox(qemu_binary)
        out.append(("qemu -sandbox", "fail" if problem else "ok",
                    f"QEMU refuses -sandbox: {problem}" if problem else f"seccomp: -sandbox {QEMU_SANDBOX}"))
    out.append(("firecracker jailer", "info", "not used: vmfork applies the same steps (uid, namespaces, "
                                              "cgroup) to both backends; Firecracker keeps its own seccomp filters"))
    out.append(("MAC labels", "info", "no SELinux/AppArmor label per VMM (see README, Security model)"))
    return out
