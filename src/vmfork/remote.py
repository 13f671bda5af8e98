"""The CLI through a server (``vmfork --host`` / ``VMFORK_HOST``): the Manager calls the CLI
makes, answered by the HTTP API. Commands not covered here say so in one line."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmfork.errors import InvalidArgument


@dataclass
class RemoteInstance:
    """What the CLI reads of an instance (``name``, ``id``, ``accel``, ``dir``), as the
    server described it."""

    info: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return str(self.info["name"])

    @property
    def id(self) -> str:
        return str(self.info["id"])

    @property
    def accel(self) -> str:
        return str(self.info.get("accel", ""))

    @property
    def dir(self) -> Path:
        return Path(str(self.info.get("dir", ".")))

    @property
    def g(self) -> Any:
        raise InvalidArgument("this command reads the instance's files: it is not available through --host")


@dataclass
class RemoteExec:
    exit_code: int
    timed_out: bool
    signal: int | None


class _SessionStdin:
    """An ExecSession's stdin with the interface of the local ExecStdin (write, close, resize)."""

    def __init__(self, session: Any) -> None:
        self.session = session

    def write(self, data: bytes) -> None:
        self.session.send(data)

    def close(self) -> None:
        self.session.close_stdin()

    def resize(self, rows: int, cols: int) -> None:
        self.session.resize(rows, cols)


class RemoteManager:
    def __init__(self, host: str, progress: Callable[[str], None] | None = None) -> None:
        from vmfork.client import Client

        self.client = Client(host)
        self.progress = progress

    def _inst(self, d: dict[str, Any]) -> RemoteInstance:
        return RemoteInstance(d)

    def recover(self) -> list[str]:
        return []  # the server recovers its data dir when it starts

    def instances(self) -> list[RemoteInstance]:
        return [self._inst(d) for d in self.client.json("GET", "/instances")]

    def find(self, ref: str) -> RemoteInstance:
        return self._inst(self.client.json("GET", f"/instances/{ref}"))

    def describe(self, inst: RemoteInstance, *, detail: bool = False) -> dict[str, Any]:
        d = self.client.json("GET", f"/instances/{inst.id}") if detail else inst.info
        return {k: v for k, v in d.items() if k != "seconds"}

    def run(self, name: str, *, memory_mib: int = 256, vcpus: int = 1, hypervisor: str = "qemu",
            accel: str = "auto", limits: dict[str, Any] | None = None, overcommit: bool = False,
            network: Any = None, oci_image: str | None = None, main: dict[str, Any] | None = None) -> RemoteInstance:
        lim = limits or {}
        net: dict[str, Any] = {}
        if network is not None and network.enabled:
            if network.subnet:
                raise InvalidArgument("--subnet is not available through --host")
            net = {"network": network.mode, "publish": [str(p) for p in network.publish],
                   "egress": network.egress, "allow": list(network.allow)}
        body = {"name": name, "memory": f"{memory_mib}M", "vcpus": vcpus, "hypervisor": hypervisor, "accel": accel,
                "cpus": lim.get("cpus"), "pids_limit": lim.get("pids"), "io_weight": lim.get("io_weight"),
                "memory_limit": f"{lim['memory_limit_mib']}M" if lim.get("memory_limit_mib") else None,
                "overcommit": overcommit, **net}
        if oci_image is not None:
            body |= {"image": oci_image, **_main_overrides(main or {})}
        return self._inst(self.client.json("POST", "/instances", json=body))

    def _action(self, ref: str, what: str, body: dict[str, Any] | None = None,
                params: dict[str, Any] | None = None) -> dict[str, Any]:
        r: dict[str, Any] = self.client.json("POST", f"/instances/{ref}/{what}", json=body, params=params)
        return r

    def start(self, ref: str, *, overcommit: bool = False) -> RemoteInstance:
        return self._inst(self._action(ref, "start", {"overcommit": overcommit})["instance"])

    def stop(self, ref: str, *, force: bool = False) -> str:
        return str(self._action(ref, "stop", {"force": force})["result"])

    def rm(self, ref: str, *, force: bool = False) -> None:
        self.client.request("DELETE", f"/instances/{ref}", params={"force": force})

    def standby(self, ref: str) -> dict[str, Any]:
        t: dict[str, Any] = self._action(ref, "standby")["timings"]
        return t

    def restore(self, ref: str, *, overcommit: bool = False) -> dict[str, Any]:
        t: dict[str, Any] = self._action(ref, "restore", params={"overcommit": overcommit} if overcommit else None)[
            "timings"]
        return t

    def fork(self, src_ref: str, name: str, *, from_running: bool = False, target_state: str | None = None,
             overcommit: bool = False, publish: Any = ()) -> tuple[RemoteInstance, dict[str, Any]]:
        if publish:
            raise InvalidArgument("fork -p is not available through --host yet")
        forks, t = self.fork_count(src_ref, name, count=None, from_running=from_running,
                                   target_state=target_state, overcommit=overcommit)
        return forks[0], t

    def fork_count(self, src_ref: str, name: str, *, count: int | None, from_running: bool = False,
                   target_state: str | None = None, partial: bool = False,
                   overcommit: bool = False, publish: Any = ()) -> tuple[list[RemoteInstance], dict[str, Any]]:
        if publish:
            raise InvalidArgument("fork -p is not available through --host yet")
        body = {"name": name, "count": count, "from_running": from_running, "target_state": target_state,
                "partial": partial, "overcommit": overcommit}
        r = self.client.json("POST", f"/instances/{src_ref}/fork", json=body)
        return [self._inst(d) for d in r["instances"]], r["timings"]

    def exec(self, ref: str, argv: list[str], *, stdin: bytes = b"", timeout: float | None = None,
             env: dict[str, str] | None = None, cwd: str | None = None,
             on_stdout: Callable[[bytes], None] | None = None,
             on_stderr: Callable[[bytes], None] | None = None,
             on_stdin: Callable[[Any], None] | None = None, tty: bool = False, rows: int = 0, cols: int = 0,
             **_: Any) -> RemoteExec:
        from vmfork.client import Instance
        from vmfork.models import Instance as InstanceModel

        inst = Instance(self.client, InstanceModel.model_validate(self.client.json("GET", f"/instances/{ref}")))
        if on_stdin is None:
            final = inst.exec_stream(argv, stdin=stdin, env=env, cwd=cwd, timeout=timeout,
                                     on_stdout=on_stdout, on_stderr=on_stderr)
        else:
            with inst.exec_interactive(argv, tty=tty, rows=rows, cols=cols, stdin=stdin, env=env, cwd=cwd,
                                       timeout=timeout) as session:
                on_stdin(_SessionStdin(session))
                final = session.wait(on_stdout=on_stdout, on_stderr=on_stderr)
        return RemoteExec(int(final["exit_code"]), bool(final.get("timed_out")), final.get("signal"))

    # --- OCI images (vmfork image pull|rm|ls, run --image) -----------------------------------
    def oci_store(self) -> RemoteStore:
        return RemoteStore(self.client, self.progress)

    def image_users(self, digest: str) -> list[str]:
        return list(self.client.images.get(digest).used_by)

    def image_rows(self) -> list[dict[str, Any]]:
        """``vmfork image ls --json``'s rows, from the server."""
        rows: list[dict[str, Any]] = []
        for im in self.client.images.list():
            if im.kind == "builtin":
                rows.append({"digest": im.digest, "dir": im.dir, "kernel_version": im.kernel_version})
            elif im.status == "ready":
                r = RemoteImage(im)
                rows.append({"kind": "oci", "refs": list(r.refs), "digest": r.digest, "fs": r.fs,
                             "size": im.size_bytes or 0, "compressed_size": im.compressed_size_bytes or 0,
                             "created": im.created_at, "dir": str(r.dir), "used_by": list(im.used_by),
                             "pull_seconds": im.seconds, "convert_seconds": None})
        return rows

    def __getattr__(self, name: str) -> Any:
        raise InvalidArgument(f"this command ({name}) is not available through --host yet: run it without --host")


