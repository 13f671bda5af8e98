"""The main process of an OCI image guest: what to run (the image's Entrypoint/Cmd/Env/
WorkingDir/User with the user's overrides), the guest commands that start it or run an exec
inside the image root, and reading its state back (bounded and escaped: guest text)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from vmfork.errors import InvalidArgument

IMAGE_ROOT = "/image/root"
MAIN = "/sbin/vmfork-main"
RUN = "/sbin/vmfork-run"
STATE_CMD = ["sh", "-c", "cd /run/vmfork-main 2>/dev/null && for f in state pid exit; do "
             "printf '%s=' $f; head -c 64 $f 2>/dev/null; echo; done"]
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def resolve(spec: dict[str, Any], *, env: Sequence[str] = (), workdir: str | None = None,
            entrypoint: str | Sequence[str] | None = None, args: Sequence[str] | None = None) -> dict[str, Any]:
    """The main process: Docker's rules (``--entrypoint`` replaces Entrypoint and drops the
    image's Cmd; ARGS replace Cmd; ``-e`` adds or replaces; ``-w`` replaces WorkingDir).
    ``entrypoint`` is one command (the CLI's) or a list (the API's, as hypeman's)."""
    merged: dict[str, str] = {}
    for e in [*spec.get("env", []), *env]:
        k, sep, v = str(e).partition("=")
        if not sep or not _ENV_NAME.match(k):
            raise InvalidArgument(f"invalid environment variable {e!r}: use KEY=VALUE")
        merged.pop(k, None)
        merged[k] = v
    if entrypoint is None:
        ep = list(spec.get("entrypoint", []))
    else:
        ep = [entrypoint] if isinstance(entrypoint, str) else list(entrypoint)
    cmd = list(args) if args else ([] if entrypoint is not None else list(spec.get("cmd", [])))
    argv = [str(x) for x in ep + cmd]
    if not argv:
        raise InvalidArgument("the image has no Entrypoint or Cmd: give a command after '--'")
    wd = workdir or str(spec.get("workdir") or "/")
    if not wd.startswith("/"):
        raise InvalidArgument(f"invalid working directory {wd!r}: must be absolute")
    return {"argv": argv, "env": [f"{k}={v}" for k, v in merged.items()], "workdir": wd,
            "uid": int(spec.get("uid", 0)), "gid": int(spec.get("gid", 0)),
            "gids": [int(g) for g in spec.get("gids", [])]}


def run_args(main: dict[str, Any], argv: Sequence[str] | None = None, *, env: Sequence[str] = (),
             workdir: str | None = None) -> list[str]:
    """vmfork-run's arguments for ``main`` (or for ``argv`` as an exec beside it)."""
    out = ["-r", IMAGE_ROOT, "-w", workdir or str(main["workdir"]), "-u", str(main["uid"]),
           "-g", str(main["gid"])]
    if main.get("gids"):
        out += ["-G", ",".join(str(g) for g in main["gids"])]
    out.append("-E")
    for e in [*main["env"], *env]:
        out += ["-e", str(e)]
    return [*out, "--", *(argv if argv is not None else main["argv"])]


def start_argv(main: dict[str, Any]) -> list[str]:
    return [MAIN, *run_args(main)]


def exec_argv(main: dict[str, Any], argv: Sequence[str], env: dict[str, str] | None,
              cwd: str | None) -> list[str]:
    """An exec inside the image root, with the image's Env (plus ``env``), User and WorkingDir."""
    return [RUN, *run_args(main, argv, env=[f"{k}={v}" for k, v in (env or {}).items()], workdir=cwd)]


def parse_state(text: str) -> dict[str, Any]:
    """The main process's state from the guest's ``state=…``/``pid=…``/``exit=…`` lines."""
    vals: dict[str, str] = {}
    for line in text[:1024].splitlines()[:8]:
        k, _, v = line.partition("=")
        vals[k.strip()] = v.strip()
    state = vals.get("state", "")
    if state not in ("starting", "running", "exited"):
        state = "not started" if not state else "unknown"
    pid = vals.get("pid", "")
    code = vals.get("exit", "")
    return {"state": state, "pid": int(pid) if pid.isdigit() and len(pid) <= 10 else None,
            "exit_code": int(code) if code.isdigit() and len(code) < 4 else None}
