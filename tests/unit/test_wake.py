"""Wake on traffic, the listener part (api/wake.py), with real sockets on 127.0.0.1: a
"guest" TCP server that only exists once ``wake`` ran; connections made before are held,
each served (in the order of asyncio.Lock, FIFO), and none is refused. (The instance side is tested with real guests where
the networking feature is present.)"""

from __future__ import annotations

import asyncio

from vmfork.api.wake import Port, WakeListener


async def _scenario() -> tuple[list[bytes], int, WakeListener]:
    woken = 0
    guest: asyncio.Server | None = None

    async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        data = await r.read(100)
        w.write(b"guest:" + data)
        await w.drain()
        w.close()

    async def wake() -> str:
        nonlocal woken, guest
        woken += 1
        await asyncio.sleep(0.3)  # a restore takes a while: connections pile up meanwhile
        guest = await asyncio.start_server(echo, "127.0.0.1", guest_port)
        return "127.0.0.1"

    probe = await asyncio.start_server(echo, "127.0.0.1", 0)  # a free port for the "guest"
    guest_port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    lst = WakeListener([Port("127.0.0.1", 0, guest_port)], wake)
    await lst.start()
    (port,) = lst.bound_ports()

    async def client(i: int) -> bytes:
        await asyncio.sleep(i * 0.02)  # they arrive in this order
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(f"hello {i}".encode())
        await w.drain()
        data = await r.read()
        w.close()
        return data

    answers = await asyncio.gather(*(client(i) for i in range(6)))
    await lst.close()
    await lst.drain()
    assert guest is not None
    guest.close()
    return list(answers), woken, lst


def test_connections_during_wake_are_held_and_all_served() -> None:
    answers, woken, lst = asyncio.run(_scenario())
    assert woken == 1  # one restore for all of them
    assert answers == [f"guest:hello {i}".encode() for i in range(6)]
    assert lst.stats.served == 6 and lst.stats.failed == 0
    assert lst.stats.wake_s is not None and lst.stats.wake_s >= 0.3


def test_a_failed_wake_closes_the_connection_and_is_counted() -> None:
    async def run() -> tuple[bytes, WakeListener]:
        async def wake() -> str:
            raise RuntimeError("restore failed: no space")

        lst = WakeListener([Port("127.0.0.1", 0, 1)], wake)
        await lst.start()
        r, w = await asyncio.open_connection("127.0.0.1", lst.bound_ports()[0])
        data = await r.read()
        w.close()
        await lst.close()
        return data, lst

    data, lst = asyncio.run(run())
    assert data == b"" and lst.stats.failed == 1 and "no space" in lst.stats.errors[0]
