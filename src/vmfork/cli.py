"""The ``vmfork`` command line."""

from __future__ import annotations

import errno
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NoReturn

import click

from vmfork import __version__, util
from vmfork.errors import InvalidArgument, NoSpace, NotFound, VmforkError
from vmfork.paths import PRIVATE_UMASK, DataDir, default_data_dir

# Text we print is never read as markup or emoji codes (guest text such as "[/]" or ":x:"
# would break or change it): styles are given as Text styles. Output that is not to a
# terminal is never wrapped (a pipe gets each line whole). rich is imported on first use only:
# it costs more than Python's own start-up, and `--json` output or `--version` never need it.


class _LazyConsole:
    """A rich Console, made when first used."""

    def __init__(self, stderr: bool) -> None:
        self._stderr = stderr
        self._console: Any = None

    def __getattr__(self, name: str) -> Any:
        if self._console is None:
            from rich.console import Console

            c = Console(stderr=self._stderr, markup=False, emoji=False, highlight=False, soft_wrap=True)
            if not c.is_terminal:
                c.width = 1 << 16
            self._console = c
        return getattr(self._console, name)


err = _LazyConsole(stderr=True)
out = _LazyConsole(stderr=False)
_clean = util.one_line


def _text() -> Any:
    """rich's Text class (imported on first use)."""
    from rich.text import Text

    return Text


def _table(**kw: Any) -> Any:
    from rich.table import Table

    return Table(**kw)


def _print_table(cols: tuple[str, ...], rows: Iterable[tuple[str, ...]]) -> None:
    """A plain table (rich imported here: only a human listing needs it), cells escaped."""
    t = _table(box=None, pad_edge=False)
    for col in cols:
        t.add_column(col)
    for r in rows:
        t.add_row(*map(_clean, r))
    out.print(t)


def _fail(e: VmforkError) -> NoReturn:
    err.print(_text().assemble(("vmfork: error:", "bold red"), " ", _clean(str(e))))
    sys.exit(e.exit_code)


class Ctx:
    def __init__(self, data_dir: Path, quiet: bool, host: str | None = None) -> None:
        self.data_dir = data_dir
        self.quiet = quiet
        self.host = host  # act through a server (vmfork serve) instead of on the data dir
        self._mgr: Any = None
        self._mgr_creates = False

    def progress(self, msg: str) -> None:
        if not self.quiet:
            err.print(_text()(f"· {_clean(msg)}", style="dim"))

    def data_dir_exists(self) -> bool:
        """For read-only commands, which create nothing: False where there is no data dir
        yet (one-line error where the path is a file or lies under one)."""
        return bool(self.host) or DataDir(self.data_dir).exists()

    def find(self, name: str) -> Any:
        """The instance NAME, for a read-only command."""
        if not self.data_dir_exists():
            raise NotFound(f"instance '{name}' not found")
        return self.view.find(name)

    @property
    def mgr(self) -> Any:
        """The Manager (or, with --host, the server acting as one); makes the data dir."""
        if self._mgr is None and self.host:
            from vmfork.remote import RemoteManager

            self._mgr, self._mgr_creates = RemoteManager(self.host, self.progress), True
        if self._mgr is None or not self._mgr_creates:
            self._manager(create=True)
        return self._mgr

    @property
    def view(self) -> Any:
        """The Manager for read-only commands (ps, inspect, logs): makes nothing in the data dir."""
        if self.host:
            return self.mgr
        if self._mgr is None:
            self._manager(create=False)
        return self._mgr

    def _manager(self, create: bool) -> None:
        from vmfork.instances.manager import Manager

        self._mgr, self._mgr_creates = Manager(self.data_dir, self.progress, create=create), create
        for action in self._mgr.recover():
            err.print(_text().assemble(("vmfork: recovered:", "yellow"), " ", _clean(action)))


