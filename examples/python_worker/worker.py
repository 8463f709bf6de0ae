#!/usr/bin/env python3
"""A tasker_core worker in Python, written from docs/protocol.md (version 2).

Needs pyzmq and msgpack (Debian: python3-zmq python3-msgpack); discovery
also needs psycopg2 (python3-psycopg2).

    python3 worker.py --batch-endpoint tcp://127.0.0.1:5555 \
                      --result-endpoint tcp://127.0.0.1:5556 [--worker-id ID] [--concurrency N]
    # CURVE (docs/protocol.md section 14):
    python3 worker.py ... --curve-server-key=KEY --curve-public-key=KEY --curve-secret-key-file=FILE
    (KEY=VALUE: a Z85 key may start with "-")
    # discovery through PostgreSQL instead of endpoints (section 15):
    python3 worker.py --discovery NAME --database-url postgresql://...

Handlers are looked up by the step's "handler" name in HANDLERS below; a
handler takes (task, sequence, step) dicts and returns a dict (the output).
A step whose handler is not there is refused (unknown_handler), so a worker
that has it runs it: give this worker a queue of its own with --queues.
Results that are ready together go out as one partial_results message.
SIGTERM / SIGINT drain and exit 0.
"""

import argparse
import concurrent.futures
import json
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

PROTOCOL_VERSION = 2
# Batches of either version are run (an orchestrator sends each worker its own version).
ACCEPTED_VERSIONS = (1, 2)
# Most entries in one partial_results (the orchestrator takes up to 10,000).
MAX_RESULTS_PER_MESSAGE = 1000
# Bytes a message adds around its entries, at most (envelope, worker id, array header).
ENVELOPE_BYTES = 200
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


def touched(task):
    """Creates the file the task's context names under "touch", if any (lets a spec see a step finish)."""
    path = task["context"].get("touch")
    if path:
        open(path, "w").close()


def bytes_out(task, sequence, step):
    touched(task)
    return {"raw": b"\x00\xff"}


def int_keys(task, sequence, step):
    touched(task)
    return {"rows": [{1: "one"}]}  # version 2 keys are strings: sent as a failed step


def sleep_then_echo(task, sequence, step):
    time.sleep(step["handler_config"].get("sleep_ms", 0) / 1000.0)
    return {"echo": task["context"], "language": "python"}


def touch(task, sequence, step):
    touched(task)
    return {"n": task["context"].get("n")}


def fail(task, sequence, step):
    raise RetryableError("asked to fail", retry_after=1.5)


def fail_permanently(task, sequence, step):
    raise PermanentError("asked to fail for good")


