"""A Flower ``Grid`` whose nodes run in a pool of Ray actors: the Message API and ClientApp, an engine of our own.

Why not Flower's simulation engine (``flwr.simulation.run_simulation``, still
available as ``backend=flower``): in Flower 1.41 its Ray backend puts a dead
actor back into its pool, so one client process that exits or segfaults makes
every later message routed to that actor fail; a hung client keeps the run
from ever exiting; Ctrl-C does not stop it; and its in-memory link state scans
every stored message per node every 0.1 s, so its overhead grows with the
federation. This grid keeps what a strategy and a ClientApp see (Messages in,
Messages out, one Context per node) and runs the ClientApp in actors:

* **batched and streamed**: an actor gets a batch of messages per call and
  streams each reply back as it is made (a Ray streaming generator), so the
  per-call cost is paid per batch, and nothing finished is lost;
* **dead actors are replaced**: the batch's unfinished messages are retried one
  per call, so the client that kills its process is found (a call of one
  message) and recorded ``failed``, and the healthy ones in its batch still train;
* **hung clients are abandoned** at the round's timeout: their actor is killed
  and replaced; messages it had not started were already handed to idle actors;
* **interruptible**: ``should_stop()`` is polled while waiting, and the round is
  abandoned (:class:`RoundInterrupted`).
"""

from __future__ import annotations

import importlib
import math
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

#: Error codes of replies the grid makes itself
CLIENT_EXCEPTION, PROCESS_DIED, WRONG_SENDER = 0, 1, 2
#: seconds without any message starting or finishing after which a round is abandoned: only an engine that
#: cannot start its actors at all gets there (a message's own timeout starts when the message starts)
STALL_SECONDS = 900.0


class RoundInterrupted(RuntimeError):
    """The round was abandoned because a stop was requested (Ctrl-C)."""


def load_ref(ref: str) -> Any:
    """``'package.module:attr'`` → the object, as Flower resolves app components."""
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


def use_driver_path(sys_path: list[str]) -> None:
    """The driver's import path, in a worker: modules named by reference import here too."""
    for path in reversed(sys_path):
        if path not in sys.path and os.path.isdir(path):
            sys.path.insert(0, path)


def export_objects(*names: str) -> bytes:
    """The Python API's objects that ``names`` refer to, pickled by value (cloudpickle) for Ray workers."""
    from ray import cloudpickle

    from maestro_fl.references import referenced

    objects = referenced(*names)
    return cloudpickle.dumps(objects) if objects else b""


def install_objects(blob: bytes) -> None:
    """Register the driver's objects in this worker (after :func:`use_driver_path`, so they unpickle)."""
    if blob:
        from ray import cloudpickle

        from maestro_fl.references import install

        install(cloudpickle.loads(blob))


def set_task_identity() -> None:
    """Outside a Flower runtime, messages take their sender from TaskIdentity."""
    for attr, value in (("run_id", 0), ("node_id", 0), ("task_id", 1)):
        if getattr(TaskIdentity, "_" + attr) is None:
            setattr(TaskIdentity, attr, value)


def node_contexts(num_nodes: int) -> dict[int, Context]:
    """Node ``i + 1`` has partition id ``i``, as in Flower's simulation."""
    return {
        i + 1: Context(run_id=0, node_id=i + 1, node_config={"partition-id": i, "num-partitions": num_nodes},
                       state=RecordDict(), run_config={})
        for i in range(num_nodes)
    }


def run_client_app(app: Any, msg: Message, context: Context) -> Message:
    """The ClientApp's reply, or an error reply when it raises (a failing client never stops the server)."""
    try:
        return app(msg, context)
    except Exception as err:  # noqa: BLE001
        return Message(Error(code=CLIENT_EXCEPTION, reason=f"{type(err).__name__}: {err}"[-1000:]), reply_to=msg)