class VmforkGroup(click.Group):
    """Turns VmforkError into one clear line and an exit code, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except VmforkError as e:
            _fail(e)
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            _fail(NoSpace(f"no space left on device{f': {e.filename}' if e.filename else ''}"))
        except KeyboardInterrupt:
            err.print("vmfork: interrupted")
            sys.exit(130)


def _emit(as_json: bool, data: Any, human: Callable[[], None]) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2, sort_keys=True))
    else:
        human()


json_opt = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
overcommit_opt = click.option(
    "--overcommit", is_flag=True,
    help="Start even if the free space cannot hold all the guest RAM that the guests on this filesystem "
         "could still claim (a guest that finds no space for its RAM is paused, or dies).")


@click.group(cls=VmforkGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--data-dir", type=click.Path(path_type=Path), envvar="VMFORK_DATA_DIR",
              default=None, help="Where instances and images live [env VMFORK_DATA_DIR; default ~/.local/share/vmfork].")
@click.option("-q", "--quiet", is_flag=True, help="No progress messages on stderr.")
@click.option("--firecracker-bin", type=click.Path(path_type=Path), envvar="VMFORK_FIRECRACKER_BIN",
              default=None, help="The firecracker binary [env VMFORK_FIRECRACKER_BIN; default: .tools/bin of the project "
                   "(make setup), else PATH].")
@click.option("--host", envvar="VMFORK_HOST", default=None,
              help="Act through a vmfork server: its unix socket path or http://HOST:PORT (token: env VMFORK_TOKEN) "
                   "[env VMFORK_HOST; default: directly on the data dir].")
@click.version_option(__version__, prog_name="vmfork")
@click.pass_context
def main(ctx: click.Context, data_dir: Path | None, quiet: bool, firecracker_bin: Path | None,
         host: str | None) -> None:
    """vmfork: boot microVMs, put them in standby, restore and fork them copy-on-write."""
    if firecracker_bin is not None:
        os.environ["VMFORK_FIRECRACKER_BIN"] = str(firecracker_bin.absolute())
    os.umask(PRIVATE_UMASK)  # what vmfork and its VMMs create is the owner's only
    ctx.obj = Ctx((data_dir or default_data_dir()).absolute(), quiet, host or None)


pass_ctx = click.make_pass_decorator(Ctx)


# --- lifecycle ------------------------------------------------------------------------------
@main.command(context_settings={"ignore_unknown_options": False})
@click.argument("name")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.option("--image", default=None, help="An OCI image (ref or digest; pulled if absent): run its "
              "Entrypoint/Cmd as the main process. ARGS after '--' replace its Cmd.")
@click.option("-e", "--env", "envs", multiple=True, help="With --image: KEY=VALUE for the main process.")
@click.option("-w", "--workdir", default=None, help="With --image: the main process's working directory.")
@click.option("--entrypoint", default=None, help="With --image: replace the image's Entrypoint (and its Cmd).")
@click.option("--memory", default="256M", show_default=True, help="Guest RAM (e.g. 256M, 2G).")
@click.option("--vcpus", default=1, show_default=True, type=int, help="Virtual CPUs.")
@click.option("--hypervisor", default="qemu", show_default=True, help="qemu or firecracker.")
@click.option("--accel", default="auto", show_default=True, help="auto (probe KVM, else TCG), kvm or tcg.")
@click.option("--cpus", type=float, default=None, help="CPU limit of the VMM in cores (e.g. 0.5) [default: none].")
@click.option("--memory-limit", default=None, help="Memory limit of the VMM [default: guest RAM + overhead].")
@click.option("--pids-limit", type=int, default=None, help="Threads/processes limit of the VMM [default: 256].")
@click.option("--io-weight", type=int, default=None, help="I/O weight of the VMM, 1-10000 [default: the host's].")
@click.option("--network", "net_mode", default=None,
              help="none, or default: own namespace and address, NAT (needs root) "
                   "[default: default with -p/--egress/--allow/--subnet, else none].")
@click.option("-p", "--publish", multiple=True, help="[HOST_IP:]HOST_PORT:GUEST_PORT[/tcp|udp] (repeatable).")
@click.option("--egress", default="allow", show_default=True, help="allow or deny the guest's outgoing traffic.")
@click.option("--allow", "allow_nets", multiple=True, help="With --egress deny: a CIDR the guest may reach (repeatable).")
@click.option("--subnet", default=None, help="Pool of host-side addresses [default: the data dir's, else 10.213.0.0/16].")
@overcommit_opt
@json_opt
@pass_ctx
def run(c: Ctx, name: str, args: tuple[str, ...], image: str | None, envs: tuple[str, ...],
        workdir: str | None, entrypoint: str | None, memory: str, vcpus: int, hypervisor: str, accel: str,
        cpus: float | None, memory_limit: str | None, pids_limit: int | None, io_weight: int | None,
        net_mode: str | None, publish: tuple[str, ...], egress: str, allow_nets: tuple[str, ...],
        subnet: str | None, overcommit: bool, as_json: bool) -> None:
    """Create instance NAME and boot it; returns once its guest agent answers.

    Usage: vmfork run NAME [--image REF [-e K=V]... [-w DIR] [--entrypoint CMD]] [-- ARG...]
    """
    util.validate_name(name)
    if image is None and (args or envs or workdir or entrypoint is not None):
        raise InvalidArgument("-e, -w, --entrypoint and ARGS go with --image REF")
    from vmfork.network.spec import build as net_spec

    if net_mode is None:  # asking for ports or a policy asks for a network
        net_mode = "default" if (publish or allow_nets or egress != "allow" or subnet) else "none"
    network = net_spec(net_mode, publish, egress, allow_nets, subnet)
    memory_mib = util.parse_memory(memory)
    limits = {"cpus": cpus, "pids": pids_limit, "io_weight": io_weight,
              "memory_limit_mib": util.parse_size(memory_limit, "memory limit") >> 20 if memory_limit else None}
    t0 = time.monotonic()
    main_ = {"env": list(envs), "workdir": workdir, "entrypoint": entrypoint, "args": list(args) or None}
    inst = c.mgr.run(name, memory_mib=memory_mib, vcpus=vcpus, hypervisor=hypervisor, accel=accel, limits=limits,
                     overcommit=overcommit, network=network,
                     **({"oci_image": image, "main": main_} if image is not None else {}))
    secs = time.monotonic() - t0
    d = c.mgr.describe(inst) | {"seconds": round(secs, 3)}
    _emit(as_json, d, lambda: out.print(f"{inst.name} ({inst.id}) running, {inst.accel}, ready in {secs:.2f}s"))


@main.command()
@click.argument("name")
@overcommit_opt
@json_opt
@pass_ctx
def start(c: Ctx, name: str, overcommit: bool, as_json: bool) -> None:
    """Cold-boot a stopped instance (its disk is kept)."""
    t0 = time.monotonic()
    inst = c.mgr.start(name, overcommit=overcommit)
    secs = time.monotonic() - t0
    _emit(as_json, c.mgr.describe(inst) | {"seconds": round(secs, 3)},
          lambda: out.print(f"{inst.name} running, ready in {secs:.2f}s"))


@main.command()
@click.argument("name")
@click.option("--force", is_flag=True, help="Kill the VMM at once (running) or discard the snapshot (standby).")
@json_opt
@pass_ctx
def stop(c: Ctx, name: str, force: bool, as_json: bool) -> None:
    """Stop an instance: the guest powers off (disk kept, RAM lost)."""
    what = c.mgr.stop(name, force=force)
    _emit(as_json, {"name": name, "result": what}, lambda: out.print(f"{name}: {what}"))


@main.command()
@click.argument("names", nargs=-1, required=True)
@click.option("-f", "--force", is_flag=True, help="Also remove running instances (their VMM is killed).")
@json_opt
@pass_ctx
def rm(c: Ctx, names: tuple[str, ...], force: bool, as_json: bool) -> None:
    """Delete instances: VMM, disk, snapshots, logs."""
    for n in names:
        c.mgr.rm(n, force=force)
        if not as_json:
            out.print(f"{n}: removed")
    if as_json:
        click.echo(json.dumps({"removed": list(names)}))


@main.command()
@click.argument("name")
@json_opt
@pass_ctx
def standby(c: Ctx, name: str, as_json: bool) -> None:
    """Pause NAME, write its memory + device state to snapshot-latest, stop the VMM."""
    t = c.mgr.standby(name)
    _emit(as_json, {"name": name, "state": "standby", "timings": t},
          lambda: out.print(f"{name}: standby in {t['total_s']:.3f}s"))


@main.command()
@click.argument("name")
@click.option("--snapshot", "snap", default=None,
              help="Roll NAME back to its named snapshot SNAP (which stays) and run it from there.")
@overcommit_opt
@json_opt
@pass_ctx
def restore(c: Ctx, name: str, snap: str | None, overcommit: bool, as_json: bool) -> None:
    """Start a VMM on NAME's snapshot and resume it (the snapshot is consumed)."""
    if snap is not None:
        _, t = c.mgr.rollback(name, snap, overcommit=overcommit)
        _emit(as_json, {"name": name, "state": "running", "snapshot": snap, "timings": t},
              lambda: out.print(_clean(f"{name}: rolled back to {snap}, running, in {t['total_s']:.3f}s")))
        return
    t = c.mgr.restore(name, overcommit=overcommit)
    _emit(as_json, {"name": name, "state": "running", "timings": t},
          lambda: out.print(f"{name}: running, restored in {t['total_s']:.3f}s"))


