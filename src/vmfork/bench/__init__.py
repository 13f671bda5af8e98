"""Benchmarks of vmfork on this machine: ``python -m vmfork.bench [--quick] [--out DIR]``.

Measures fork (phase by phase, against a bare QEMU restore of the same snapshot), fork time
against guest memory on XFS (reflink) and ext4 (sparse copy), standby cost against dirtied
memory, fan-out, disk and memory per fork; writes ``results.json`` (one record per
measurement: metric, median value, unit, params, samples, host facts), ``table.md``, a plot
and the results section of ``README.md`` into the output dir (default ``docs/bench``).
Needs root (loop-mounted filesystems) and QEMU.
"""
