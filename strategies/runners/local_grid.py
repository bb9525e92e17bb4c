"""A Grid that runs a ClientApp in this process, one message after another (``backend=local``).

For tests and debugging, and as the in-process side of
``benchmarks/sim_throughput.py``. Node ids are 1..N and node ``i`` has
partition id ``i - 1``. Clients are simulated as running in parallel: a
reply is dropped (a timeout) when *its own* processing took longer than the
round's timeout, not when the clients before it did. A client that hangs or
kills its process stops this process too: use ``backend=ray`` for those.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from flwr.app import Message
from flwr.clientapp import ClientApp

from .ray_grid import NodeGrid, RoundInterrupted, check_sender, run_client_app


class LocalGrid(NodeGrid):
    """Nodes ``1..num_nodes``, each running ``client_app`` in this process when it gets a message."""

    def __init__(self, client_app: ClientApp, num_nodes: int, should_stop: Callable[[], bool] = lambda: False) -> None:
        super().__init__(num_nodes)
        self.client_app = client_app
        self.should_stop = should_stop

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Run each message through the ClientApp; a client that raises yields an error reply.

        A reply whose client took longer than ``timeout`` is discarded, as the
        SuperLink would discard a late one.
        """
        replies = []
        for msg in messages:
            if self.should_stop():
                raise RoundInterrupted("stop requested")
            started = time.perf_counter()
            reply = check_sender(msg, run_client_app(self.client_app, msg, self.contexts[msg.metadata.dst_node_id]))
            if timeout is None or time.perf_counter() - started <= timeout:
                replies.append(reply)
        return replies