@main.command()
@click.argument("name")
@overcommit_opt
@json_opt
@pass_ctx
def resume(c: Ctx, name: str, overcommit: bool, as_json: bool) -> None:
    """Resume NAME's paused guest (e.g. paused by the space watchdog when the filesystem filled up)."""
    what = c.mgr.resume(name, overcommit=overcommit)
    _emit(as_json, {"name": name, "result": what}, lambda: out.print(f"{name}: {what}"))


@main.command()
@click.argument("source")
@click.argument("name")
@click.option("--from-running", is_flag=True, help="Allow a running source: standby it, fork, restore both.")
@click.option("--target-state", type=click.Choice(["running", "standby", "stopped"]), default=None,
              help="State of the fork [default: the source's state].")
@click.option("--count", type=int, default=None, help="Make N forks, NAME-1 ... NAME-N, in one pass (1 to 100).")
@click.option("--partial", is_flag=True, help="With --count: keep the forks that succeeded if some fail.")
@click.option("-p", "--publish", multiple=True,
              help="Publish a port of the fork: [HOST_IP:]HOST_PORT:GUEST_PORT[/tcp|udp] (not inherited).")
@overcommit_opt
@json_opt
@pass_ctx
def fork(c: Ctx, source: str, name: str, from_running: bool, target_state: str | None, count: int | None,
         partial: bool, publish: tuple[str, ...], overcommit: bool, as_json: bool) -> None:
    """Fork SOURCE into a new instance NAME (copy-on-write clone of its snapshot)."""
    from vmfork.network.spec import build as net_spec

    ports = net_spec("default", publish).publish
    if ports and count is not None:
        raise InvalidArgument("-p goes with a single fork, not --count (host ports would collide)")
    if count is not None:
        from vmfork.snapshot_cli import forks_out

        forks, tc = c.mgr.fork_count(source, name, count=count, from_running=from_running,
                                     target_state=target_state, partial=partial, overcommit=overcommit)
        forks_out(sys.modules[__name__], as_json, forks, tc, c, source)
        return
    if partial:
        raise InvalidArgument("--partial goes with --count")
    inst, t = c.mgr.fork(source, name, from_running=from_running, target_state=target_state,
                         overcommit=overcommit, publish=ports)
    d = c.mgr.describe(inst) | {"timings": t}
    _emit(as_json, d, lambda: out.print(
        f"{inst.name} ({inst.id}) forked from {source}: {d['state']}, clone {t['clone_s'] * 1000:.1f} ms "
        f"({t['clone_method']}), total {t['total_s']:.3f}s"))


