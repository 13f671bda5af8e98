"""Issue 4 end to end: the ten fork-isolation steps of test_fork_isolation.py on Firecracker.

Real VMs through the real CLI with ``--hypervisor firecracker``. Runs wherever a supported
firecracker binary is found (VMFORK_FIRECRACKER_BIN, the tools dir ``make setup`` fills, PATH)
and a guest reaches userspace under it (the backend's boot probe); elsewhere it skips and says
which. On a PVM-style KVM, as here, the guest kernel dies before userspace: there the seed
scenario runs at VMM level instead (test_firecracker_vmm.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import CLI, data_dir_on
from tests.integration.test_fork_isolation import ten_steps

pytestmark = [pytest.mark.vm, pytest.mark.slow]


def firecracker_unavailable_reason() -> str | None:
    """The binary vmfork would use (--firecracker-bin / env, the tools dir, PATH), if usable."""
    from vmfork.hypervisor.firecracker import FirecrackerHypervisor

    return FirecrackerHypervisor().available()


def kvm_unusable_reason(cli: CLI) -> str | None:
    """A guest must reach userspace under this Firecracker here: the backend's own boot probe
    (fc_probe.py, cached), the one 'vmfork doctor' and 'vmfork run' use."""
    from vmfork.hypervisor.fc_probe import probe_userspace
    from vmfork.hypervisor.firecracker import FirecrackerHypervisor
    from vmfork.images import list_images

    hv = FirecrackerHypervisor()
    images = list_images(cli.data_dir / "images")
    assert images, "vmfork image build left no image"
    probe = probe_userspace(hv.binary, hv.version(), images[0])
    return None if probe.works else f"no guest userspace under Firecracker here: {probe.reason}"


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