def check_sender(msg: Message, reply: Any) -> Message:
    """``reply`` if it answers ``msg`` from ``msg``'s node; otherwise an error reply in its place.

    The grid knows which message each reply answers, so a ClientApp cannot
    answer as another node (its reply would count for that node's client).
    """
    if not isinstance(reply, Message):
        reason = f"the ClientApp returned a {type(reply).__name__}, not a Message"
    elif reply.metadata.src_node_id != msg.metadata.dst_node_id:
        reason = (f"reply claims to come from node {reply.metadata.src_node_id}, but answers the message sent to "
                  f"node {msg.metadata.dst_node_id}")
    elif reply.metadata.message_type != msg.metadata.message_type:
        reason = f"reply is a {reply.metadata.message_type!r} message, the message was {msg.metadata.message_type!r}"
    else:
        return reply
    return Message(Error(code=WRONG_SENDER, reason=reason), reply_to=msg)


class NodeGrid(Grid):
    """A Grid over nodes ``1..num_nodes`` (partition ids ``0..num_nodes-1``) that only does
    ``send_and_receive``: what :class:`RayGrid` and ``LocalGrid`` share."""

    def __init__(self, num_nodes: int) -> None:
        self.contexts = node_contexts(num_nodes)
        self._run = Run.create_empty(run_id=0)
        set_task_identity()

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError(f"{type(self).__name__} only supports send_and_receive")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError(f"{type(self).__name__} only supports send_and_receive")


class ClientWorker:
    """A Ray actor that runs the ClientApp on batches of messages (instantiated through ``ray.remote``).

    It runs with two threads: one works through a batch, the other takes
    :meth:`cancel` calls for messages the driver moved to another actor.
    """

    def __init__(self, client_app_ref: str, env: dict[str, str], threads: int, sys_path: list[str],
                 objects: bytes = b"", warmup: tuple[str, str] | None = None) -> None:
        os.environ.update(env)
        use_driver_path(sys_path)
        install_objects(objects)
        import torch

        torch.set_num_threads(max(1, threads))
        set_task_identity()
        self.app = load_ref(client_app_ref)
        if warmup is not None:  # build what every message needs (data, model) before the first message starts
            ref, arg = warmup
            load_ref(ref)(arg)
        self.cancelled: set[tuple[int, int]] = set()  # (dispatch, message index)
        self.lock = threading.Lock()

    def where(self) -> tuple[str, int]:
        """The Ray node this actor runs on, and its process id."""
        import ray

        return ray.get_runtime_context().get_node_id(), os.getpid()

    def cancel(self, keys: list[tuple[int, int]]) -> None:
        with self.lock:
            self.cancelled.update(keys)

    def run(self, dispatch: int, batch: list[tuple[int, Message, Context]]) -> Iterator[tuple[Any, ...]]:
        """For each message: ``("start", i)`` when it begins, ``("done", i, reply, context)`` when it ends.

        ``dispatch`` numbers the grid's calls: a cancellation names the call it
        is for, so a message moved away and later back is not skipped.
        """
        with self.lock:  # earlier calls are over: their cancellations are moot
            self.cancelled = {k for k in self.cancelled if k[0] >= dispatch}
        for i, msg, context in batch:
            with self.lock:
                skip = (dispatch, i) in self.cancelled
            if skip:
                continue
            yield ("start", i)
            yield ("done", i, run_client_app(self.app, msg, context), context)


@dataclass
class _Running:
    """An actor's current call: the generator of its batch and what of the batch has started."""

    gen: Any
    dispatch: int
    batch: list[int]
    started: set[int] = field(default_factory=set)
    current: int | None = None  # the message it is working on, and since when (driver's monotonic clock)
    since: float = 0.0


