"""``python -m vmfork.bench.api [--runs N] [--out FILE]``: fork through the HTTP API vs
in-process (the Manager) vs the CLI, to standby and to running, on one XFS (reflink) loop
filesystem: what the API saves of the CLI's start-up.

Each way forks the same standby source; every fork is removed before the next (its removal
is not timed). Medians over ``--runs``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _median_ms(xs: list[float]) -> float:
    return round(statistics.median(xs) * 1000, 1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vmfork.bench.api", description=__doc__)
    ap.add_argument("--runs", type=int, default=10, help="forks per way and target [10]")
    ap.add_argument("--running-runs", type=int, default=3, help="forks to running per way [3]")
    ap.add_argument("--out", type=Path, default=Path("docs/bench/api.json"))
    ap.add_argument("--fs", default="xfs", help="loop filesystem: xfs or ext4 [xfs]")
    args = ap.parse_args(argv)

    from vmfork import Client
    from vmfork.bench.probes import loop_fs
    from vmfork.instances import Manager

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    base = Path("/var/tmp")
    results: dict[str, Any] = {"runs": args.runs, "running_runs": args.running_runs, "fs": args.fs}
    with tempfile.TemporaryDirectory(prefix="vmfork-bench-api-", dir=base) as work, \
            loop_fs(args.fs, 12000, Path(work)) as root:
        data = root / "data"
        mgr = Manager(data)
        say("booting the source")
        mgr.run("src", memory_mib=256)
        mgr.standby("src")
        log = open(Path(work) / "serve.log", "wb")  # noqa: SIM115 (closed below)
        server = subprocess.Popen([sys.executable, "-m", "vmfork.cli", "--data-dir", str(data), "serve"],
                                  stdout=log, stderr=log)
        try:
            sock = data / "vmfork.sock"
            for _ in range(600):
                if sock.exists():
                    break
                time.sleep(0.05)
            client = Client(str(sock))
            client.health()
            cli = [sys.executable, "-m", "vmfork.cli", "--data-dir", str(data), "-q"]
            n = 0

            def ways(target: str) -> dict[str, Callable[[str], object]]:
                return {  # one call each: the API way is one POST
                    "in_process": lambda name: mgr.fork("src", name, target_state=target),
                    "api": lambda name: client.json("POST", "/instances/src/fork",
                                                    json={"name": name, "target_state": target}),
                    "cli": lambda name: subprocess.run([*cli, "fork", "src", name, "--target-state", target],
                                                       check=True, capture_output=True),
                }

            for target, runs in (("standby", args.runs), ("running", args.running_runs)):
                times: dict[str, list[float]] = {w: [] for w in ways(target)}
                for _ in range(runs):
                    for way, fn in ways(target).items():  # interleaved: the same host load for each
                        n += 1
                        name = f"f{n}"
                        t0 = time.monotonic()
                        fn(name)
                        times[way].append(time.monotonic() - t0)
                        mgr.rm(name, force=True)
                results[f"fork_to_{target}_ms"] = {w: _median_ms(t) for w, t in times.items()}
                r = results[f"fork_to_{target}_ms"]
                results[f"fork_to_{target}_api_over_in_process"] = round(r["api"] / r["in_process"], 2)
                say(f"fork to {target}: {r}")
            client.close()
        finally:
            server.terminate()
            server.wait(60)
            log.close()
            mgr.rm("src", force=True)
    results["command"] = "python -m vmfork.bench.api" + "".join(f" {a}" for a in (argv or sys.argv[1:]))
    results["host_load"] = os.getloadavg()[0]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