def _main_overrides(main: dict[str, Any]) -> dict[str, Any]:
    """``vmfork run --image``'s -e/-w/--entrypoint/ARGS as POST /instances takes them."""
    env: dict[str, str] = {}
    for e in main.get("env") or []:
        k, sep, v = str(e).partition("=")
        if not sep:
            raise InvalidArgument(f"invalid environment variable {e!r}: use KEY=VALUE")
        env[k] = v
    ep = main.get("entrypoint")
    return {"env": env, "workdir": main.get("workdir") or "", "entrypoint": [ep] if ep is not None else [],
            "cmd": list(main.get("args") or [])}


class RemoteImage:
    """An OCI image as the server describes it, with what ``image_cli`` reads of a store's."""

    def __init__(self, im: Any) -> None:
        self.refs: tuple[str, ...] = tuple(im.refs)
        self.digest: str = str(im.digest or "")
        self.fs: str = str(im.fs or "")
        self.dir = Path(str(im.dir or "."))
        self.meta = {"rootfs_allocated_bytes": im.size_bytes or 0, "compressed_size": im.compressed_size_bytes or 0,
                     "created": im.created_at, "pull_seconds": im.seconds}

    @property
    def short(self) -> str:
        return self.digest.removeprefix("sha256:")[:12]


class RemoteStore:
    """``Manager.oci_store()`` through the server: pull, remove, list."""

    def __init__(self, client: Any, progress: Callable[[str], None] | None = None) -> None:
        self.client, self.progress = client, progress

    def pull(self, text: str, *, insecure: bool = False, fmt: str = "ext4") -> RemoteImage:
        return RemoteImage(self.client.images.pull(text, insecure=insecure, fs=fmt, on_progress=self.progress))

    def remove(self, text: str, users: Callable[[str], list[str]]) -> RemoteImage:
        im = RemoteImage(self.client.images.get(text))
        self.client.images.delete(text)  # the server refuses (busy) while something uses it
        return im

    def images(self) -> list[RemoteImage]:
        return [RemoteImage(im) for im in self.client.images.list() if im.kind == "oci" and im.status == "ready"]

    def __getattr__(self, name: str) -> Any:
        raise InvalidArgument(f"this image command ({name}) is not available through --host yet: run it without --host")
