"""A task loop on each engine of the kernel's host: jobs queued there, run back to back.

Why. Through ipyparallel, every message costs a trip through the controller both ways (the
request, then the reply: 6-9 ms measured on a loaded 2-core host), and even a message that was
already queued on the engine starts ~4 ms after the previous one ended (the engine's reply,
status and stream flushes per request). For tasks of a tenth of a second that is most of what
separates a run from the ideal schedule.

How. For the length of one run, each engine on the kernel's host runs :func:`serve` as one
ipyparallel request: it binds a local socket, takes messages of jobs from the kernel, runs them
in the order received (with ``_run_batch``, exactly as an ipyparallel message would) and pushes
each message's outcomes back as soon as it ends. The kernel's :class:`Channel` sends on one
socket per engine (from the scheduler's loop thread) and a thread of its own receives outcomes
and hands them to the executor, which reports them to the scheduler's queue.

* The engine's own queue is what lets work be queued ahead (the engine goes from one task to
  the next without waiting for the kernel); the kernel can take a message back while it has
  not started (``withdraw``: an idle engine steals it), so queueing ahead never strands work
  behind a long task.
* Offers (first runs): a job of unknown duration, when every engine is busy, is offered to
  every loop; the first loop to end its task claims it with an atomic symbolic link (a claim) in
  the run's directory and runs it (no round trip); the kernel takes an offer back the same way.
* An engine that dies, or is interrupted, ends its ``serve`` request with an error: the
  executor then reports every message it held as lost (resubmitted elsewhere), as for any
  ipyparallel message.
* ``serve`` returns on ``stop`` (the end of the run) or when the kernel's process is gone.

Engines on other hosts keep one ipyparallel message per batch (a local socket does not reach
them).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import tempfile
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

RUN, DONE, WITHDRAW, WITHDRAWN, STOP = b"run", b"done", b"withdraw", b"withdrawn", b"stop"
HELLO, OFFER, CLAIMED = b"hello", b"offer", b"claimed"
IDLE_CHECK_MS = 1000  # an idle loop looks this often whether the kernel is still there


def serve(inbox: str, outbox: str, kernel_pid: int,
          run_batch: Callable[[dict[str, bytes], bytes, str], list[Any]], label: str,
          hello: tuple[int, Callable[[], Any]] | None = None, tag: int = -1) -> int:
    """Runs on an engine: run the messages of jobs that arrive on ``inbox`` in order, push each
    one's outcomes to ``outbox``; returns how many messages it ran.

    Tasks run on the engine's main thread (as any ipyparallel request would); a thread of the
    loop takes the kernel's messages meanwhile, so that a message can be taken back while the
    task before it runs. ``hello``: ``(tag, call)``, a call made once the loop listens, whose
    result is pushed back first (the shared-dir probe of a run: no request of its own).

    Offers: a message the kernel offered to several loops goes to the first of them that ends
    what it runs with nothing else queued: it claims the offer (an atomic symbolic link
    naming ``tag``), tells the kernel (before the outcomes of what it just ran, so that the
    kernel never sees it free while it holds the offer) and runs it. A loop that is idle does
    not claim offers (the kernel sends it work directly)."""
    import zmq

    ctx: Any = zmq.Context.instance()
    state = _LoopState(os.path.dirname(outbox[len("ipc://"):]), kernel_pid, tag)
    receiver = threading.Thread(target=state.receive, args=(ctx, inbox, outbox),
                                name="nbindustria-task-loop", daemon=True)
    push = ctx.socket(zmq.PUSH)
    push.connect(outbox)
    receiver.start()
    ran = 0
    try:
        if hello is not None:
            tag, call = hello
            try:
                answer = call()
            except Exception as exc:  # an answer all the same: the kernel must not wait
                answer = exc
            push.send_multipart([HELLO, str(tag).encode(),
                                 pickle.dumps(answer, pickle.HIGHEST_PROTOCOL)])
        claimed: tuple[bytes, bytes, bytes] | None = None
        while True:
            item = claimed or state.next()
            if item is None:
                return ran
            msg, functions, jobs_blob = item
            outcomes = run_batch(pickle.loads(functions), jobs_blob, label)
            ran += 1
            offer = state.claim_offer()
            claimed = None
            if offer is not None:
                seq, claimed = offer
                push.send_multipart([CLAIMED, seq, str(tag).encode()])
            push.send_multipart([DONE, msg, pickle.dumps(outcomes, pickle.HIGHEST_PROTOCOL)])
    finally:
        state.stop()
        receiver.join(5.0)
        push.close(linger=2000)  # outcomes already pushed still reach the kernel
        if inbox.startswith("ipc://"):
            with contextlib.suppress(OSError):
                os.unlink(inbox[len("ipc://"):])


class _LoopState:
    """An engine loop's queue, filled by its receiving thread, emptied by the main thread."""

    def __init__(self, home: str, kernel_pid: int, tag: int = -1):
        self.home = home
        self.kernel_pid = kernel_pid
        self.tag = tag
        self.watch_kernel = _alive(kernel_pid)  # a pid we cannot see is not watched
        self.waiting: deque[tuple[bytes, bytes, bytes]] = deque()
        self.offers: dict[int, tuple[bytes, bytes, bytes]] = {}  # offer seq -> message
        self.ready = threading.Condition()
        self.stopped = False

    def claim_offer(self) -> tuple[bytes, tuple[bytes, bytes, bytes]] | None:
        """After a message ended: the first offer this loop wins, if nothing else is queued
        here (the oldest first: the kernel offers in priority order)."""
        while True:
            with self.ready:
                if self.waiting or self.stopped or not self.offers:
                    return None
                seq = min(self.offers)
                item = self.offers.pop(seq)  # won or lost: not tried again
            if claim(self.home, seq, str(self.tag)):
                return str(seq).encode(), item

    def add_offer(self, seq: int, item: tuple[bytes, bytes, bytes]) -> None:
        with self.ready:
            # Offers that another loop (or the kernel) claimed meanwhile are forgotten.
            for old in [s for s in self.offers if os.path.lexists(claim_path(self.home, s))]:
                del self.offers[old]
            self.offers[seq] = item

    def next(self) -> tuple[bytes, bytes, bytes] | None:
        """The next message to run, or None once the loop must end."""
        with self.ready:
            while not self.waiting and not self.stopped:
                self.ready.wait(IDLE_CHECK_MS / 1000)
            return None if self.stopped else self.waiting.popleft()

    def stop(self) -> None:
        with self.ready:
            self.stopped = True
            self.ready.notify_all()

    def receive(self, ctx: Any, inbox: str, outbox: str) -> None:
        import zmq

        pull = ctx.socket(zmq.PULL)
        push = ctx.socket(zmq.PUSH)
        try:
            pull.bind(inbox)
            push.connect(outbox)
            while not self.stopped:
                if not pull.poll(IDLE_CHECK_MS):
                    if ((self.watch_kernel and not _alive(self.kernel_pid))
                            or not os.path.exists(self.home)):
                        break  # the kernel, or its end of this run, is gone
                    continue
                kind, *rest = pull.recv_multipart()
                if kind == RUN:
                    with self.ready:
                        self.waiting.append((rest[0], rest[1], rest[2]))
                        self.ready.notify()
                elif kind == OFFER:
                    self.add_offer(int(rest[0]), (rest[1], rest[2], rest[3]))
                elif kind == WITHDRAW:
                    # Messages not started yet go back to the kernel; one that started or
                    # ended is not found (its outcomes come as usual).
                    wanted = set(rest)
                    with self.ready:
                        taken = [w for w in self.waiting if w[0] in wanted]
                        for item in taken:
                            self.waiting.remove(item)
                    for item in taken:
                        push.send_multipart([WITHDRAWN, item[0]])
                elif kind == STOP:
                    break
        finally:
            self.stop()
            pull.close(linger=0)
            push.close(linger=2000)


