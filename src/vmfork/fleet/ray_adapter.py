"""Everything Ray-specific in the fleet: the only module that imports Ray.

- **One actor per host.** ``HostAgent`` (``vmfork.fleet.agent``) runs as the detached,
  named actor ``vmfork-host-<host>`` in namespace ``vmfork``, pinned to its node by the
  custom resource ``vmfork_host_<host>`` (start the node with ``--resources
  '{"vmfork_host_<host>": 1}'``): only that node has it. ``join`` creates it with the
  node's data dir; it is restarted (``max_restarts=-1``) with the same data dir when its
  node comes back, and recovers the data dir as any vmfork command does.
- **Liveness** comes from Ray's node table: a host is up when a live node offers its
  resource (a killed raylet is noticed in about 2 s), and its agent answers.
- **Last reports.** Each agent writes its latest report into Ray's internal key-value store
  (GCS, ``vmfork-host/<host>``). The fleet reads them only for hosts that are down, to name
  the instances they held (reported ``lost``); a live host is always asked afresh.
- **Loopback.** ``connect`` pins the driver to ``VMFORK_FLEET_NODE_IP`` (default
  ``127.0.0.1``) and sets ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (without it the driver
  dials the machine's interface address even on a loopback cluster).

Another engine (Kubernetes, plain RPC) would provide the same few functions: ``hosts``,
``up``, ``last_report``, ``call``/``submit``/``wait``, ``replicate`` and ``join``.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vmfork import retry
from vmfork.errors import NotFound, VmforkError

NAMESPACE = "vmfork"
RESOURCE_PREFIX = "vmfork_host_"
KV_PREFIX = "vmfork-host/"
CALL_TIMEOUT = float(os.environ.get("VMFORK_FLEET_CALL_TIMEOUT", "600"))
#: How long a call waits for an agent that Ray says is restarting (its node just came back).
RESTART_WAIT = 30.0


class HostDown(VmforkError):
    """A host (its node or its agent) is not there."""

    exit_code = 8


def resource_name(host: str) -> str:
    return RESOURCE_PREFIX + host.replace("-", "_")


def actor_name(host: str) -> str:
    return f"vmfork-host-{host}"


def _ray() -> Any:
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    return ray


def connect(address: str, node_ip: str | None = None) -> None:
    """Connect this process to the Ray cluster at ``address`` (once)."""
    ray = _ray()
    if ray.is_initialized():
        return
    ip = node_ip or os.environ.get("VMFORK_FLEET_NODE_IP", "127.0.0.1")
    try:
        ray.init(address=address, _node_ip_address=ip, namespace=NAMESPACE, log_to_driver=False,
                 logging_level="ERROR", configure_logging=True, include_dashboard=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise HostDown(f"cannot reach the Ray cluster at '{address}': {str(e).splitlines()[0][:300]}") from None


def disconnect() -> None:
    ray = _ray()
    if ray.is_initialized():
        ray.shutdown()


# --- the actor --------------------------------------------------------------------------------
_ACTOR: Any = None


def _actor_class() -> Any:
    global _ACTOR
    if _ACTOR is not None:
        return _ACTOR
    ray = _ray()
    from vmfork.fleet.agent import HostAgent

    class RayHostAgent(HostAgent):
        def __init__(self, name: str, data_dir: str) -> None:
            super().__init__(name, Path(data_dir))
            self._publish(self.report_now())

        def report_now(self) -> dict[str, Any]:
            return HostAgent.report(self)

        def report(self) -> dict[str, Any]:
            r = HostAgent.report(self)
            self._publish(r)
            return r

        def _publish(self, r: dict[str, Any]) -> None:
            from ray.experimental import internal_kv

            internal_kv._internal_kv_put(KV_PREFIX + self.name, json.dumps(r).encode(), overwrite=True,
                                         namespace=NAMESPACE)

        def replicate_from(self, source: Any, snap: str, with_image: bool, tid: str,
                           expect: dict[str, Any]) -> dict[str, Any]:
            """Pull snapshot ``snap``'s archive from ``source`` (an agent's actor handle), one
            chunk ahead, into this host's store."""
            sid = ray.get(source.export_open.remote(snap, with_image))
            ahead: list[Any] = [source.export_read.remote(sid)]

            def fetch() -> bytes:
                chunk: bytes = ray.get(ahead.pop(0))
                if chunk:
                    ahead.append(source.export_read.remote(sid))
                return chunk

            try:
                return self.import_stream(fetch, tid, expect)
            finally:
                try:
                    source.export_close.remote(sid)
                except Exception:  # the source is gone: nothing to close
                    pass

    _ACTOR = ray.remote(RayHostAgent)
    return _ACTOR


def join(host: str, data_dir: Path, timeout: float = 120.0) -> dict[str, Any]:
    """Start (or find) the agent of ``host`` on its node, for ``data_dir``; its first report."""
    from vmfork import util

    util.validate_name(host, "host name")
    ray = _ray()
    res = resource_name(host)
    if not any(n["Alive"] and res in n["Resources"] for n in ray.nodes()):
        raise HostDown(f"no live Ray node offers resource '{res}': start the node of host '{host}' with "
                       f"--resources '{{\"{res}\": 1}}'")
    handle = _actor_class().options(
        name=actor_name(host), namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
        max_restarts=-1, max_task_retries=0, max_concurrency=16, num_cpus=0, resources={res: 1},
    ).remote(host, str(data_dir.absolute()))
    report: dict[str, Any] = _get(host, handle.report.remote(), timeout)
    if Path(report["data_dir"]) != data_dir.absolute():
        raise VmforkError(f"host '{host}' already runs with data dir '{report['data_dir']}', not '{data_dir}'")
    return report