class RayGrid(NodeGrid):
    """Nodes ``1..num_nodes`` (partition ids ``0..num_nodes-1``) served by ``num_actors`` Ray actors.

    Parameters
    ----------
    client_app_ref : str
        The ClientApp as a reference (``"package.module:app"``), imported in each actor.
    num_nodes : int
        Clients in the federation.
    num_actors : int
        Actors in the pool (each with ``actor_options``' resources).
    actor_options : dict
        ``num_cpus``/``num_gpus`` of each actor (Ray's ``.options``).
    env : dict
        Environment variables set in every actor (Flower's quiet settings).
    batch_size : int, optional
        Messages per actor call; default: a round's messages split into 4 batches per actor.
    should_stop : callable, optional
        Polled while waiting; when it returns True the round is abandoned.
    objects : bytes, optional
        The Python API's objects the run refers to (:func:`export_objects`), registered in every actor.
    warmup : (str, str), optional
        ``(reference, argument)``: a function every actor calls with the argument when it starts, before
        it takes a message (the ClientApp's data and model), so that no message's timeout pays for it.
    """

    def __init__(
        self,
        client_app_ref: str,
        num_nodes: int,
        *,
        num_actors: int,
        actor_options: dict[str, Any],
        env: dict[str, str] | None = None,
        batch_size: int | None = None,
        should_stop: Callable[[], bool] = lambda: False,
        objects: bytes = b"",
        warmup: tuple[str, str] | None = None,
    ) -> None:
        import ray

        super().__init__(num_nodes)
        self._ray = ray
        self.client_app_ref = client_app_ref
        self.actor_options = dict(actor_options)
        self.env = dict(env or {})
        self.threads = max(1, int(self.actor_options.get("num_cpus", 1)))
        self.sys_path = [os.path.abspath(p or os.getcwd()) for p in sys.path]
        self.batch_size = batch_size
        self.should_stop = should_stop
        self.objects = ray.put(objects)  # once in the object store, however many actors are (re)started
        self.warmup = warmup
        self._remote = ray.remote(ClientWorker)
        self.actors = [self._new_actor() for _ in range(max(1, num_actors))]
        self.restarts = 0  # actors replaced after a death or a hang
        self._dispatches = 0

    def placement(self, timeout: float) -> dict[str, int]:
        """Per Ray node, how many of the pool's actors started on it within ``timeout`` seconds."""
        ray = self._ray
        refs = [a.where.remote() for a in self.actors]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        nodes: dict[str, int] = {}
        for ref in ready:
            try:
                node, _ = ray.get(ref)
            except ray.exceptions.RayError:  # an actor that cannot start: its clients' replies say why
                continue
            nodes[node] = nodes.get(node, 0) + 1
        return nodes

    def _new_actor(self) -> Any:  # a Ray actor handle
        return self._remote.options(max_concurrency=2, **self.actor_options).remote(
            self.client_app_ref, self.env, self.threads, self.sys_path, self.objects, self.warmup)

    def _replace(self, slot: int) -> None:
        self._ray.kill(self.actors[slot], no_restart=True)
        self.actors[slot] = self._new_actor()
        self.restarts += 1

    # -- Grid API -----------------------------------------------------------------------------
    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Every message through the ClientApp of its node; the replies that came within ``timeout`` of their start.

        A message's ``timeout`` starts when its ClientApp starts on an actor
        (started, warm actors: never while it waits in the queue or for an actor
        to start), so a loaded machine makes a round slower, never different. A
        client whose process dies gets an error reply; one still running
        ``timeout`` seconds after it started gets none (the server records it as
        timed out), and only its actor is replaced.
        """
        ray = self._ray
        messages = list(messages)
        limit = math.inf if timeout is None else timeout
        last_event = time.monotonic()
        batch = self.batch_size or max(1, math.ceil(len(messages) / (4 * len(self.actors))))
        queue: deque[list[int]] = deque(
            list(range(i, min(i + batch, len(messages)))) for i in range(0, len(messages), batch)
        )
        replies: dict[int, Message] = {}
        running: dict[int, _Running] = {}
        abandoned: set[int] = set()  # timed out: never retried, never answered
        while queue or running:
            for slot in range(len(self.actors)):  # hand out work to idle actors
                if slot not in running:
                    if not queue:
                        self._steal(queue, running, replies)
                    if queue:
                        ids = queue.popleft()
                        items = [(i, messages[i], self.contexts[messages[i].metadata.dst_node_id]) for i in ids]
                        self._dispatches += 1
                        gen = self.actors[slot].run.options(num_returns="streaming").remote(self._dispatches, items)
                        running[slot] = _Running(gen, self._dispatches, ids)
            if not running:
                break
            if self.should_stop():
                for slot in list(running):
                    self._replace(slot)
                raise RoundInterrupted("stop requested")
            gens = [r.gen for r in running.values()]
            # as soon as any item is ready (waiting for all would leave a finished actor idle up to 0.2 s),
            # then every item ready by now
            ready, _ = ray.wait(gens, num_returns=1, timeout=0.2)
            if ready and len(gens) > 1:
                ready, _ = ray.wait(gens, num_returns=len(gens), timeout=0)
            ready_ids = {id(g) for g in ready}
            for slot, job in list(running.items()):
                if id(job.gen) in ready_ids:
                    self._advance(slot, job, running, queue, messages, replies)
                    last_event = time.monotonic()
            now = time.monotonic()
            for slot, job in list(running.items()):  # a client running past its own timeout: abandon it alone
                if job.current is not None and job.current not in replies and now - job.since > limit:
                    abandoned.add(job.current)
                    del running[slot]
                    self._replace(slot)
                    rest = [i for i in job.batch if i not in replies and i not in abandoned]
                    if rest:  # the batch's messages it had not finished go to the other actors
                        queue.appendleft(rest)
                    queue = deque(ids for ids in ([i for i in b if i not in abandoned] for b in queue) if ids)
            working = any(job.current is not None for job in running.values())
            if not working and now - last_event > STALL_SECONDS:
                for slot in list(running):  # no message started or finished for that long: no actor can start
                    self._replace(slot)
                break
        return [replies[i] for i in sorted(replies)]

    # -- helpers ------------------------------------------------------------------------------
    def _advance(
        self,
        slot: int,
        job: _Running,
        running: dict[int, _Running],
        queue: deque[list[int]],
        messages: list[Message],
        replies: dict[int, Message],
    ) -> None:
        ray = self._ray
        try:
            item = ray.get(next(job.gen))
        except StopIteration:
            del running[slot]
            return
        except ray.exceptions.RayActorError as err:
            del running[slot]
            self._replace(slot)
            unfinished = [i for i in job.batch if i not in replies]
            # Only a call of one message names the client that killed its process: the items an actor
            # yields just before it dies may never reach the driver, so "started" cannot be trusted.
            if len(unfinished) == 1:
                i = unfinished[0]
                reason = f"client process died: {str(err).splitlines()[0][:200]}"
                replies[i] = Message(Error(code=PROCESS_DIED, reason=reason), reply_to=messages[i])
            else:  # retry one per call to find it; the healthy ones still train (their lost replies rerun)
                queue.extendleft([i] for i in reversed(unfinished))
            return
        if item[0] == "start":
            job.started.add(item[1])
            job.current, job.since = item[1], time.monotonic()
        else:
            _, i, reply, context = item
            if job.current == i:
                job.current = None
            if i not in replies:  # a message moved to another actor may come back twice: the first counts
                replies[i] = check_sender(messages[i], reply)
                self.contexts[messages[i].metadata.dst_node_id] = context

    def _steal(self, queue: deque[list[int]], running: dict[int, _Running], replies: dict[int, Message]) -> None:
        """Move the messages a busy actor has not started to the queue, for an idle actor.

        The busy actor is told to skip them; should one start before it hears
        so, the first reply counts.
        """
        best: int | None = None
        waiting: list[int] = []
        for slot, job in running.items():
            unstarted = [i for i in job.batch if i not in job.started and i not in replies]
            if len(unstarted) > len(waiting):
                best, waiting = slot, unstarted
        if best is None:
            return
        job = running[best]
        if not (job.started - set(replies)):  # nothing in flight there yet: take the second half, if any
            if len(waiting) < 2:
                return
            waiting = waiting[len(waiting) // 2:]
        self.actors[best].cancel.remote([(job.dispatch, i) for i in waiting])
        job.batch = [i for i in job.batch if i not in waiting]
        queue.append(waiting)

    def shutdown(self) -> None:
        for actor in self.actors:
            self._ray.kill(actor, no_restart=True)
        self.actors = []