# --- views ----------------------------------------------------------------------------------
@main.command()
@json_opt
@pass_ctx
def ps(c: Ctx, as_json: bool) -> None:
    """List instances."""
    rows = [c.view.describe(i) for i in c.view.instances()] if c.data_dir_exists() else []

    def human() -> None:
        t = _table(box=None, pad_edge=False)
        for col in ("NAME", "ID", "STATE", "HYPERVISOR", "ACCEL", "MEMORY", "PID", "PARENT"):
            t.add_column(col)
        for r in rows:
            state = r["state"] + (f" ({r['last_exit'].split(' (')[0]})" if r.get("last_exit") else "")
            t.add_row(*map(_clean, (r["name"], r["id"], state, r["hypervisor"], r["accel"],
                                    f"{r['memory_mib']}M", str(r["pid"] or "-"), r["parent"] or "-")))
        out.print(t)
        for r in rows:  # an instance in state "error" says why, below the table
            if r.get("problem"):
                out.print(_clean(f"{r['name']}: {r['problem']}"))

    _emit(as_json, rows, human)


@main.command()
@click.argument("name")
@json_opt
@pass_ctx
def inspect(c: Ctx, name: str, as_json: bool) -> None:
    """Show everything known about NAME."""
    inst = c.find(name)  # no data dir, nothing created
    d = c.view.describe(inst, detail=True)

    def human() -> None:
        for k, v in d.items():
            out.print(f"{k:22} {_clean(json.dumps(v) if isinstance(v, dict) else str(v))}")

    _emit(as_json, d, human)


