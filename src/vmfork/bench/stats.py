"""Pure helpers of the benchmark: medians, records, ratios, the human table."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

UNITS = ("ms", "MiB", "ratio", "count")

Record = dict[str, Any]


def median(values: Iterable[float]) -> float:
    """The median of ``values`` (the mean of the two middle ones for an even count).

    Raises ValueError on no values or on a NaN.
    """
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("median of no values")
    if any(math.isnan(v) for v in vals):
        raise ValueError("median of a NaN")
    return float(statistics.median(vals))


def record(metric: str, samples: Sequence[float], unit: str, params: dict[str, Any] | None = None,
           *, host: dict[str, Any] | None = None, digits: int = 3) -> Record:
    """One measurement: the median of ``samples`` (all kept, rounded) with its unit and params."""
    if unit not in UNITS:
        raise ValueError(f"unknown unit {unit!r}; use one of {', '.join(UNITS)}")
    if not samples:
        raise ValueError(f"{metric}: no samples")
    return {
        "metric": metric,
        "value": round(median(samples), digits),
        "unit": unit,
        "n": len(samples),
        "samples": [round(float(s), digits) for s in samples],
        "params": dict(params or {}),
        "host": dict(host or {}),
    }


def ratio_record(metric: str, numerator: Record, denominator: Record, params: dict[str, Any] | None = None,
                 *, scale: float = 1.0, host: dict[str, Any] | None = None) -> Record:
    """``numerator.value / (scale * denominator.value)`` as a record naming both inputs.

    The inputs are referenced by metric and params (``of``), so a reader (or a test) can
    recompute the ratio from the same run's records.
    """
    if numerator["unit"] != denominator["unit"]:
        raise ValueError(f"{metric}: {numerator['unit']} over {denominator['unit']}")
    den = scale * float(denominator["value"])
    value = float(numerator["value"]) / den if den else math.inf
    return {
        "metric": metric,
        "value": round(value, 3),
        "unit": "ratio",
        "n": 1,
        "samples": [round(value, 3)],
        "params": dict(params or {}),
        "of": {
            "numerator": {"metric": numerator["metric"], "params": numerator["params"]},
            "denominator": {"metric": denominator["metric"], "params": denominator["params"]},
            "scale": scale,
        },
        "host": dict(host or {}),
    }


def find(records: Iterable[Record], metric: str, **params: Any) -> Record:
    """The one record of ``metric`` whose params include ``params``; KeyError otherwise."""
    hits = [r for r in records if r["metric"] == metric and all(r["params"].get(k) == v for k, v in params.items())]
    if len(hits) != 1:
        raise KeyError(f"{len(hits)} records of {metric} with {params}")
    return hits[0]


def recompute_ratio(records: Sequence[Record], r: Record) -> float:
    """The value a ratio record should have, from the records it names."""
    num = find(records, r["of"]["numerator"]["metric"], **r["of"]["numerator"]["params"])
    den = find(records, r["of"]["denominator"]["metric"], **r["of"]["denominator"]["params"])
    return float(num["value"]) / (float(r["of"]["scale"]) * float(den["value"]))


def fmt_value(r: Record) -> str:
    v, unit = float(r["value"]), r["unit"]
    if unit == "ratio":
        return f"{v:.2f}x"
    if unit == "count":
        return f"{v:.0f}"
    if unit == "ms":
        return f"{v:.1f} ms" if v < 1000 else f"{v / 1000:.2f} s"
    return f"{v:.1f} {unit}"


def fmt_params(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items())


def table(rows: Sequence[tuple[str, str, str, str]], headers: tuple[str, str, str, str]) -> str:
    """A Markdown table (also readable as plain text)."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    out = [line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in rows]
    return "\n".join(out)
