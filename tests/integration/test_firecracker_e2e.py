"""Issue 4 end to end: the ten fork-isolation steps of test_fork_isolation.py on Firecracker.

Real VMs through the real CLI with ``--hypervisor firecracker``. Runs wherever a firecracker
binary (PATH or VMFORK_FIRECRACKER_BIN) and a working KVM exist; elsewhere it skips and says
which of the two is missing. (On the machines this backend was written on neither exists:
there, only tests/unit/test_firecracker_contract.py and test_fc_vmstate.py run.)
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import CLI, data_dir_on
from tests.integration.test_fork_isolation import ten_steps

pytestmark = [pytest.mark.vm, pytest.mark.slow]


def firecracker_unavailable_reason() -> str | None:
    binary = os.environ.get("VMFORK_FIRECRACKER_BIN")
    if binary:
        return None if shutil.which(binary) else f"VMFORK_FIRECRACKER_BIN={binary} is not an executable"
    return None if shutil.which("firecracker") else "firecracker binary not found on PATH"


def kvm_unusable_reason(cli: CLI) -> str | None:
    """Firecracker needs KVM, and /dev/kvm existing is not enough (accel.py): where QEMU is
    installed, boot the image's kernel under QEMU+KVM once (cached) and ask whether it ran."""
    from vmfork.hypervisor.accel import kvm_device_problem, probe_kvm
    from vmfork.hypervisor.qemu import QemuHypervisor
    from vmfork.images import list_images

    problem = kvm_device_problem()
    if problem:
        return f"KVM not usable: {problem}"
    qemu = QemuHypervisor()
    if qemu.available() is not None:
        return None  # nothing to probe with: let Firecracker itself tell
    images = list_images(cli.data_dir / "images")
    assert images, "vmfork image build left no image"
    probe = probe_kvm(qemu.binary, qemu.version(), images[0])
    return None if probe.kvm_works else f"KVM not usable: {probe.reason}"


@pytest.fixture(scope="module", params=["xfs", "ext4"])
def fc_cli(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CLI]:
    reason = firecracker_unavailable_reason()
    if reason:
        pytest.skip(reason)
    kind = request.param
    with data_dir_on(kind, tmp_path_factory.mktemp(f"fc-{kind}")) as cli:
        reason = kvm_unusable_reason(cli)
        if reason:
            pytest.skip(reason)
        yield cli


def snapshot_config(cli: CLI, name: str) -> dict[str, object]:
    d = cli.json("inspect", name)
    assert isinstance(d, dict)
    data = json.loads((Path(d["dir"]) / "snapshots" / "snapshot-latest" / "config.json").read_text())
    assert isinstance(data, dict)
    return data


def test_fork_isolation_ten_steps_on_firecracker(fc_cli: CLI, report: list[str]) -> None:
    taken: dict[str, int] = {}

    def snapshot_type(name: str) -> None:
        # the source's first standby is Full; every later one (the fork's, restored from it,
        # and the source's after its restore) writes a Diff, which the next restore reads
        want = "Full" if name == "src" and name not in taken else "Diff"
        assert snapshot_config(fc_cli, name)["extra"]["fc_snapshot_type"] == want  # type: ignore[index]
        taken[name] = taken.get(name, 0) + 1

    ten_steps(fc_cli, report, hypervisor="firecracker", after_standby=snapshot_type)
    assert taken == {"src": 2, "f1": 1}
