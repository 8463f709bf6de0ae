#!/usr/bin/env python3
"""A tasker_core worker in Python, written from docs/protocol.md (version 1).

Needs pyzmq and msgpack (Debian: python3-zmq python3-msgpack).

    python3 worker.py --batch-endpoint tcp://127.0.0.1:5555 \
                      --result-endpoint tcp://127.0.0.1:5556 [--worker-id ID] [--concurrency N]

Handlers are looked up by the step's "handler" name in HANDLERS below; a
handler takes (task, sequence, step) dicts and returns a dict (the output).
SIGTERM / SIGINT drain and exit 0.
"""

import argparse
import concurrent.futures
import os
import queue
import re
import signal
import socket
import sys
import threading
import time
import traceback
import uuid

import msgpack
import zmq

PROTOCOL_VERSION = 1
WORKER_ID_RE = re.compile(r"\A[A-Za-z0-9_-]+\Z")
STEP_FIELDS = {
    "step_id": int, "task_id": int, "step_name": str, "handler": str, "handler_config": dict,
    "attempt": int, "context": dict, "dependency_results": dict,
}


class RetryableError(Exception):
    """Reported as retryable, with an optional retry_after in seconds."""

    def __init__(self, message, retry_after=None):
        super().__init__(message)
        self.retry_after = retry_after


class PermanentError(Exception):
    """Reported as not retryable."""


class UnknownHandlerError(Exception):
    pass


# Error class names as the protocol's table (section 8) spells them, so the
# orchestrator sees the same names whichever language ran the step.
WIRE_CLASS = {
    RetryableError: "TaskerCore::RetryableError",
    PermanentError: "TaskerCore::PermanentError",
    UnknownHandlerError: "TaskerCore::UnknownHandlerError",
}


def echo(task, sequence, step):
    return {"echo": task["context"], "config": step["handler_config"], "language": "python"}


def sum_dependencies(task, sequence, step):
    return {"sum": sum(r.get("value", 0) for r in sequence.values())}


def fail(task, sequence, step):
    raise RetryableError("asked to fail", retry_after=1.5)


def fail_permanently(task, sequence, step):
    raise PermanentError("asked to fail for good")


HANDLERS = {
    "Python::Echo": echo,
    "Python::SumDependencies": sum_dependencies,
    "Python::Fail": fail,
    "Python::FailPermanently": fail_permanently,
}


class BadMessage(Exception):
    def __init__(self, reason, detail):
        super().__init__(detail)
        self.reason = reason


def now():
    return time.time()


def decode_batch(frames, worker_id):
    """The batch in frames, or BadMessage naming why it must be dropped (section 11)."""
    if len(frames) != 2:
        raise BadMessage("malformed_frames", "expected 2 frames, got %d" % len(frames))
    try:
        msg = msgpack.unpackb(frames[1], raw=False, strict_map_key=False)
    except Exception as e:  # any decoding failure is bad input, never a crash
        raise BadMessage("undecodable", str(e))
    if not isinstance(msg, dict):
        raise BadMessage("not_a_map", "body is a %s" % type(msg).__name__)
    if msg.get("protocol_version") != PROTOCOL_VERSION:
        raise BadMessage("wrong_version", "protocol_version %r" % msg.get("protocol_version"))
    if msg.get("type") not in ("batch", "partial_result", "batch_completion", "heartbeat", "goodbye"):
        raise BadMessage("unknown_type", "type %r" % msg.get("type"))
    if msg["type"] != "batch":
        raise BadMessage("unexpected_type", "a %s on the batch channel" % msg["type"])
    for field, kind in (("batch_id", str), ("worker_id", str), ("steps", list)):
        if not isinstance(msg.get(field), kind):
            raise BadMessage("invalid_field", "batch: field %s" % field)
    if not isinstance(msg.get("sent_at"), (int, float)):
        raise BadMessage("invalid_field", "batch: field sent_at")
    for i, step in enumerate(msg["steps"]):
        if not isinstance(step, dict):
            raise BadMessage("invalid_field", "batch: field steps[%d]" % i)
        for field, kind in STEP_FIELDS.items():
            value = step.get(field)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise BadMessage("invalid_field", "batch: field steps[%d].%s" % (i, field))
        if step["attempt"] < 1:
            raise BadMessage("invalid_field", "batch: field steps[%d].attempt" % i)
        timeout = step.get("timeout_ms")
        if timeout is not None and (not isinstance(timeout, int) or timeout < 0):
            raise BadMessage("invalid_field", "batch: field steps[%d].timeout_ms" % i)
    if frames[0] != ("batch.%s." % msg["worker_id"]).encode():
        raise BadMessage("topic_mismatch", "topic %r" % frames[0])
    if msg["worker_id"] != worker_id:
        raise BadMessage("wrong_worker", "a batch for %s" % msg["worker_id"])
    return msg