MAX_TIMEOUT_S = 0xFFFFFFFF // 1000  # the agent protocol carries milliseconds in 32 bits


@main.command("exec", context_settings={"ignore_unknown_options": True})
@click.argument("name")
@click.argument("command", nargs=-1, type=click.UNPROCESSED, required=True)
@click.option("--timeout", type=float, default=None, help="Kill the command after this many seconds (exit 124).")
@click.option("-e", "--env", "envs", multiple=True, help="KEY=VALUE for the command's environment.")
@click.option("-w", "--workdir", default=None, help="Working directory in the guest.")
@click.option("-i", "--stdin", "use_stdin", is_flag=True,
              help="Stream this process's stdin to the command (as it reads it; end of file closes it).")
@click.option("-t", "--tty", "use_tty", is_flag=True,
              help="Run the command on a terminal (PTY) in the guest, sized and resized as this one; "
                   "implies -i. This terminal is put in raw mode meanwhile.")
@click.option("--system", is_flag=True, help="An image instance: run in vmfork's own guest system, "
              "not in the image's root.")
@pass_ctx
def exec_(c: Ctx, name: str, command: tuple[str, ...], timeout: float | None, envs: tuple[str, ...],
          workdir: str | None, use_stdin: bool, use_tty: bool, system: bool) -> None:
    """Run COMMAND in NAME's guest: relays stdout/stderr, exits with its exit code.

    Usage: vmfork exec NAME -- CMD [ARGS...]   (interactive shell: vmfork exec -t NAME -- sh)
    """
    argv = list(command)
    if timeout is not None and not (math.isfinite(timeout) and 0 < timeout <= MAX_TIMEOUT_S):
        raise InvalidArgument(f"invalid --timeout '{timeout}': seconds, more than 0 and at most "
                              f"{MAX_TIMEOUT_S} (~49 days)")
    env: dict[str, str] = {}
    for kv in envs:
        if "=" not in kv:
            raise InvalidArgument(f"invalid --env '{kv}': expected KEY=VALUE")
        k, v = kv.split("=", 1)
        env[k] = v
    def relay(stream: Any) -> Callable[[bytes], None]:
        def write(chunk: bytes) -> None:
            stream.buffer.write(chunk)
            stream.buffer.flush()

        return write

    kw: dict[str, Any] = {}
    if use_stdin or use_tty:
        from vmfork.exec_tty import Terminal

        term = Terminal(sys.stdin.fileno(), raw=use_tty)
        kw = {"on_stdin": term.attach, "tty": use_tty, "rows": term.rows, "cols": term.cols}
        if use_tty and "TERM" not in env and os.environ.get("TERM"):
            env["TERM"] = os.environ["TERM"]
    else:
        term = None
    try:
        r = c.mgr.exec(name, argv, timeout=timeout, env=env or None, cwd=workdir, on_stdout=relay(sys.stdout),
                       on_stderr=relay(sys.stderr), in_image=not system, **kw)
    finally:
        if term is not None:
            term.restore()
    if r.timed_out:
        err.print(_clean(f"vmfork: '{' '.join(argv)}' timed out after {timeout}s in '{name}'"))
    sys.exit(r.exit_code)


