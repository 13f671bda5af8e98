"""``python -m vmfork.bench [--quick] [--out DIR]``: measure vmfork on this machine."""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from vmfork.bench import report
from vmfork.bench.runner import PARTS, Bench, Plan


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vmfork.bench", description=__doc__)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="fewer sizes and runs (< 2 min)")
    mode.add_argument("--smoke", action="store_true", help="the smallest run that yields every metric (tests)")
    ap.add_argument("--out", type=Path, default=None,
                    help="where results go [docs/bench; with --only: vmfork-bench-results under the --work base]")
    ap.add_argument("--work", type=Path, default=None,
                    help="scratch dir for the loop-mounted filesystems [a new dir under /var/tmp]")
    ap.add_argument("--no-readme", action="store_true", help="do not update OUT/README.md")
    ap.add_argument("--only", default="", metavar="PART[,PART...]",
                    help=f"run only these parts: {', '.join(PARTS)} (implies --no-readme) [all]")
    args = ap.parse_args(argv)
    only = tuple(p for p in args.only.split(",") if p)
    unknown = [p for p in only if p not in PARTS]
    if unknown:
        ap.error(f"unknown part {unknown[0]!r} in --only: use {', '.join(PARTS)}")
    if only:
        args.no_readme = True  # a partial run does not replace the README's tables
    plan = Plan.for_mode("smoke" if args.smoke else "quick" if args.quick else "full")
    base = args.work or Path("/var/tmp")
    base.mkdir(parents=True, exist_ok=True)
    if args.out is None:  # a partial run does not replace the full run's results
        args.out = base / "vmfork-bench-results" if only else Path("docs/bench")
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    started_at = datetime.now(UTC).isoformat(timespec="seconds")

    def say(msg: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {msg}", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="vmfork-bench-", dir=base) as work:
        bench = Bench(plan, Path(work), say, only)
        bench.run()
    command = "python -m vmfork.bench" + "".join(f" {shlex.quote(a)}" for a in (argv if argv is not None else sys.argv[1:]))
    doc = {
        "schema": "vmfork-bench/1",
        "command": command,
        "mode": plan.mode,
        "started_at": started_at,
        "duration_s": round(time.monotonic() - started, 1),
        "host": bench.host,
        "skipped": bench.skipped,
        "records": bench.records,
    }
    report.write_json(args.out / "results.json", doc)
    (args.out / "table.md").write_text(report.render_table(bench.records))
    summary_md = report.render_summary(bench.records)
    plot_name = "bench.png"
    why = report.plot(bench.records, args.out / plot_name)
    if why:
        say(f"no plot: {why}")
        plot_name = ""
    if not args.no_readme:
        report.update_readme(args.out / "README.md", report.readme_section(doc, summary_md, plot_name or None))
    print(summary_md)
    print(f"host: {report.host_line(bench.host)}")
    print(f"results: {args.out / 'results.json'} ({len(bench.records)} records, {doc['duration_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