def error_object(exc):
    if isinstance(exc, RetryableError):
        retryable, retry_after = True, exc.retry_after
    elif isinstance(exc, (PermanentError, UnknownHandlerError)):
        retryable, retry_after = False, None
    else:
        retryable, retry_after = True, None
    lines = traceback.format_exception(type(exc), exc, exc.__traceback__)
    return {
        "class": WIRE_CLASS.get(type(exc), type(exc).__name__),
        "message": str(exc),
        "backtrace": [l.rstrip() for l in lines][-20:],
        "retryable": retryable,
        "retry_after": float(retry_after) if retry_after is not None else None,
    }


def run_step(batch_id, worker_id, step):
    started = now()
    output, error = None, None
    try:
        handler = HANDLERS.get(step["handler"])
        if handler is None:
            raise UnknownHandlerError("no handler registered as %r" % step["handler"])
        task = {"id": step["task_id"], "context": step["context"]}
        meta = {"id": step["step_id"], "name": step["step_name"], "attempt": step["attempt"],
                "handler_config": step["handler_config"]}
        output = handler(task, step["dependency_results"], meta)
        if not isinstance(output, dict):
            output, error = None, {"class": "TypeError", "message": "handler returned %s, a step's output must be a map"
                                   % type(output).__name__, "backtrace": [], "retryable": False, "retry_after": None}
    except Exception as e:
        output, error = None, error_object(e)
    return partial(batch_id, worker_id, step, output, error, started)


def partial(batch_id, worker_id, step, output, error, started):
    finished = now()
    return {
        "protocol_version": PROTOCOL_VERSION, "type": "partial_result", "batch_id": batch_id,
        "worker_id": worker_id, "step_id": step["step_id"], "task_id": step["task_id"],
        "attempt": step["attempt"], "status": "error" if error else "complete",
        "output": None if error else output, "error": error,
        "started_at": started, "finished_at": finished, "duration_ms": (finished - started) * 1000.0,
    }