@main.command()
@click.argument("name")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new output.")
@click.option("-n", "--tail", "lines", type=int, default=None, help="Only the last N lines (0 or more).")
@click.option("--vmm", is_flag=True, help="Show the VMM's own log instead of the serial console.")
@pass_ctx
def logs(c: Ctx, name: str, follow: bool, lines: int | None, vmm: bool) -> None:
    """Print NAME's serial console (or VMM log).

    The console log is capped: past 1 MiB its oldest part is cut, keeping the newest 512 KiB.
    """
    from vmfork.logfile import read_tail

    if lines is not None and lines < 0:
        raise InvalidArgument(f"invalid --tail '{lines}': a number of lines, 0 or more")
    inst = c.find(name)  # no data dir, nothing created
    path = inst.g.vmm_log if vmm else inst.g.console_log
    pos = 0
    if lines is not None:  # read from the end, not the whole file
        sys.stdout.buffer.write(read_tail(path, lines))
        pos = path.stat().st_size if path.exists() else 0
    try:
        while True:
            size = path.stat().st_size if path.exists() else 0
            if size < pos:  # the oldest part was cut (cap): go on from the new end
                pos = size
            if size > pos:
                with open(path, "rb") as f:
                    f.seek(pos)
                    while chunk := f.read(min(1 << 20, size - pos)):
                        sys.stdout.buffer.write(chunk)
                        pos += len(chunk)
                        if pos >= size:
                            break
            sys.stdout.flush()
            if not follow or not inst.dir.exists():
                return
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass


@main.command()
@json_opt
@pass_ctx
def doctor(c: Ctx, as_json: bool) -> None:
    """Check this host: QEMU, KVM (a real boot probe), filesystem copy-on-write, tools."""
    from vmfork.doctor import run_checks

    report = run_checks(c.data_dir, c.progress)

    def human() -> None:
        t = _table(box=None, show_header=False, pad_edge=False)
        t.add_column(justify="right")
        t.add_column(style="bold")
        t.add_column(overflow="fold")
        style = {"ok": "green", "warn": "yellow", "fail": "red", "info": "cyan"}
        for item in report["checks"]:
            t.add_row(_text()(item["status"], style=style[item["status"]]), _clean(item["name"]),
                      _clean(item["detail"]))
        out.print(t)

    _emit(as_json, report, human)
    if any(i["status"] == "fail" for i in report["checks"]):
        sys.exit(1)


@main.group()
def image() -> None:
    """Guest images: the built-in one (built locally from Debian packages) and OCI images
    (pulled from a registry, imported or built: pull, import, build debian, ls, rm)."""


