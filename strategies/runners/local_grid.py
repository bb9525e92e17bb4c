"""A Grid that runs a ClientApp in this process, one message after another.

For tests and debugging (``backend=local``), and as the baseline of
``benchmarks/sim_throughput.py``: the same ServerApp logic with no engine in
between. Node ids are 1..N and node ``i`` has partition id ``i - 1``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.run import Run
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity


class LocalGrid(Grid):
    def __init__(self, client_app: ClientApp, num_nodes: int) -> None:
        self.client_app = client_app
        self.contexts = {
            i + 1: Context(run_id=0, node_id=i + 1, node_config={"partition-id": i, "num-partitions": num_nodes},
                           state=RecordDict(), run_config={})
            for i in range(num_nodes)
        }
        self._run = Run.create_empty(run_id=0)
        # outside a Flower runtime, instruction messages take their sender from TaskIdentity
        for attr, value in (("run_id", 0), ("node_id", 0), ("task_id", 1)):
            if getattr(TaskIdentity, "_" + attr) is None:
                setattr(TaskIdentity, attr, value)

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

        Replies that arrive after ``timeout`` (measured from the first message) are discarded,
        as the SuperLink would.
        """
        start, replies = time.perf_counter(), []
        for msg in messages:
            node = msg.metadata.dst_node_id
            try:
                reply = self.client_app(msg, self.contexts[node])
            except Exception as err:  # noqa: BLE001 - a failing client must not stop the server
                reply = Message(Error(code=0, reason=f"{type(err).__name__}: {err}"), reply_to=msg)
            if timeout is None or time.perf_counter() - start <= timeout:
                replies.append(reply)
        return replies