class Worker:
    def __init__(self, batch_endpoint, result_endpoint, worker_id, concurrency, step_timeout_ms,
                 heartbeat_interval_ms, shutdown_timeout_s):
        self.worker_id = worker_id
        self.capacity = concurrency
        self.step_timeout_s = step_timeout_ms / 1000.0
        self.heartbeat_interval_s = heartbeat_interval_ms / 1000.0
        self.shutdown_timeout_s = shutdown_timeout_s
        self.queues = ["default"]
        self.ctx = zmq.Context.instance()
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.connect(batch_endpoint)
        self.sub.setsockopt(zmq.SUBSCRIBE, ("batch.%s." % worker_id).encode())
        # XPUB rather than PUB: it tells us when the orchestrator is listening.
        self.pub = self.ctx.socket(zmq.XPUB)
        self.pub.setsockopt(zmq.XPUB_NODROP, 1)
        self.pub.connect(result_endpoint)
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=concurrency)
        self.results = queue.Queue()  # (step key, partial) from pool threads
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_w, False)
        self.pending = {}  # (batch_id, index) -> deadline of a step not yet reported
        self.batches = {}  # batch_id -> {"steps": [...], "statuses": [...], "left": n}
        self.outbox = []  # [topic, body] frames, sent in order
        self.in_flight = 0
        self.subscribed = False
        self.draining = False
        self.next_heartbeat = None
        self.bad = {}

    def wake(self):
        try:
            os.write(self.wake_w, b".")
        except BlockingIOError:
            pass  # a wake-up is already pending

    def send_now(self, msg):
        self.pub.send_multipart([msg["type"].encode(), msgpack.packb(msg, use_bin_type=True)])

    def heartbeat(self):
        self.send_now({"protocol_version": PROTOCOL_VERSION, "type": "heartbeat", "worker_id": self.worker_id,
                       "pid": os.getpid(), "host": socket.gethostname(),
                       "capacity": 0 if self.draining else self.capacity,
                       "in_flight": self.in_flight, "sent_at": now(), "queues": self.queues})
        self.next_heartbeat = time.monotonic() + self.heartbeat_interval_s

    def accept(self, frames):
        try:
            batch = decode_batch(frames, self.worker_id)
        except BadMessage as e:
            if e.reason not in self.bad:
                print("worker %s: dropped a bad message (%s): %s" % (self.worker_id, e.reason, e), file=sys.stderr)
            self.bad[e.reason] = self.bad.get(e.reason, 0) + 1
            return
        steps = batch["steps"]
        self.batches[batch["batch_id"]] = {"steps": steps, "statuses": [None] * len(steps), "left": len(steps)}
        self.in_flight += len(steps)
        if not steps:
            self.complete(batch["batch_id"])
        for index, step in enumerate(steps):
            timeout = (step.get("timeout_ms") or 0) / 1000.0 or self.step_timeout_s
            key = (batch["batch_id"], index)
            # Python cannot interrupt a thread, so the deadline runs from
            # acceptance and a timed-out handler is left to finish unheard.
            self.pending[key] = time.monotonic() + timeout
            future = self.pool.submit(run_step, batch["batch_id"], self.worker_id, step)
            future.add_done_callback(lambda f, key=key: (self.results.put((key, f.result())), self.wake()))

    def report(self, key, msg):
        if self.pending.pop(key, None) is None:
            return  # already reported (timed out): exactly one partial per step
        self.outbox.append(msg)
        batch = self.batches[key[0]]
        batch["statuses"][key[1]] = msg["status"]
        batch["left"] -= 1
        if batch["left"] == 0:
            self.complete(key[0])

    def complete(self, batch_id):
        batch = self.batches.pop(batch_id)
        self.outbox.append({
            "protocol_version": PROTOCOL_VERSION, "type": "batch_completion", "batch_id": batch_id,
            "worker_id": self.worker_id, "completed_at": now(),
            "steps": [{"step_id": s["step_id"], "attempt": s["attempt"], "status": st}
                      for s, st in zip(batch["steps"], batch["statuses"])],
        })

    def expire(self, force=False):
        t = time.monotonic()
        for key, deadline in list(self.pending.items()):
            if force or t >= deadline:
                step = self.batches[key[0]]["steps"][key[1]]
                error = {"class": "TaskerCore::StepTimeoutError",
                         "message": "worker shut down before the step finished" if force else "step timed out",
                         "backtrace": [], "retryable": True, "retry_after": None}
                self.report(key, partial(key[0], self.worker_id, step, None, error, now()))

    def flush(self):
        # Held until the orchestrator listens: a publisher without subscribers drops.
        while self.subscribed and self.outbox:
            msg = self.outbox[0]
            try:
                self.pub.send_multipart([msg["type"].encode(), msgpack.packb(msg, use_bin_type=True)],
                                        flags=zmq.NOBLOCK)
            except zmq.Again:
                return  # at the high-water mark: keep it and retry, never drop
            self.outbox.pop(0)
            if msg["type"] == "partial_result":
                self.in_flight -= 1

    def serve(self, stop_event):
        poller = zmq.Poller()
        poller.register(self.sub, zmq.POLLIN)
        poller.register(self.pub, zmq.POLLIN)
        poller.register(self.wake_r, zmq.POLLIN)
        drain_deadline = None
        while True:
            if stop_event.is_set() and drain_deadline is None:
                self.draining = True
                drain_deadline = time.monotonic() + self.shutdown_timeout_s
                if self.subscribed:
                    self.heartbeat()
            events = dict(poller.poll(50))
            if self.wake_r in events:
                os.read(self.wake_r, 4096)
            if self.pub in events:
                while self.pub.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                    frame = self.pub.recv()
                    was = self.subscribed
                    self.subscribed = frame[:1] == b"\x01"
                    if self.subscribed and not was:
                        self.heartbeat()
            if self.sub in events:
                while self.sub.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                    self.accept(self.sub.recv_multipart())
            while True:
                try:
                    key, msg = self.results.get_nowait()
                except queue.Empty:
                    break
                self.report(key, msg)
            self.expire()
            if self.subscribed and time.monotonic() >= self.next_heartbeat:
                self.heartbeat()
            self.flush()
            if drain_deadline is not None:
                if not self.pending and not self.outbox:
                    break
                if time.monotonic() >= drain_deadline:
                    self.expire(force=True)
                    self.flush()
                    break
        self.sub.setsockopt(zmq.UNSUBSCRIBE, ("batch.%s." % self.worker_id).encode())
        if self.subscribed:
            self.send_now({"protocol_version": PROTOCOL_VERSION, "type": "goodbye",
                           "worker_id": self.worker_id, "reason": "shutdown"})
        self.sub.close(linger=0)
        self.pub.close(linger=1000)
        self.pool.shutdown(wait=False)
        self.ctx.term()


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-endpoint", default="tcp://127.0.0.1:5555")
    parser.add_argument("--result-endpoint", default="tcp://127.0.0.1:5556")
    parser.add_argument("--worker-id", default="py-%s-%d-%s" % (re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname()),
                                                                 os.getpid(), uuid.uuid4().hex[:8]))
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--step-timeout-ms", type=int, default=30000)
    parser.add_argument("--heartbeat-interval-ms", type=int, default=1000)
    parser.add_argument("--shutdown-timeout", type=float, default=30.0)
    parser.add_argument("--queues", default="default", help="queues this worker serves, comma-separated")
    args = parser.parse_args(argv)
    if not WORKER_ID_RE.match(args.worker_id):
        parser.error("--worker-id must match [A-Za-z0-9_-]+")

    worker = Worker(args.batch_endpoint, args.result_endpoint, args.worker_id, args.concurrency,
                    args.step_timeout_ms, args.heartbeat_interval_ms, args.shutdown_timeout)
    worker.queues = args.queues.split(",")  # advertised in heartbeats (docs/protocol.md 4.4)
    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()
        worker.wake()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    worker.serve(stop)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