@image.command("build")
@click.argument("distro", required=False, type=click.Choice(["debian"]))
@click.option("--package", "packages", multiple=True, help="debian: a package to install (repeatable).")
@click.option("--tag", default=None, help="debian: the name to give the image (e.g. debian-python:12).")
@click.option("--suite", default=None, help="debian: the suite [default: the host's].")
@json_opt
@pass_ctx
def image_build(c: Ctx, distro: str | None, packages: tuple[str, ...], tag: str | None, suite: str | None,
                as_json: bool) -> None:
    """Build the default guest image (kernel, initramfs, rootfs, agent) if not built yet; or,
    with 'debian', an OCI image of a minbase Debian with --package ... (debootstrap from the
    host's apt mirror, then umoci; cached in ~/.cache/vmfork), imported as --tag."""
    from vmfork.images import ensure_image

    if distro is not None:
        from vmfork.image_cli import build_debian

        return build_debian(c, list(packages), tag, suite, as_json)
    if packages or tag or suite:
        raise InvalidArgument("--package, --tag and --suite go with 'vmfork image build debian'")
    t0 = time.monotonic()
    img = ensure_image(DataDir(c.data_dir).ensure().images, c.progress)
    secs = time.monotonic() - t0
    d = {"digest": img.digest, "dir": str(img.dir), "kernel_version": img.kernel_version, "seconds": round(secs, 3)}
    _emit(as_json, d, lambda: out.print(f"image {img.digest} ({img.kernel_version}) at {img.dir} [{secs:.1f}s]"))


@image.command("ls")
@json_opt
@pass_ctx
def image_ls(c: Ctx, as_json: bool) -> None:
    """List the built-in guest images (newest first), then the OCI images: refs, digest,
    size, created and the instances using each."""
    from vmfork.image_cli import oci_rows, oci_table
    from vmfork.images import list_images

    if c.host:  # the server's images
        rows = c.mgr.image_rows()
    else:
        images = DataDir(c.data_dir).images
        rows = [{"digest": i.digest, "dir": str(i.dir), "kernel_version": i.kernel_version}
                for i in (list_images(images) if c.data_dir_exists() and images.exists() else [])]
        rows += oci_rows(c)  # OCI images: "kind": "oci", refs, digest, size, created, used_by

    def human() -> None:
        for r in rows:
            if "kernel_version" in r:
                out.print(_clean(f"{r['digest'][:16]}  {r['kernel_version']}  {r['dir']}"))
        oci_table(c, [r for r in rows if r.get("kind") == "oci"])

    _emit(as_json, rows, human)


@main.command()
@click.option("--memory", default="256M", show_default=True, help="Guest RAM of the demo VM.")
@click.option("--keep", is_flag=True, help="Keep the demo instances afterwards.")
@pass_ctx
def demo(c: Ctx, memory: str, keep: bool) -> None:
    """Boot a VM, write sentinels, standby, fork, restore both, show each sees its own state."""
    from vmfork.demo import run_demo

    run_demo(c.mgr, util.parse_memory(memory), keep=keep, say=lambda m: out.print(_text().from_markup(m)))


from vmfork.snapshot_cli import register  # noqa: E402

register(sys.modules[__name__])  # 'snapshot ...', 'tree', 'df'

from vmfork.image_cli import register as register_images  # noqa: E402

register_images(sys.modules[__name__])  # 'image ...'

from vmfork.pool_cli import register as register_pool  # noqa: E402

register_pool(sys.modules[__name__])  # 'pool ...'

from vmfork.fleet_cli import register as register_fleet  # noqa: E402

register_fleet(sys.modules[__name__])  # 'fleet ...' (Ray is imported by a fleet command only)

from vmfork.api.cli import register as register_api  # noqa: E402

register_api(sys.modules[__name__])  # 'serve', 'api-token'

if __name__ == "__main__":
    main()
