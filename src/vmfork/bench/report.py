"""Writing a run down: JSON, a short table, a plot, the bench README."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vmfork.bench.stats import Record, fmt_params, fmt_value, table

#: (metric, params to match, target text, check) — the figures the issue sets targets for.
TARGETS: list[tuple[str, dict[str, Any], str, Any]] = [
    ("fork_growth_largest_over_smallest", {"fs": "xfs"}, "≤ 1.5x", lambda v: v <= 1.5),
    ("fork_over_copy", {"fs": "xfs", "guest_mib": 2048}, "< 0.5x", lambda v: v < 0.5),
    ("fork_host_over_bare_restore", {}, "≤ 1.2x", lambda v: v <= 1.2),
    # issue 16: the same with a warm pool's slot (vmfork pool fill)
    ("pool_fork_host_over_bare_restore", {"pool": "slot"}, "≤ 1.1x", lambda v: v <= 1.1),
    ("standby_again_over_first", {"config": "vmfork", "dirtied": "1 MiB"}, "≤ 0.2x", lambda v: v <= 0.2),
    ("fork_over_copy_same_files", {"fs": "ext4"}, "≤ 1.1x", lambda v: v <= 1.1),
    ("fork_over_copy_same_files", {"fs": "ext4-root"}, "≤ 1.1x", lambda v: v <= 1.1),
    ("cli_version_over_python", {}, "≤ 3x", lambda v: v <= 3),
    ("cli_ps_json_over_python", {}, "≤ 5x", lambda v: v <= 5),
    ("boot_ms", {"config": "vmfork", "guest_mib": 256}, "≤ 2500 ms", lambda v: v <= 2500),
]

#: What the human table shows, in this order (metric, params that must match or None for all).
SHOWN: list[tuple[str, dict[str, Any] | None]] = [
    ("fork_phase_ms", None),
    ("fork_host_ms", None),
    ("bare_restore_ms", None),
    ("fork_host_over_bare_restore", None),
    ("fork_running_ms", None),
    ("cli_fork_standby_ms", None),
    ("inprocess_fork_standby_ms", None),
    ("cli_overhead_ms", None),
    ("python_startup_ms", None),
    ("cli_startup_ms", None),
    ("cli_ps_json_ms", None),
    ("cli_version_over_python", None),
    ("cli_ps_json_over_python", None),
    ("memfile_data_mib", None),
    ("fork_standby_ms", None),
    ("copy_memfile_ms", None),
    ("fork_over_copy", None),
    ("copy_guest_ms", None),
    ("fork_over_copy_same_files", None),
    ("fork_growth_largest_over_smallest", None),
    ("standby_ms", None),
    ("standby_again_over_first", None),
    ("standby_memfile_dirty_mib", None),
    ("restore_ms", None),
    ("fanout_wall_ms", None),
    ("fanout_wall_over_n_single", None),
    ("fork_lifecycle_disk_mib", None),
    ("fork_chain_clone_ms", None),
    ("fork_file_exclusive_mib", {"file": "memory"}),
    ("fork_file_extents", {"file": "memory"}),
    ("vmm_rss_mib", None),
    ("vmm_pss_mib", None),
    ("fanout_vmm_rss_mib", None),
    ("fanout_vmm_pss_mib", None),
    ("boot_ms", None),
    ("boot_vmm_cpu_ms", None),
    ("confine_fork_host_ms", None),
    ("confine_fork_running_ms", None),
    ("confine_vmm_spawn_ms", None),
    ("confine_boot_ms", None),
    ("confine_fork_host_on_over_off", None),
    ("confine_fork_running_on_over_off", None),
    ("confine_boot_on_over_off", None),
    ("pool_fork_host_ms", None),
    ("pool_fork_host_over_bare_restore", None),
    ("pool_fork_host_pooled_over_unpooled", None),
    ("pool_fork_claim_commit_ms", None),
    ("pool_fork_phase_ms", None),
    ("pool_fill_one_slot_ms", None),
    ("pool_slot_idle_pss_mib", None),
    ("pool_slot_disk_exclusive_mib", None),
]


def _matches(r: Record, params: dict[str, Any] | None) -> bool:
    return params is None or all(r["params"].get(k) == v for k, v in params.items())


def target_rows(records: Sequence[Record]) -> list[tuple[str, str, str, str]]:
    rows = []
    for metric, params, text, ok in TARGETS:
        hits = [r for r in records if r["metric"] == metric and _matches(r, params)]
        if not hits:
            rows.append((metric, fmt_params(params), "not measured", text))
            continue
        for r in hits:
            rows.append((metric, fmt_params(r["params"]), fmt_value(r),
                         f"{text} {'met' if ok(float(r['value'])) else 'NOT met'}"))
    return rows


def table_rows(records: Sequence[Record]) -> list[tuple[str, str, str, str]]:
    rows = []
    for metric, params in SHOWN:
        for r in records:
            if r["metric"] == metric and _matches(r, params):
                spread = ""
                if r["n"] > 1 and r["unit"] != "ratio":
                    lo, hi = min(r["samples"]), max(r["samples"])
                    spread = f"n={r['n']}, {lo:g}-{hi:g}"
                rows.append((metric, fmt_params(r["params"]), fmt_value(r), spread))
    return rows


def render_table(records: Sequence[Record]) -> str:
    t = table(target_rows(records), ("target", "params", "value", "target / status"))
    m = table(table_rows(records), ("metric", "params", "median", "runs, range"))
    return f"{t}\n\n{m}\n"


class _Lookup:
    """value(metric, **params) over one run's records; '-' where not measured."""

    def __init__(self, records: Sequence[Record]) -> None:
        self.records = records

    def rec(self, metric: str, **params: Any) -> Record | None:
        for r in self.records:
            if r["metric"] == metric and all(r["params"].get(k) == v for k, v in params.items()):
                return r
        return None

    def __call__(self, metric: str, fmt: str = "{:.1f}", **params: Any) -> str:
        r = self.rec(metric, **params)
        if r is None:
            return "-"
        v = float(r["value"])
        return f"{v:.2f}x" if r["unit"] == "ratio" else fmt.format(v)

    def values(self, metric: str, key: str, **params: Any) -> list[Any]:
        out = []
        for r in self.records:
            if (r["metric"] == metric and all(r["params"].get(k) == v for k, v in params.items())
                    and r["params"].get(key) not in out):
                out.append(r["params"].get(key))
        return out


