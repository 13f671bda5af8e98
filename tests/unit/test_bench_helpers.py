"""Pure helpers of vmfork.bench: medians, records, ratios, tables, parsers, README update."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from vmfork.bench import report
from vmfork.bench.probes import parse_smaps_rollup
from vmfork.bench.stats import (
    find,
    fmt_value,
    median,
    ratio_record,
    recompute_ratio,
    record,
    table,
)


def test_median_odd_even_and_order_free():
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([4, 1, 3, 2]) == 2.5
    assert median([7]) == 7.0
    assert median(x for x in (5, 1, 9)) == 5.0


@pytest.mark.parametrize("bad", [[], [1.0, math.nan]])
def test_median_refuses_nothing_and_nan(bad: list[float]):
    with pytest.raises(ValueError):
        median(bad)


def test_record_keeps_samples_and_takes_the_median():
    r = record("fork_ms", [3.14159, 1.0, 2.0], "ms", {"fs": "xfs"}, host={"accel": "tcg"})
    assert r == {
        "metric": "fork_ms", "value": 2.0, "unit": "ms", "n": 3, "samples": [3.142, 1.0, 2.0],
        "params": {"fs": "xfs"}, "host": {"accel": "tcg"},
    }


@pytest.mark.parametrize("unit", ["seconds", "", "MB"])
def test_record_refuses_unknown_units(unit: str):
    with pytest.raises(ValueError, match="unknown unit"):
        record("x", [1.0], unit)


def test_record_refuses_no_samples():
    with pytest.raises(ValueError, match="no samples"):
        record("x", [], "ms")


def test_ratio_record_names_its_inputs_and_can_be_recomputed():
    a = record("fork_ms", [30.0, 40.0, 50.0], "ms", {"fs": "xfs"})
    b = record("bare_ms", [20.0], "ms", {"fs": "xfs"})
    r = ratio_record("fork_over_bare", a, b, {"fs": "xfs"})
    assert r["unit"] == "ratio" and r["value"] == 2.0
    assert r["of"]["numerator"] == {"metric": "fork_ms", "params": {"fs": "xfs"}}
    assert recompute_ratio([a, b, r], r) == pytest.approx(r["value"])
    scaled = ratio_record("per_n", a, b, {}, scale=4.0)
    assert scaled["value"] == 0.5
    assert recompute_ratio([a, b, scaled], scaled) == pytest.approx(0.5)


def test_ratio_record_refuses_mixed_units():
    with pytest.raises(ValueError):
        ratio_record("x", record("a", [1.0], "ms"), record("b", [1.0], "MiB"))


def test_find_needs_exactly_one_match():
    recs = [record("m", [1.0], "ms", {"fs": "xfs", "n": 1}), record("m", [2.0], "ms", {"fs": "ext4", "n": 1})]
    assert find(recs, "m", fs="ext4")["value"] == 2.0
    with pytest.raises(KeyError):
        find(recs, "m", n=1)
    with pytest.raises(KeyError):
        find(recs, "other")


def test_formatting():
    assert fmt_value(record("a", [1234.5], "ms")) == "1.23 s"
    assert fmt_value(record("a", [12.34], "ms")) == "12.3 ms"
    assert fmt_value(record("a", [3.0], "count")) == "3"
    assert fmt_value(record("a", [1.5], "MiB")) == "1.5 MiB"
    t = table([("a", "b", "c", "d")], ("w", "x", "y", "z")).splitlines()
    assert len(t) == 3 and t[0].startswith("| w") and set(t[1]) <= {"|", "-"}


def test_targets_say_met_or_not():
    recs = [
        ratio_record("fork_host_over_bare_restore", record("a", [11.0], "ms"), record("b", [10.0], "ms"), {"fs": "xfs"}),
        ratio_record("standby_again_over_first", record("a", [5.0], "ms"), record("b", [10.0], "ms"),
                     {"config": "vmfork", "dirtied": "1 MiB"}),
    ]
    rows = {r[0]: r for r in report.target_rows(recs)}
    assert rows["fork_host_over_bare_restore"][3].endswith(" met")
    assert rows["standby_again_over_first"][3].endswith("NOT met")
    assert rows["fork_over_copy"][2] == "not measured"


def test_parse_smaps_rollup():
    text = (
        "55d0c0a00000-7ffd8f1f2000 ---p 00000000 00:00 0                          [rollup]\n"
        "Rss:               77044 kB\nPss:               58800 kB\nPss_Anon:          12000 kB\n"
        "Pss_File:          46800 kB\nSwapPss:               0 kB\n"
    )
    d = parse_smaps_rollup(text)
    assert d["Rss"] == 77044 * 1024 and d["Pss_File"] == 46800 * 1024 and "rollup" not in d


def test_update_readme_replaces_only_the_marked_section(tmp_path: Path):
    p = tmp_path / "README.md"
    report.update_readme(p, f"{report.BEGIN}\nfirst\n{report.END}")
    assert "first" in p.read_text()
    p.write_text("# Title\n\nprose before\n\n" + p.read_text().split("\n", 2)[2] + "\nprose after\n")
    report.update_readme(p, f"{report.BEGIN}\nsecond\n{report.END}")
    text = p.read_text()
    assert "second" in text and "first" not in text
    assert text.startswith("# Title") and "prose before" in text and "prose after" in text