def claim_path(home: str, seq: int) -> str:
    return os.path.join(home, f"offer-{seq}")


def claim(home: str, seq: int, claimer: str) -> bool:
    """Claim offer ``seq`` for ``claimer`` (an engine id, or the kernel taking it back): True
    for the one caller that wins. The claim is a symbolic link whose target names the claimer:
    made whole in one step (one system call), and whoever finds it reads who holds the offer."""
    try:
        os.symlink(claimer, claim_path(home, seq))
        return True
    except OSError:  # FileExistsError: claimed before; FileNotFoundError: the run ended
        return False


def claimed_by(home: str, seq: int) -> str | None:
    """Who claimed offer ``seq`` (None: nobody yet)."""
    try:
        return os.readlink(claim_path(home, seq))
    except OSError:
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except PermissionError:
        return True
    except OSError:
        return False
    return True


class Channel:
    """The kernel's end: one socket to each engine's loop, one socket (read by a thread of its
    own) for the outcomes of all of them. ``on_done(msg, outcomes)``, ``on_withdrawn(msg)``
    and ``on_hello(tag, answer)`` are called on that thread. Made for one run; :meth:`close`
    ends it."""

    def __init__(self, on_done: Callable[[int, list[Any]], None],
                 on_withdrawn: Callable[[int], None],
                 on_hello: Callable[[int, Any], None] | None = None,
                 on_claimed: Callable[[int, int], None] | None = None):
        import zmq

        self._zmq = zmq
        self._ctx = zmq.Context()
        self.dir = tempfile.mkdtemp(prefix="nbi-loop-")
        self.outbox = f"ipc://{self.dir}/out"
        self._results = self._ctx.socket(zmq.PULL)
        self._results.bind(self.outbox)
        self._to: dict[int, Any] = {}
        self._on_done = on_done
        self._on_withdrawn = on_withdrawn
        self._on_hello = on_hello
        self._on_claimed = on_claimed
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._receive, name="nbindustria-engine-loops",
                                        daemon=True)
        self._thread.start()

    def inbox(self, engine_id: int) -> str:
        return f"ipc://{self.dir}/e{engine_id}"

    def open(self, engine_id: int) -> None:
        """Connect to an engine's loop (before it binds: messages wait until it does)."""
        zmq = self._zmq
        sock = self._ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.RECONNECT_IVL, 2)  # ms: the loop binds a few ms after we connect
        sock.connect(self.inbox(engine_id))
        old = self._to.pop(engine_id, None)
        if old is not None:
            old.close(linger=0)
        self._to[engine_id] = sock

    def send(self, engine_id: int, msg: int, functions: dict[str, bytes], jobs_blob: bytes
             ) -> None:
        self._to[engine_id].send_multipart(
            [RUN, str(msg).encode(), pickle.dumps(functions, pickle.HIGHEST_PROTOCOL),
             jobs_blob], copy=False)

    def offer(self, engine_id: int, seq: int, msg: int, functions: dict[str, bytes],
              jobs_blob: bytes) -> None:
        self._to[engine_id].send_multipart(
            [OFFER, str(seq).encode(), str(msg).encode(),
             pickle.dumps(functions, pickle.HIGHEST_PROTOCOL), jobs_blob], copy=False)

    def take_back(self, seq: int) -> str | None:
        """Take offer ``seq`` back: None if it was still free (now nobody can claim it), else
        who claimed it."""
        if claim(self.dir, seq, "kernel"):
            return None
        return claimed_by(self.dir, seq) or "?"

    def withdraw(self, engine_id: int, msgs: list[int]) -> None:
        self._to[engine_id].send_multipart([WITHDRAW, *(str(m).encode() for m in msgs)])

    def stop(self, engine_id: int) -> None:
        sock = self._to.pop(engine_id, None)
        if sock is not None:
            with contextlib.suppress(Exception):
                sock.send_multipart([STOP], flags=self._zmq.NOBLOCK)
            sock.close(linger=200)

    def _receive(self) -> None:
        zmq = self._zmq
        sock = self._results
        try:
            while not self._closing.is_set():
                if not sock.poll(100):
                    continue
                kind, msg, *rest = sock.recv_multipart()
                if kind == DONE:
                    self._on_done(int(msg), pickle.loads(rest[0]))
                elif kind == WITHDRAWN:
                    self._on_withdrawn(int(msg))
                elif kind == HELLO and self._on_hello is not None:
                    self._on_hello(int(msg), pickle.loads(rest[0]))
                elif kind == CLAIMED and self._on_claimed is not None:
                    self._on_claimed(int(msg), int(rest[0]))  # offer seq, engine
        except zmq.ZMQError:
            pass
        finally:
            sock.close(linger=0)

    def close(self) -> None:
        """Stop every loop and this end (the loops' requests then return)."""
        for engine_id in list(self._to):
            self.stop(engine_id)
        self._closing.set()
        # The loops also end once this directory is gone (a stop that never arrived).
        shutil.rmtree(self.dir, ignore_errors=True)
        # term waits for the stops to be delivered (at most their linger): not on this thread.
        threading.Thread(target=self._end, name="nbindustria-engine-loops-end",
                         daemon=True).start()

    def _end(self) -> None:
        self._thread.join(5.0)
        if not self._thread.is_alive():
            self._ctx.term()
