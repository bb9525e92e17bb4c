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
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from .ray_grid import RoundInterrupted, node_contexts, run_client_app, set_task_identity


class LocalGrid(Grid):
    def __init__(self, client_app: ClientApp, num_nodes: int, should_stop: Callable[[], bool] = lambda: False) -> None:
        self.client_app = client_app
        self.contexts = node_contexts(num_nodes)
        self.should_stop = should_stop
        self._run = Run.create_empty(run_id=0)
        set_task_identity()

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # type: ignore[no-untyped-def]
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError("LocalGrid only supports send_and_receive")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError("LocalGrid only supports send_and_receive")

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
            reply = run_client_app(self.client_app, msg, self.contexts[msg.metadata.dst_node_id])
            if timeout is None or time.perf_counter() - started <= timeout:
                replies.append(reply)
        return replies