def leave(host: str) -> None:
    """Stop the agent of ``host`` (its instances keep running; a later join takes them up)."""
    ray = _ray()
    try:
        ray.kill(ray.get_actor(actor_name(host), namespace=NAMESPACE), no_restart=True)
    except ValueError:
        raise NotFound(f"host '{host}' has no agent") from None
    from ray.experimental import internal_kv

    internal_kv._internal_kv_del(KV_PREFIX + host, namespace=NAMESPACE)


# --- hosts and their state ----------------------------------------------------------------------
def hosts() -> list[str]:
    """Every host known: those a live node offers, and those that reported before."""
    _ray()
    from ray.experimental import internal_kv

    names = {k.decode()[len(KV_PREFIX):] for k in internal_kv._internal_kv_list(KV_PREFIX, namespace=NAMESPACE)}
    return sorted(names)


def up() -> set[str]:
    """Hosts whose node is alive (by the resource it offers)."""
    ray = _ray()
    live = set()
    for n in ray.nodes():
        if n.get("Alive"):
            live |= {k for k in n.get("Resources", {}) if k.startswith(RESOURCE_PREFIX)}
    return {h for h in hosts() if resource_name(h) in live}


def last_report(host: str) -> dict[str, Any] | None:
    from ray.experimental import internal_kv

    raw = internal_kv._internal_kv_get(KV_PREFIX + host, namespace=NAMESPACE)
    if raw is None:
        return None
    try:
        d = json.loads(raw)
    except ValueError:
        return None
    return d if isinstance(d, dict) else None


def _handle(host: str) -> Any:
    ray = _ray()
    try:
        return ray.get_actor(actor_name(host), namespace=NAMESPACE)
    except ValueError:
        raise HostDown(f"host '{host}' has no agent ('vmfork fleet join {host}' on its node)") from None


def _unwrap(host: str, e: BaseException) -> BaseException:
    ray = _ray()
    if isinstance(e, ray.exceptions.RayTaskError):
        cause = getattr(e, "cause", None)
        if isinstance(cause, VmforkError):
            return cause
        return VmforkError(f"host '{host}': {type(cause).__name__ if cause else 'error'}: "
                           f"{str(cause or e).splitlines()[0][:300] if str(cause or e) else ''}")
    if isinstance(e, ray.exceptions.RayActorError | ray.exceptions.RayError):
        return HostDown(f"host '{host}' went away: {type(e).__name__}")
    return e


def _get(host: str, ref: Any, timeout: float) -> Any:
    ray = _ray()
    try:
        return ray.get(ref, timeout=timeout)
    except ray.exceptions.GetTimeoutError:
        raise HostDown(f"host '{host}' did not answer within {timeout:.0f}s") from None
    except Exception as e:
        raise _unwrap(host, e) from None


def call(host: str, method: str, *args: Any, timeout: float = CALL_TIMEOUT, **kw: Any) -> Any:
    """Call ``method`` of host's agent and wait for it. A host whose node is down raises
    HostDown at once; one whose agent is restarting is waited for (``RESTART_WAIT``)."""
    ray = _ray()
    if host not in up():
        raise HostDown(f"host '{host}' is down (no live Ray node offers '{resource_name(host)}')")
    last: BaseException | None = None
    for _ in retry.attempts(RESTART_WAIT, first=0.2, cap=2.0):
        try:
            return ray.get(getattr(_handle(host), method).remote(*args, **kw), timeout=timeout)
        except ray.exceptions.ActorUnavailableError as e:  # restarting on its node
            last = e
        except ray.exceptions.GetTimeoutError:
            raise HostDown(f"host '{host}' did not answer within {timeout:.0f}s") from None
        except Exception as e:
            raise _unwrap(host, e) from None
    raise HostDown(f"host '{host}' is restarting and did not answer within {RESTART_WAIT:.0f}s: {last}")


class Pending:
    """A call in flight (``submit``)."""

    def __init__(self, host: str, ref: Any, tag: Any) -> None:
        self.host, self.ref, self.tag = host, ref, tag

    def result(self) -> Any:
        return _get(self.host, self.ref, 0)


def submit(host: str, method: str, *args: Any, tag: Any = None, **kw: Any) -> Pending:
    return Pending(host, getattr(_handle(host), method).remote(*args, **kw), tag)


def wait(pending: list[Pending], timeout: float) -> tuple[list[Pending], list[Pending]]:
    """Those done within ``timeout`` and the others."""
    ray = _ray()
    if not pending:
        return [], []
    by_ref = {p.ref: p for p in pending}
    done, rest = ray.wait(list(by_ref), num_returns=len(pending), timeout=timeout, fetch_local=False)
    return [by_ref[r] for r in done], [by_ref[r] for r in rest]


def replicate(source: str, target: str, snap: str, with_image: bool, expect: dict[str, Any],
              progress: Callable[[str], None]) -> dict[str, Any]:
    """Stream snapshot ``snap`` from ``source`` to ``target`` (the target pulls it chunk by
    chunk: it never passes through this process). Progress is polled from the target."""
    if target not in up():
        raise HostDown(f"host '{target}' is down")
    tid = uuid.uuid4().hex[:12]
    dst = _handle(target)
    p = Pending(target, dst.replicate_from.remote(_handle(source), snap, with_image, tid, expect), None)
    last_msg = 0.0
    while True:
        done, _ = wait([p], 1.0)
        if done:
            return dict(p.result())
        if time.monotonic() - last_msg >= 1.0:
            last_msg = time.monotonic()
            try:
                info = _get(target, dst.transfer.remote(tid), 10)
            except VmforkError:
                info = None
            if info:
                progress(f"replicating '{snap}' {source} -> {target}: {int(info['bytes']) >> 20} MiB")


__all__ = ["HostDown", "Pending"]
