"""What the running server knows about itself: draining, in-flight requests."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field


@dataclass
class ServerState:
    """``draining`` turns /readyz to 503 so load balancers stop sending; ``idle`` is set
    whenever no request is in flight, so shutdown can wait for the last one."""

    draining: bool = False
    inflight: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.idle.set()

    def enter(self) -> None:
        self.inflight += 1
        self.idle.clear()

    def leave(self) -> None:
        self.inflight -= 1
        if self.inflight == 0:
            self.idle.set()
