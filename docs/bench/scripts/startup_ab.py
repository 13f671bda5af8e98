"""`vmfork --version` and `vmfork ps --json` of two source trees against `python -c pass`,
interleaved (bytecode cache on), as ratios of the medians.

    python startup_ab.py BEFORE_SRC AFTER_SRC [RUNS [DATA_DIR]]

With DATA_DIR (an existing data dir, e.g. one with an instance in standby, as the bench's
start-up part has), ``ps --json`` is also timed on it (read-only: both trees leave it as it is).
"""

import os
import statistics
import subprocess
import sys
import tempfile
import time

before, after = sys.argv[1], sys.argv[2]
n = int(sys.argv[3]) if len(sys.argv) > 3 else 21
given = sys.argv[4] if len(sys.argv) > 4 else None
env0 = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
with tempfile.TemporaryDirectory() as tmp:
    dd_b, dd_a = os.path.join(tmp, "b"), os.path.join(tmp, "a")
    os.mkdir(dd_b)
    os.mkdir(dd_a)
    entry_a = "vmfork" if os.path.exists(os.path.join(after, "vmfork", "__main__.py")) else "vmfork.cli"
    entry_b = "vmfork" if os.path.exists(os.path.join(before, "vmfork", "__main__.py")) else "vmfork.cli"
    cmds = {
        "python -c pass": (["-c", "pass"], after),
        "before: vmfork --version": (["-m", entry_b, "--version"], before),
        "after:  vmfork --version": (["-m", entry_a, "--version"], after),
        "before: vmfork ps --json": (["-m", entry_b, "--data-dir", dd_b, "ps", "--json"], before),
        "after:  vmfork ps --json": (["-m", entry_a, "--data-dir", dd_a, "ps", "--json"], after),
    }
    if given:
        cmds["before: ps --json DATA_DIR"] = (["-m", entry_b, "--data-dir", given, "ps", "--json"], before)
        cmds["after:  ps --json DATA_DIR"] = (["-m", entry_a, "--data-dir", given, "ps", "--json"], after)

    def run(argv: list[str], src: str) -> float:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, *argv], env=env0 | {"PYTHONPATH": src}, capture_output=True, check=True)
        return (time.perf_counter() - t0) * 1000

    for argv, src in cmds.values():  # warm up
        run(argv, src)
    xs: dict[str, list[float]] = {k: [] for k in cmds}
    for _ in range(n):
        for k, (argv, src) in cmds.items():
            xs[k].append(run(argv, src))
    base = statistics.median(xs["python -c pass"])
    for k, v in xs.items():
        per_run = statistics.median(a / b for a, b in zip(v, xs["python -c pass"], strict=True))
        print(f"{k:28} median {statistics.median(v):7.1f} ms [{min(v):.1f}-{max(v):.1f}]  "
              f"{statistics.median(v) / base:5.2f}x (median of per-run ratios {per_run:5.2f}x)")
    print("left in an empty data dir by ps: before", sorted(os.listdir(dd_b)), "after", sorted(os.listdir(dd_a)))
