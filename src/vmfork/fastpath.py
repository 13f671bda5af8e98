"""``vmfork ps --json`` answered before the CLI is imported.

click alone costs several times Python's own start-up, and the Manager's imports more. A
script polling ``vmfork ps --json`` needs neither: the rows come from ``instances.view``,
the derivation the Manager itself uses, and are printed exactly as the CLI prints them.

Only this command line is answered here: the global options ``--data-dir DIR`` (or env
``VMFORK_DATA_DIR``) and ``-q``/``--quiet``, then ``ps --json``. Anything else falls
through to the CLI, and so does everything this path does not do itself:

- ``--host`` or ``VMFORK_HOST`` (a remote server answers, through the API);
- a data dir that needs recovery (``view.needs_recovery``: a crashed operation, an orphan
  VMM, a stale lock...), since every CLI command recovers first and the rows may change;
- any error (a data dir path that is a file...), so that the CLI reports it as it does.

It creates nothing, anywhere (nor does the CLI's ``ps``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def ps_json(argv: list[str]) -> str | None:
    """The output of ``vmfork ARGV`` if ARGV is ``[--data-dir DIR] [-q] ps --json``, else
    None (the CLI answers)."""
    root = _data_dir(argv)
    if root is None or os.environ.get("VMFORK_HOST"):
        return None
    from vmfork.errors import VmforkError
    from vmfork.instances import view
    from vmfork.paths import DataDir

    try:
        dd = DataDir(root)
        exists = dd.exists()
        insts = view.instances(dd.guests) if exists else []
        if exists and view.needs_recovery(root, insts):
            return None
        rows = [view.row(root, i, st, st.state) for i in insts for st in [view.status(i)]]
    except (VmforkError, OSError, ValueError):
        return None
    return json.dumps(rows, indent=2, sort_keys=True) + "\n"


def _data_dir(argv: list[str]) -> Path | None:
    """The data dir of ``[--data-dir DIR] [-q] ps --json`` (absolute, as the CLI makes it),
    None for any other command line."""
    data_dir: str | None = None
    i = 0
    while i < len(argv) and argv[i] != "ps":
        a = argv[i]
        if a in ("-q", "--quiet"):
            i += 1
        elif a == "--data-dir" and i + 1 < len(argv):
            data_dir, i = argv[i + 1], i + 2
        elif a.startswith("--data-dir="):
            data_dir, i = a.removeprefix("--data-dir="), i + 1
        else:
            return None
    rest = argv[i + 1:]
    if i == len(argv) or not rest or set(rest) != {"--json"} or data_dir == "":
        return None
    if data_dir is None:
        from vmfork.paths import default_data_dir

        return default_data_dir().absolute()
    return Path(data_dir).absolute()
