"""The free-space marks the watchdog and admission control work with.

- low-water (``VMFORK_SPACE_LOW_WATER``, default 64 MiB): below it, the watchdog pauses the
  guests. It must cover what guests can write between two looks of the watchdog plus the
  pause itself: guests under TCG here filled their RAM at ~320 MiB/s; the watchdog looks at
  least every 20 ms when the free space could reach the mark that soon at 1 GiB/s, and a
  pause takes a few ms. Admission keeps it free too.
- high-water (``VMFORK_SPACE_HIGH_WATER``, default twice the low-water mark): at or above
  it, the watchdog resumes the guests it paused.
- ``VMFORK_SPACE_WATCHDOG=0`` turns pausing off (the watchdog still caps console logs).

Sizes are bytes or a number with K, M, G (``128M``).
"""

from __future__ import annotations

import os

from vmfork.util import parse_size

LOW_WATER_DEFAULT = 64 << 20


def _size_env(name: str) -> int | None:
    text = os.environ.get(name, "").strip()
    if not text:
        return None
    if text.isdigit():
        return int(text)
    return parse_size(text, name)


def low_water() -> int:
    v = _size_env("VMFORK_SPACE_LOW_WATER")
    return LOW_WATER_DEFAULT if v is None else v


def high_water() -> int:
    v = _size_env("VMFORK_SPACE_HIGH_WATER")
    low = low_water()
    return max(v, low) if v is not None else 2 * low


def pausing_enabled() -> bool:
    return os.environ.get("VMFORK_SPACE_WATCHDOG", "1").strip().lower() not in ("0", "off", "no", "false")


def fmt(n: int) -> str:
    """Bytes for people: ``1.5 GiB``, ``63.9 MiB``, ``12 KiB``."""
    if n >= 1 << 30:
        return f"{n / (1 << 30):.1f} GiB"
    if n >= 1 << 20:
        return f"{n / (1 << 20):.1f} MiB"
    return f"{n >> 10} KiB"
