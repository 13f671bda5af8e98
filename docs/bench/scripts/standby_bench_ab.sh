#!/bin/bash
# The bench's standby part, before and after, alternating (issue 16, part D):
#   docs/bench/scripts/standby_bench_ab.sh PAIRS BEFORE_SRC AFTER_SRC WORK
# BEFORE_SRC / AFTER_SRC: a src/ dir each (e.g. `git archive 1c6e8ab src | tar -x -C B`);
# both run the same QEMU (VMFORK_QEMU_BIN, default: .tools' QEMU 10). Results: WORK/<v>-<i>/res.
set -u
pairs=$1 before=$2 after=$3 work=$4
export VMFORK_QEMU_BIN=${VMFORK_QEMU_BIN:-$(realpath .tools/qemu/usr/bin/qemu-system-x86_64)}
py=${PYTHON:-.venv/bin/python}
for i in $(seq 1 "$pairs"); do
  order="before after"; [ $((i % 2)) -eq 0 ] && order="after before"
  for v in $order; do
    src=$before; [ "$v" = after ] && src=$after
    out=$work/$v-$i; mkdir -p "$out"
    echo "== $v $i $(date -u +%T) load $(cut -d' ' -f1 /proc/loadavg)"
    PYTHONPATH=$src "$py" -m vmfork.bench --only standby --work "$out" --out "$out/res" > "$out/log" 2>&1
    grep -A3 "dirtied since restore" "$out/log" | tail -1
  done
done