def _md(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


PHASES = ["lookup+lock", "clone", "metadata", "fsync", "restore prep", "VMM spawn", "QMP handshake",
          "state load", "resume", "agent ready", "clock+hostname"]


def render_summary(records: Sequence[Record]) -> str:
    """The short human tables: targets, then one small table per measurement."""
    v = _Lookup(records)
    parts = ["**Targets**", "", table(target_rows(records), ("target", "params", "value", "target / status"))]
    fs = "xfs" if v.rec("fork_host_ms", fs="xfs") else "ext4"
    configs = v.values("fork_host_ms", "config")
    rows = [[p, *(v("fork_phase_ms", fs=fs, config=c, phase=p) for c in configs)] for p in PHASES]
    rows += [
        ["**host side** (to resume)", *(v("fork_host_ms", fs=fs, config=c) for c in configs)],
        ["bare QEMU restore (floor)", *(v("bare_restore_ms", fs=fs, config=c) for c in configs)],
        ["host side / floor", *(v("fork_host_over_bare_restore", fs=fs, config=c) for c in configs)],
        ["fork to running, agent answering", *(v("fork_running_ms", fs=fs, config=c) for c in configs)],
    ]
    parts += ["", f"**1. Fork breakdown** (standby source → running fork, {fs}, ms, median)", "",
              _md(["phase", *configs], rows)]
    parts += ["", "CLI: " + ", ".join([
        f"`vmfork fork` (to standby) {v('cli_fork_standby_ms')} ms",
        f"the same call in-process {v('inprocess_fork_standby_ms')} ms",
        f"overhead {v('cli_overhead_ms')} ms",
    ]) + ". Start-up: " + ", ".join([
        f"`python -c pass` {v('python_startup_ms')} ms",
        f"`vmfork --version` {v('cli_startup_ms')} ms ({v('cli_version_over_python')})",
        f"`vmfork ps --json` {v('cli_ps_json_ms')} ms ({v('cli_ps_json_over_python')})",
    ]) + "."]
    sizes = sorted(v.values("fork_standby_ms", "guest_mib"))
    fss = v.values("fork_standby_ms", "fs")
    rows = []
    for mib in sizes:
        row = [str(mib), v("memfile_data_mib", "{:.0f}", fs=fss[0], guest_mib=mib)]
        for f in fss:
            row += [v("fork_standby_ms", fs=f, guest_mib=mib),
                    v("copy_memfile_ms", fs=f, guest_mib=mib, tool="cp --reflink=never + fsync"),
                    v("copy_guest_ms", fs=f, guest_mib=mib),
                    v("fork_over_copy_same_files", fs=f, guest_mib=mib)]
        rows.append(row)
    rows.append(["fork largest/smallest", "", *[x for f in fss for x in
                 (v("fork_growth_largest_over_smallest", fs=f), "", "", "")]])
    heads = ["guest MiB", "mem-file data MiB"] + [h for f in fss for h in (
        f"{f} fork", f"{f} cp mem-file+fsync", f"{f} cp same files+sync -f", f"{f} fork / same")]
    parts += ["", "**2. Fork (to standby) vs guest memory** (ms; the guest wrote ~45 % of its RAM, random bytes; "
              "\"same files\": `cp -a` of the files the fork copies — mem-file, device state, config, data disk — "
              "then `sync -f`; ext4-root: the host's own ext4)", "",
              _md(heads, rows)]
    sconfigs = v.values("standby_ms", "config")
    rows = []
    for d in v.values("standby_ms", "dirtied", config=sconfigs[0] if sconfigs else None):
        row = [str(d)]
        for c in sconfigs:
            row += [v("standby_ms", config=c, dirtied=d), v("standby_memfile_dirty_mib", config=c, dirtied=d),
                    "" if d == "boot" else v("standby_again_over_first", config=c, dirtied=d)]
        rows.append(row)
    for src in ("not forked", "forked"):
        rows.append([f"restore ({src} source)", *[x for c in sconfigs for x in (v("restore_ms", config=c, source=src), "", "")]])
    heads = ["dirtied since restore"] + [h for c in sconfigs for h in (f"{c} ms", "dirty MiB", "/ first")]
    parts += ["", "**3. Standby cost vs dirtied memory** (xfs; first standby after boot, then restore, dirty, standby)", "",
              _md(heads, rows)]
    rows = []
    for n in sorted(v.values("fanout_wall_ms", "n")):
        rows.append([str(n), v("fanout_wall_ms", target="standby", n=n),
                     v("fanout_wall_over_n_single", target="standby", n=n) if n > 1 else "",
                     v("fanout_wall_ms", target="running", n=n),
                     v("fanout_wall_over_n_single", target="running", n=n) if n > 1 else ""])
    parts += ["", "**4. Fan-out** (N `vmfork fork` commands started together; wall ms, and wall / (N x single))", "",
              _md(["N", "to standby", "/ N x single", "to running", "/ N x single"], rows)]
    rows = []
    for r in records:
        if r["metric"] != "fork_lifecycle_disk_mib":
            continue
        p = r["params"]
        gens = p.get("generations", 1)
        rows.append([p["fs"], p["config"], f"{float(r['value']):.1f}",
                     v("fork_file_exclusive_mib", fs=p["fs"], config=p["config"], file="memory"),
                     v("fork_file_extents", "{:.0f}", fs=p["fs"], config=p["config"], file="memory"),
                     f"{v('fork_chain_clone_ms', fs=p['fs'], config=p['config'], generation=1)} → "
                     f"{v('fork_chain_clone_ms', fs=p['fs'], config=p['config'], generation=gens)}"])
    parts += ["", "**5. Disk per fork generation** (fork, restore, write a line, standby; each generation forked "
              "from the previous one)", "",
              _md(["fs", "config", "disk MiB / generation", "mem-file MiB not shared", "mem-file extents (last)",
                   "clone ms (first → last)"], rows)]
    rows = []
    for r in records:
        if r["metric"] in ("vmm_rss_mib", "fanout_vmm_rss_mib"):
            p = r["params"]
            pss = v(r["metric"].replace("rss", "pss"), **p)
            rows.append([p.get("config", ""), str(p.get("n")), f"{float(r['value']):.1f}", pss,
                         "fan-out" if r["metric"].startswith("fanout") else "one after another"])
    parts += ["", "**6. Memory per running fork** (QEMU process, smaps_rollup, MiB, median over the forks)", "",
              _md(["config", "forks running", "RSS", "PSS", "started"], rows)]
    rows = [[what, *(v(metric, confined=c) for c in ("off", "on")), v(ratio)] for what, metric, ratio in (
        ("fork to running, host side", "confine_fork_host_ms", "confine_fork_host_on_over_off"),
        ("fork to running, agent answering", "confine_fork_running_ms", "confine_fork_running_on_over_off"),
        ("of which VMM spawn", "confine_vmm_spawn_ms", ""),
        ("cold boot, agent answering", "confine_boot_ms", "confine_boot_on_over_off"))]
    parts += ["", "**7. Cost of VMM confinement** (own uid, namespaces, cgroup, -sandbox; ms, median, "
              "interleaved in one run)", "", _md(["", "unconfined", "confined", "confined / unconfined"], rows)]
    return "\n".join(parts) + "\n"


def host_line(host: dict[str, Any]) -> str:
    keys = ("os", "kernel", "cpu", "cores", "mem_gib", "qemu", "accel", "thp_enabled", "python",
            "vmfork_commit", "load_at_start", "load_at_end")
    return "; ".join(f"{k}: {host.get(k)}" for k in keys if host.get(k) not in (None, ""))


def write_json(path: Path, doc: dict[str, Any]) -> None:
    path.write_text(json.dumps(doc, indent=1, sort_keys=False) + "\n")


def plot(records: Sequence[Record], path: Path) -> str | None:
    """fork time vs guest memory per filesystem (with cp), and fan-out; None or why not."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return f"matplotlib not available ({e}); install the dev extra"
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for fs, style in (("xfs", "o-"), ("ext4", "s-")):
        fk = sorted((r["params"]["guest_mib"], r["value"]) for r in records
                    if r["metric"] == "fork_standby_ms" and r["params"].get("fs") == fs)
        cp = sorted((r["params"]["guest_mib"], r["value"]) for r in records
                    if r["metric"] == "copy_memfile_ms" and r["params"].get("fs") == fs
                    and r["params"].get("tool") == "cp --reflink=never")
        if fk:
            a.plot([x for x, _ in fk], [y for _, y in fk], style, label=f"fork to standby, {fs}")
        if cp:
            a.plot([x for x, _ in cp], [y for _, y in cp], style.replace("-", "--"), alpha=0.6,
                   label=f"cp of the mem-file, {fs}")
        cps = sorted((r["params"]["guest_mib"], r["value"]) for r in records
                     if r["metric"] == "copy_memfile_ms" and r["params"].get("fs") == fs
                     and r["params"].get("tool") == "cp --reflink=never + fsync")
        if cps:
            a.plot([x for x, _ in cps], [y for _, y in cps], style.replace("-", ":"), alpha=0.6,
                   label=f"cp + fsync, {fs}")
    a.set_xscale("log", base=2)
    a.set_yscale("log")
    a.set_xlabel("guest RAM (MiB); the guest wrote ~45 % of it")
    a.set_ylabel("ms (median)")
    a.set_title("Fork vs guest memory")
    a.legend(fontsize=8)
    a.grid(True, which="both", alpha=0.3)
    for target, style in (("standby", "o-"), ("running", "s-")):
        pts = sorted((r["params"]["n"], r["value"]) for r in records
                     if r["metric"] == "fanout_wall_ms" and r["params"].get("target") == target)
        if pts:
            b.plot([x for x, _ in pts], [y for _, y in pts], style, label=f"N forks to {target}, wall")
            single = dict(pts).get(1)
            if single:
                b.plot([x for x, _ in pts], [x * single for x, _ in pts], ":", alpha=0.6,
                       label=f"N x single ({target})")
    b.set_xlabel("N forks started together")
    b.set_ylabel("ms (median)")
    b.set_title("Fan-out")
    b.legend(fontsize=8)
    b.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


def readme_section(doc: dict[str, Any], summary_md: str, plot_name: str | None) -> str:
    lines = [
        BEGIN,
        f"Latest run: `{doc['command']}` ({doc['mode']} mode, {doc['started_at']}, "
        f"{doc['duration_s']:.0f} s). Data: [`results.json`](results.json).",
        "",
        f"Host: {host_line(doc['host'])}.",
        "",
    ]
    if doc.get("skipped"):
        lines += ["Skipped: " + "; ".join(doc["skipped"]) + ".", ""]
    lines += [summary_md.rstrip(), "", "Every record (all parameters, samples and ranges): [`table.md`](table.md).", ""]
    if plot_name:
        lines += [f"![fork time vs guest memory, and fan-out]({plot_name})", ""]
    lines.append(END)
    return "\n".join(lines)


def update_readme(path: Path, section: str) -> None:
    """Replace the marked section of ``path`` (or create the file with it)."""
    if path.exists():
        text = path.read_text()
        if BEGIN in text and END in text:
            text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _m: section, text, flags=re.S)
        else:
            text = text.rstrip() + "\n\n" + section + "\n"
    else:
        text = "# vmfork benchmarks\n\n" + section + "\n"
    path.write_text(text)
