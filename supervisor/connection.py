"""One client connection of the daemon: its writer, its requests in flight, the host calls it
must answer and the credit of its streams (shared by :mod:`.daemon` and :mod:`.remote_api`)."""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from typing import Any

from isobox.protocol import Frame, MsgType, ProtocolError, encode_frame

__all__ = ["Client", "Credit"]


class Client:
    """One connection: its writer, its requests in flight and its pending host calls."""

    ids = itertools.count(1)

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.id = next(self.ids)
        self.writer = writer
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self.calls: dict[int, asyncio.Future[str]] = {}
        self.cids = itertools.count(1)
        self.closed = False
        self.decoded: deque[Frame] = deque()  # frames read but not handled yet
        self.scope = ""  # from HELLO: the namespace of this client's sessions
        self.credits: dict[int, Credit] = {}  # streams in flight: what the client may take

    def credit_for(self, rid: int, window: int) -> Credit:
        credit = self.credits[rid] = Credit(window)
        return credit

    async def host_call(self, rid: int, name: str, args: str) -> str:
        """Call host function ``name`` in this client; its raw reply."""
        cid = next(self.cids)
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.calls[cid] = future
        try:
            self.send(MsgType.CALL, rid, {"cid": cid, "name": name, "args": args})
            return await future
        finally:
            self.calls.pop(cid, None)

    def send(self, msg: MsgType, rid: int, body: dict[str, Any]) -> None:
        if self.closed:
            return
        try:
            self.writer.write(encode_frame(msg, rid, body))
        except ProtocolError as exc:  # too large for a frame: the request fails instead
            failure = {"type": "SerializationError",
                       "message": f"the reply does not fit a frame: {exc}"}
            self.writer.write(encode_frame(MsgType.ERROR, rid, {"error": failure}))


class Credit:
    """How many stream values a client has room for (it grants more with CREDIT frames)."""

    def __init__(self, window: int) -> None:
        self.left = window
        self._room = asyncio.Event()
        self._room.set()

    async def wait(self) -> None:
        await self._room.wait()

    def spend(self, n: int) -> None:
        self.left -= n
        if self.left <= 0:
            self._room.clear()

    def grant(self, n: int) -> None:
        self.left += n
        if self.left > 0:
            self._room.set()