HANDLERS = {
    "Python::Echo": echo,
    "Python::SumDependencies": sum_dependencies,
    "Python::Fail": fail,
    "Python::FailPermanently": fail_permanently,
    "Python::Bytes": bytes_out,
    "Python::IntKeys": int_keys,
    "Python::Touch": touch,
    "Python::Sleep": sleep_then_echo,
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
    if msg.get("protocol_version") not in ACCEPTED_VERSIONS or isinstance(msg.get("protocol_version"), bool):
        raise BadMessage("wrong_version", "protocol_version %r" % msg.get("protocol_version"))
    if msg.get("type") not in ("batch", "partial_result", "partial_results", "batch_completion", "heartbeat",
                               "goodbye", "batch_refusal"):
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


def non_string_key(value, path="output"):
    """Where the first map key that is not a string sits inside value, or None (version 2: keys are strings)."""
    stack = [(value, path)]
    while stack:
        node, at = stack.pop()
        if isinstance(node, dict):
            for k, v in node.items():
                if not isinstance(k, str):
                    return "%s.%r" % (at, k)
                stack.append((v, "%s.%s" % (at, k)))
        elif isinstance(node, (list, tuple)):
            stack.extend((v, "%s[%d]" % (at, i)) for i, v in enumerate(node))
    return None


def depth(value):
    """How deep maps and lists nest: 0 for a scalar, 1 for {} or []."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, dict):
            children = list(node.values())
        elif isinstance(node, (list, tuple)):
            children = node
        else:
            continue
        deepest = max(deepest, level)
        if level > 64:
            return level
        stack.extend((c, level + 1) for c in children)
    return deepest


def failure(cls, message):
    return {"class": cls, "message": message, "backtrace": [], "retryable": False, "retry_after": None}


def run_step(batch_id, worker_id, step, limits, on_start=None):
    started = now()
    if on_start:
        on_start(started)
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
            output, error = None, failure("TypeError", "handler returned %s, a step's output must be a map"
                                          % type(output).__name__)
        elif non_string_key(output):
            output, error = None, failure("TypeError", "the step's output has a map key that is not a string at %s "
                                          "(protocol version 2 keys are strings)" % non_string_key(output))
        elif limits.get("max_payload_depth") and depth(output) > limits["max_payload_depth"]:
            output, error = None, failure("TaskerCore::PayloadTooDeepError",
                                          "the step's output nests more than %d levels, over the orchestrator's "
                                          "max_payload_depth" % limits["max_payload_depth"])
    except Exception as e:
        output, error = None, error_object(e)
    entry = result_entry(batch_id, step, output, error, started)
    size, limit = len(pack(entry)) + ENVELOPE_BYTES, result_limit(limits)
    if limit and size > limit:
        entry = result_entry(batch_id, step, None, failure(
            "TaskerCore::PayloadTooLargeError", "the step's result is %d bytes, over the orchestrator's limit of %d "
            "bytes" % (size, limit)), started)
    return entry


def pack(msg):
    return msgpack.packb(msg, use_bin_type=True)


def result_limit(limits):
    """The largest result body the orchestrator takes (docs/protocol.md 4.1), or None."""
    sizes = [limits.get(k) for k in ("max_result_bytes", "max_message_bytes")]
    sizes = [v for v in sizes if isinstance(v, int) and not isinstance(v, bool) and v > 0]
    return min(sizes) if sizes else None


def result_entry(batch_id, step, output, error, started):
    """One step's result: a partial_result without its envelope (docs/protocol.md 4.3). started None:
    the step never started, and started_at is finished_at (section 4.2)."""
    finished = now()
    started = finished if started is None else started
    return {
        "batch_id": batch_id, "step_id": step["step_id"], "task_id": step["task_id"],
        "attempt": step["attempt"], "status": "error" if error else "complete",
        "output": None if error else output, "error": error,
        "started_at": started, "finished_at": finished, "duration_ms": (finished - started) * 1000.0,
    }


def read_key_file(path):
    """The CURVE key in a key file written by `tasker keygen` (the first line holding one); a file
    readable or writable by group or others is refused, as tasker_core refuses it."""
    if os.stat(path).st_mode & 0o077:
        raise SystemExit("%s is readable or writable by group or others: chmod 600 it" % path)
    with open(path) as f:
        for line in f:
            token = (line.split() or [""])[0]
            if len(token) == 40:
                return token
    raise SystemExit("%s does not hold a CURVE key (40 Z85 characters on one line)" % path)


DISCOVERY_SQL = ("SELECT batch_endpoint, result_endpoint, version, lease_expires_at > now() AS live "
                 "FROM tasker_orchestrators WHERE name = %s")


class Discovery:
    """Follows a discovery name in PostgreSQL (docs/protocol.md section 15) on a thread of its own:
    LISTEN tasker_discovery, read the entry, then act on newer notifications and re-read every
    poll_s (nobody notifies when a crashed orchestrator's lease runs out)."""

    def __init__(self, name, url, poll_s=1.0):
        import psycopg2  # only needed with --discovery
        self.name, self.poll_s = name, poll_s
        self.conn = psycopg2.connect(url)
        self.conn.autocommit = True
        self.cur = self.conn.cursor()
        self.cur.execute("LISTEN tasker_discovery")
        self.version = 0
        self.endpoints = None

    def read(self):
        """(batch_endpoint, result_endpoint) of the live entry, or None."""
        self.cur.execute(DISCOVERY_SQL, (self.name,))
        row = self.cur.fetchone()
        if row and row[2] >= self.version:
            self.version = row[2]
            self.endpoints = (row[0], row[1]) if row[3] else None
        return self.endpoints

    def wait_for_entry(self, timeout_s):
        deadline = time.monotonic() + timeout_s
        while self.read() is None:
            if time.monotonic() >= deadline:
                raise SystemExit("no orchestrator registered as %r after %.0f s" % (self.name, timeout_s))
            time.sleep(0.1)
        return self.endpoints

    def follow(self, on_change, stop_event):
        import select
        while not stop_event.is_set():
            before = self.endpoints
            if select.select([self.conn], [], [], self.poll_s)[0]:
                self.conn.poll()
                for n in self.conn.notifies:
                    try:
                        entry = json.loads(n.payload)
                    except ValueError:
                        continue
                    if entry.get("name") == self.name and entry.get("version", 0) > self.version:
                        self.version = entry["version"]
                        self.endpoints = ((entry["batch_endpoint"], entry["result_endpoint"])
                                          if entry.get("live") else None)
                del self.conn.notifies[:]
            self.read()
            if self.endpoints is not None and self.endpoints != before:
                on_change(*self.endpoints)


class Worker:
    def __init__(self, batch_endpoint, result_endpoint, worker_id, concurrency, step_timeout_ms,
                 heartbeat_interval_ms, shutdown_timeout_s, curve=None):
        self.worker_id = worker_id
        self.capacity = concurrency
        self.step_timeout_s = step_timeout_ms / 1000.0
        self.heartbeat_interval_s = heartbeat_interval_ms / 1000.0
        self.shutdown_timeout_s = shutdown_timeout_s
        self.queues = ["default"]
        self.curve = curve  # (server public key, our public key, our secret key) or None
        self.ctx = zmq.Context.instance()
        self.endpoints = (batch_endpoint, result_endpoint)
        self.sub = self.pub = None
        self.open_sockets()
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=concurrency)
        self.results = queue.Queue()  # (step key, result entry) from pool threads
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_w, False)
        self.pending = {}  # (batch_id, index) -> deadline of a step not yet reported
        self.started = {}  # (batch_id, index) -> when its handler started (set by the pool thread)
        self.batches = {}  # batch_id -> {"steps": [...], "statuses": [...], "left": n, "limits": {...}}
        self.outbox = []  # ("result", entry, limit) or ("message", msg), sent in order
        self.in_flight = 0
        self.subscribed = False
        self.draining = False
        self.next_heartbeat = None
        self.move = None  # new (batch, result) endpoints from discovery, applied by the I/O loop
        self.move_lock = threading.Lock()
        self.bad = {}
        self.results_messages = 0  # partial_results sent

    def socket(self, kind):
        s = self.ctx.socket(kind)
        if self.curve:
            # docs/protocol.md section 14: a CURVE client on both sockets, keys set before connecting.
            s.curve_serverkey, s.curve_publickey, s.curve_secretkey = (k.encode() for k in self.curve)
        return s

    def open_sockets(self):
        batch_endpoint, result_endpoint = self.endpoints
        self.sub = self.socket(zmq.SUB)
        self.sub.setsockopt(zmq.SUBSCRIBE, ("batch.%s." % self.worker_id).encode())
        self.sub.connect(batch_endpoint)
        # XPUB rather than PUB: it tells us when the orchestrator is listening. IMMEDIATE: a dropped
        # connection takes its pipe along, so the orchestrator leaving shows as an unsubscription
        # and results wait here instead of in a dead pipe (docs/protocol.md section 1).
        self.pub = self.socket(zmq.XPUB)
        self.pub.setsockopt(zmq.XPUB_NODROP, 1)
        self.pub.setsockopt(zmq.IMMEDIATE, 1)
        self.pub.connect(result_endpoint)

    def move_to(self, batch_endpoint, result_endpoint):
        """From the discovery thread: a new orchestrator took over."""
        with self.move_lock:
            self.move = (batch_endpoint, result_endpoint)
        self.wake()

    def apply_move(self, poller):
        with self.move_lock:
            move, self.move = self.move, None
        if move is None or move == self.endpoints:
            return
        print("worker %s: moving to batches from %s, results to %s" % ((self.worker_id,) + move), file=sys.stderr)
        for s in (self.sub, self.pub):
            poller.unregister(s)
            s.close(linger=0)
        self.endpoints = move
        self.subscribed = False
        self.open_sockets()
        poller.register(self.sub, zmq.POLLIN)
        poller.register(self.pub, zmq.POLLIN)

    def wake(self):
        try:
            os.write(self.wake_w, b".")
        except BlockingIOError:
            pass  # a wake-up is already pending

    def send_now(self, msg):
        self.pub.send_multipart([msg["type"].encode(), pack(msg)])

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
        steps = self.refuse_unknown_handlers(batch)
        limits = batch.get("limits") if isinstance(batch.get("limits"), dict) else {}
        self.batches[batch["batch_id"]] = {"steps": steps, "statuses": [None] * len(steps), "left": len(steps),
                                           "limits": limits}
        self.in_flight += len(steps)
        if not steps:
            self.complete(batch["batch_id"])
        for index, step in enumerate(steps):
            timeout = (step.get("timeout_ms") or 0) / 1000.0 or self.step_timeout_s
            key = (batch["batch_id"], index)
            # Python cannot interrupt a thread, so the deadline runs from
            # acceptance and a timed-out handler is left to finish unheard.
            self.pending[key] = time.monotonic() + timeout
            future = self.pool.submit(run_step, batch["batch_id"], self.worker_id, step, limits,
                                      lambda t, key=key: key in self.pending and self.started.__setitem__(key, t))
            future.add_done_callback(lambda f, key=key: (self.results.put((key, f.result())), self.wake()))

    def refuse_unknown_handlers(self, batch):
        """The steps of batch this worker has handlers for. The others are refused (unknown_handler,
        docs/protocol.md 4.7) before any result, so the orchestrator hands them to a worker that has
        them; they run nowhere here and the batch's completion leaves them out."""
        unknown = [s for s in batch["steps"] if s["handler"] not in HANDLERS]
        if not unknown:
            return batch["steps"]
        names = sorted({s["handler"] for s in unknown})
        self.outbox.append(("message", {
            "protocol_version": PROTOCOL_VERSION, "type": "batch_refusal", "batch_id": batch["batch_id"],
            "worker_id": self.worker_id, "reason": "unknown_handler",
            "message": "worker %s has no handler %s" % (self.worker_id, ", ".join(names)),
            "steps": [{"step_id": s["step_id"], "attempt": s["attempt"], "reason": "unknown_handler",
                       "message": "no handler registered as %r" % s["handler"]} for s in unknown],
        }))
        return [s for s in batch["steps"] if s["handler"] in HANDLERS]

    def report(self, key, entry):
        if self.pending.pop(key, None) is None:
            return  # already reported (timed out): exactly one partial per step
        self.started.pop(key, None)
        batch = self.batches[key[0]]
        self.outbox.append(("result", entry, result_limit(batch["limits"])))
        batch["statuses"][key[1]] = entry["status"]
        batch["left"] -= 1
        if batch["left"] == 0:
            self.complete(key[0])

    def complete(self, batch_id):
        batch = self.batches.pop(batch_id)
        self.outbox.append(("message", {
            "protocol_version": PROTOCOL_VERSION, "type": "batch_completion", "batch_id": batch_id,
            "worker_id": self.worker_id, "completed_at": now(),
            "steps": [{"step_id": s["step_id"], "attempt": s["attempt"], "status": st}
                      for s, st in zip(batch["steps"], batch["statuses"])],
        }))

    def expire(self, force=False):
        t = time.monotonic()
        for key, deadline in list(self.pending.items()):
            if force or t >= deadline:
                step = self.batches[key[0]]["steps"][key[1]]
                error = {"class": "TaskerCore::StepTimeoutError",
                         "message": "worker shut down before the step finished" if force else "step timed out",
                         "backtrace": [], "retryable": True, "retry_after": None}
                self.report(key, result_entry(key[0], step, None, error, self.started.get(key)))

    def next_message(self):
        """The message at the head of the outbox and how many outbox items it carries: results next to
        each other go together (one partial_result, or one partial_results within every one's limit)."""
        kind = self.outbox[0][0]
        if kind == "message":
            return self.outbox[0][1], 1
        entries, size, limit = [], ENVELOPE_BYTES, None
        for item in self.outbox[:MAX_RESULTS_PER_MESSAGE]:
            if item[0] != "result":
                break
            entry_size = len(pack(item[1]))
            limits = [v for v in (limit, item[2]) if v]
            if entries and limits and size + entry_size > min(limits):
                break
            entries.append(item[1])
            size += entry_size
            limit = min(limits) if limits else None
        envelope = {"protocol_version": PROTOCOL_VERSION, "worker_id": self.worker_id}
        if len(entries) == 1:
            return dict(envelope, type="partial_result", **entries[0]), 1
        return dict(envelope, type="partial_results", results=entries), len(entries)

    def flush(self):
        # Held until the orchestrator listens: a publisher without subscribers drops.
        while self.subscribed and self.outbox:
            msg, n = self.next_message()
            try:
                self.pub.send_multipart([msg["type"].encode(), pack(msg)], flags=zmq.NOBLOCK)
            except zmq.Again:
                return  # at the high-water mark: keep it and retry, never drop
            del self.outbox[:n]
            if msg["type"] == "partial_results":
                self.results_messages += 1
            if msg["type"] in ("partial_result", "partial_results"):
                self.in_flight -= n

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
            self.apply_move(poller)
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
                    key, entry = self.results.get_nowait()
                except queue.Empty:
                    break
                self.report(key, entry)
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
        print("worker %s: stopped; %d partial_results sent" % (self.worker_id, self.results_messages),
              file=sys.stderr)
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
    parser.add_argument("--curve-server-key", help="the orchestrator's CURVE public key (Z85); turns CURVE on")
    parser.add_argument("--curve-public-key", help="this worker's CURVE public key (Z85)")
    parser.add_argument("--curve-secret-key-file", help="file holding this worker's CURVE secret key (mode 0600)")
    parser.add_argument("--discovery", metavar="NAME", help="look the endpoints up in PostgreSQL under NAME")
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL"), help="for --discovery")
    parser.add_argument("--discovery-wait", type=float, default=30.0, help="seconds to wait for a live entry")
    args = parser.parse_args(argv)
    if not WORKER_ID_RE.match(args.worker_id):
        parser.error("--worker-id must match [A-Za-z0-9_-]+")
    curve = None
    if args.curve_server_key:
        if not (args.curve_public_key and args.curve_secret_key_file):
            parser.error("--curve-server-key needs --curve-public-key and --curve-secret-key-file")
        if not zmq.has("curve"):
            parser.error("this libzmq has no CURVE support")
        curve = (args.curve_server_key, args.curve_public_key, read_key_file(args.curve_secret_key_file))

    stop = threading.Event()
    endpoints = (args.batch_endpoint, args.result_endpoint)
    discovery = None
    if args.discovery:
        if not args.database_url:
            parser.error("--discovery needs --database-url (or DATABASE_URL)")
        discovery = Discovery(args.discovery, args.database_url)
        endpoints = discovery.wait_for_entry(args.discovery_wait)

    worker = Worker(endpoints[0], endpoints[1], args.worker_id, args.concurrency,
                    args.step_timeout_ms, args.heartbeat_interval_ms, args.shutdown_timeout, curve=curve)
    worker.queues = args.queues.split(",")  # advertised in heartbeats (docs/protocol.md 4.5)
    if discovery:
        threading.Thread(target=discovery.follow, args=(worker.move_to, stop), daemon=True).start()

    def on_signal(signum, frame):
        stop.set()
        worker.wake()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    worker.serve(stop)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
