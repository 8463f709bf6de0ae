/*
 * orchestration_handle.h: the orchestrator side of the batch and result
 * channels (wire protocol versions 1 and 2, docs/protocol.md).
 *
 * The core (orchestration_handle.c) owns the two sockets, the worker table,
 * credit accounting, the in-flight steps of each worker, heartbeat expiry
 * and batch addressing. It is plain C: it never raises, never touches a
 * Ruby object and parses incoming bodies with msgpack-c, so a native
 * orchestration thread can drive it without the GVL. The Ruby binding
 * (orchestration_handle_class.c) packs the steps of Ruby batches for the
 * core's one batch builder and turns the core's event queue into Ruby
 * Hashes. Each incoming body is parsed once, here, by tc_proto_parse (the
 * parser the fuzzer runs); a RESULT event carries what was parsed.
 *
 * Like a tc_socket, a handle belongs to one thread at a time.
 */
#ifndef TASKER_CORE_ORCHESTRATION_HANDLE_H
#define TASKER_CORE_ORCHESTRATION_HANDLE_H

#include <stddef.h>
#include <stdint.h>

#include "codec.h"
#include "curve.h"
#include "protocol.h"
#include "socket.h"

/* The newest protocol version the handle speaks; a worker gets batches in
 * the version of its latest heartbeat (docs/protocol.md 12). */
#define TC_OH_PROTOCOL_VERSION 2
/* Worker ids are /\A[A-Za-z0-9_-]+\z/ and at most this long. */
#define TC_OH_WORKER_ID_MAX 128
/* Batch ids (generated or given) are at most this long: they are copied
 * into every in-flight entry so a lost worker can report them. */
#define TC_OH_BATCH_ID_MAX 63
#define TC_OH_HOST_MAX 255
/* Longest last_connection_event kept (socket monitor event names are short). */
#define TC_OH_CONN_EVENT_MAX 31
#define TC_OH_REASON_MAX 127
/* The table is bounded so that a flood of subscriptions or heartbeats with
 * made-up ids cannot grow it without limit. */
#define TC_OH_MAX_WORKERS 4096
/* Per-worker in-flight bound; far above any sane capacity. */
#define TC_OH_MAX_IN_FLIGHT (1 << 20)
/* Messages read per socket per poll, so one call cannot spin forever on a
 * flooding peer. */
#define TC_OH_DRAIN_MAX 4096
/* Defaults for a worker whose heartbeat carries no "limits". */
#define TC_OH_DEFAULT_MAX_BATCH_STEPS 10000
#define TC_OH_DEFAULT_MAX_PAYLOAD_DEPTH 28
/* HWM send back-off: first refusal waits this long, doubling up to the max. */
#define TC_OH_BACKOFF_MIN_MS 50
#define TC_OH_BACKOFF_MAX_MS 1000
#define TC_OH_ERROR_CLASS_MAX 63
#define TC_OH_RECENT 32
/* Workers dropped as not_reading, kept for the binding to log. */
#define TC_OH_NOT_READING_LOG 16
#define TC_OH_MESSAGE_MAX 255
/* Queues a worker serves (its heartbeat's "queues"; "default" when unsaid). */
#define TC_OH_MAX_QUEUES TC_PROTO_MAX_QUEUES
#define TC_OH_QUEUE_MAX TC_PROTO_QUEUE_MAX
/* Handlers a worker refused as unknown_handler, remembered (hashed) so
 * their steps are not sent to it again; the oldest is forgotten first. */
#define TC_OH_LACKS_MAX 32
/* A live worker that unsubscribes is still heard this long for what it
 * sends on the result connection, which its unsubscription can overtake
 * (its last results, completions and goodbye), unless its goodbye comes
 * first. */
#define TC_OH_LEAVE_GRACE_MS 1000

/* Why an incoming message was not accepted as-is. */
typedef enum tc_oh_bad_reason {
    TC_OH_BAD_MALFORMED_FRAME = 0, /* not [topic, body] */
    TC_OH_BAD_UNDECODABLE,         /* body is not one msgpack map */
    TC_OH_BAD_PROTOCOL_VERSION,    /* protocol_version missing or not 1 or 2 */
    TC_OH_BAD_UNKNOWN_TYPE,        /* type missing or not one we know */
    TC_OH_BAD_INVALID_FIELDS,      /* a required field missing or mistyped */
    TC_OH_BAD_UNKNOWN_WORKER,      /* a result from a worker that is not live */
    TC_OH_BAD_DUPLICATE,           /* a partial for a step not in flight */
    TC_OH_BAD_TOO_LARGE,           /* a body over max_result_bytes */
    TC_OH_BAD_TOPIC_MISMATCH,      /* the topic frame is not the body's type */
    TC_OH_BAD_NOT_DISPATCHED,      /* a result/refusal from a live worker for a step or
                                      batch not in flight on it, or a wrong batch_id */
    TC_OH_BAD_COUNT
} tc_oh_bad_reason;

typedef struct tc_oh_step {
    int64_t step_id;
    int64_t task_id;
    int64_t attempt;
} tc_oh_step;

typedef struct tc_oh_inflight {
    int64_t step_id;
    int64_t task_id;
    int64_t attempt;
    char batch_id[TC_OH_BATCH_ID_MAX + 1];
} tc_oh_inflight;

/* Open-addressing slot; state 0 empty, 1 used, 2 deleted. */
typedef struct tc_oh_slot {
    tc_oh_inflight e;
    uint8_t state;
} tc_oh_slot;

/* tc_oh_worker.isolating */
enum { TC_OH_ISOLATE_NONE = 0, TC_OH_ISOLATE_RUN = 1, TC_OH_ISOLATE_DRAIN = 2 };

typedef struct tc_oh_worker {
    char id[TC_OH_WORKER_ID_MAX + 1];
    char host[TC_OH_HOST_MAX + 1];
    int64_t pid;
    int64_t capacity;
    /* from the heartbeat's optional "connection" (zeros/"" when unsaid) */
    int64_t connects, disconnects;
    char last_connection_event[TC_OH_CONN_EVENT_MAX + 1];
    double last_connection_event_at; /* epoch seconds, 0 when unsaid */
    int subscribed;       /* "\x01batch.<id>." installed on the XPUB, one per connection */
    int heartbeated;      /* a heartbeat arrived and has not expired */
    int not_reading;      /* dropped as not_reading: excluded until it subscribes again */
    /* unsubscribed: live (what it sends is taken) but sent nothing until
     * then, TC_OH_LEAVE_GRACE_MS on; 0: not leaving */
    int64_t leaving_until_mono_ms;
    /* it refused steps as draining: sent nothing more, whatever its
     * heartbeats say, until it subscribes again (a new connection) */
    int drained;
    /* Set by the caller (the orchestration loop), docs/protocol.md section
     * 5. TC_OH_ISOLATE_RUN: it was sent a suspect step alone (a step lost
     * twice: it may be what kills its workers). TC_OH_ISOLATE_DRAIN: a
     * suspect is waiting and no worker is idle, so this one gets no new
     * work until it is, and then the suspect. While set and used > 0 the
     * worker is not sendable. RUN is cleared when the in-flight table
     * empties (the result, a refusal, reconciliation); DRAIN stays until
     * the caller clears it or sends the suspect; both are cleared when the
     * worker is lost. */
    int isolating;
    /* heartbeat "queues" (one, "default", when unsaid) */
    char queues[TC_OH_MAX_QUEUES][TC_OH_QUEUE_MAX + 1];
    size_t nqueues;
    /* handlers it refused as unknown_handler (hashes, a ring) */
    uint64_t lacks[TC_OH_LACKS_MAX];
    size_t nlacks;
    int protocol_version; /* of its latest heartbeat: batches go to it in this version */
    /* heartbeat "limits" (defaults when unsaid) */
    int64_t max_batch_steps;    /* TC_OH_DEFAULT_MAX_BATCH_STEPS when unsaid */
    int64_t max_message_bytes;  /* the handle's max_message_bytes (INT64_MAX if <= 0) when unsaid */
    int64_t max_payload_depth;  /* TC_OH_DEFAULT_MAX_PAYLOAD_DEPTH when unsaid */
    /* HWM refusals: no batch before backoff_until_mono_ms; refused_since_mono_ms
     * is the first refusal since the last accepted send (0: none). */
    int64_t backoff_ms;
    int64_t backoff_until_mono_ms;
    int64_t refused_since_mono_ms;
    /* (step_id, attempt) of the latest results applied, to tell a
     * duplicate from a result that was never dispatched here */
    int64_t recent[TC_OH_RECENT][2];
    unsigned recent_next;
    double last_heartbeat_at;      /* epoch seconds, for callers */
    int64_t last_heartbeat_mono_ms; /* for expiry */
    uint64_t last_dispatch_seq;     /* ties go to the least recently used */
    /* in-flight steps keyed by (step_id, attempt) */
    tc_oh_slot *slots;
    size_t nslots; /* power of two, or 0 */
    size_t used;   /* live entries = this worker's in_flight */
    size_t tombstones;
} tc_oh_worker;

/* RESULT: a partial_result to apply (only from the worker and batch the
 *         step's attempt is in flight on).
 * LOST:   steps to dispatch again as a lost attempt; reason "unsubscribed",
 *         "heartbeat_timeout", "goodbye", "not_reading", "reconciled" or
 *         "refused"; or, reason "unknown_handler", steps the worker has no
 *         handler for: to hand back without a lost attempt, for another
 *         worker.
 * FAIL:   steps to fail, not retryable (a batch_refusal with too_deep or
 *         invalid_step); error_class and message say why. */
typedef enum tc_oh_event_kind {
    TC_OH_EV_RESULT = 1,
    TC_OH_EV_LOST,
    TC_OH_EV_FAIL,
    /* a batch_completion body, only while queue_completions is set (the
     * manual Ruby API); the orchestration loop never sees one */
    TC_OH_EV_COMPLETION
} tc_oh_event_kind;

/* Something receive_results hands to the caller, in arrival order. */
typedef struct tc_oh_event {
    tc_oh_event_kind kind;
    /* RESULT and COMPLETION: the body as received (a msgpack map), owned
     * by the event (a taker may move it out and set body NULL) */
    char *body;
    size_t len;
    /* RESULT, parsed once where it entered (tc_proto_parse): what the loop
     * stores, with output and error as the bytes they arrived as inside
     * body (ptr NULL when absent) */
    int64_t step_id, task_id, attempt;
    int success, retryable;
    int64_t retry_after_ms; /* -1: none */
    const char *output, *error;
    size_t output_len, error_len;
    /* LOST and FAIL: exactly the steps concerned (removed from the worker's table) */
    char worker_id[TC_OH_WORKER_ID_MAX + 1];
    char reason[TC_OH_REASON_MAX + 1];
    tc_oh_inflight *in_flight;
    size_t n_in_flight;
    /* FAIL */
    char error_class[TC_OH_ERROR_CLASS_MAX + 1];
    char message[TC_OH_MESSAGE_MAX + 1];
} tc_oh_event;

typedef struct tc_oh_stats {
    uint64_t batches_published;
    uint64_t steps_published;
    uint64_t partial_results;          /* results, each entry of a partial_results counting one */
    uint64_t partial_results_messages; /* version 2 partial_results messages */
    uint64_t batch_completions;
    uint64_t heartbeats;
    uint64_t goodbyes;
    uint64_t subscriptions;
    uint64_t unsubscriptions;
    uint64_t workers_lost;
    uint64_t send_refused;             /* XPUB refused at the high-water mark */
    uint64_t steps_released_by_completion; /* partials that never came */
    uint64_t worker_table_full;
    uint64_t subscriptions_refused;    /* non-worker topics under XPUB_MANUAL */
    uint64_t workers_not_reading;      /* dropped after heartbeat_timeout_ms of refusals */
    uint64_t refusals;                 /* batch_refusal messages accepted */
    uint64_t steps_reconciled;         /* taken back by heartbeat reconciliation */
    uint64_t bad[TC_OH_BAD_COUNT];
} tc_oh_stats;

typedef struct tc_oh_config {
    const char *batch_endpoint;
    const char *result_endpoint;
    int send_hwm;
    int recv_hwm;
    int linger_ms;
    long heartbeat_timeout_ms;
    /* Security (docs/security.md). curve NULL: plain TCP. */
    const tc_curve_server *curve;
    int max_message_bytes;   /* ZMQ_MAXMSGSIZE on the result socket; <= 0: unlimited */
    size_t max_result_bytes; /* bodies larger are counted as too_large and dropped; 0: no limit */
    int max_payload_depth;   /* sent to workers in each batch's limits */
} tc_oh_config;

typedef struct tc_oh {
    tc_socket batch; /* XPUB, bound */
    tc_socket result; /* SUB, bound, subscribed to "" */
    char batch_endpoint[TC_SOCKET_ENDPOINT_MAX];
    char result_endpoint[TC_SOCKET_ENDPOINT_MAX];
    int send_hwm, recv_hwm, linger_ms;
    long heartbeat_timeout_ms;
    int open;

    tc_oh_worker *workers;
    size_t nworkers, workers_cap;

    /* FIFO of events: [head, count) in a ring would be tidier; a plain
     * array compacted on drain is enough at these rates. */
    tc_oh_event *events;
    size_t ev_head, ev_count, ev_cap;

    uint64_t batch_seq, dispatch_seq;
    char batch_id_prefix[32];

    tc_oh_stats stats;
    /* Last detail per bad reason, so the binding can log each reason once. */
    char bad_detail[TC_OH_BAD_COUNT][160];

    /* Security: CURVE server on both sockets with this ZAP domain's allow-list. */
    int curve;
    char zap_domain[TC_CURVE_DOMAIN_MAX + 1];
    int max_message_bytes;
    size_t max_result_bytes;
    int max_payload_depth;
    /* Also queue batch_completion bodies (TC_OH_EV_COMPLETION); see
     * tc_oh_set_queue_completions. Off: they only free credit. */
    int queue_completions;
    /* Workers dropped as not_reading since the binding last looked (it
     * logs each id once and empties the list); beyond the bound only counted. */
    char not_reading_log[TC_OH_NOT_READING_LOG][TC_OH_WORKER_ID_MAX + 1];
    size_t n_not_reading_log;
} tc_oh;

/* Zero *h first. Opens and binds both sockets; 0 ok, -1 with a sentence in
 * err (and everything opened so far closed again). */
int tc_oh_open(tc_oh *h, const tc_oh_config *cfg, char *err, size_t errlen);

/* Idempotent; frees the table and the queued events; in a forked child the
 * sockets are only forgotten. */
void tc_oh_close(tc_oh *h);

/* Non-zero when the handle was opened by another process. */
int tc_oh_forked(const tc_oh *h);

/* Reads what is ready on both sockets without waiting (at most
 * TC_OH_DRAIN_MAX per socket), updating the worker table and queueing
 * results, then expires silent workers. Returns the number of messages
 * read, or -1 if a socket failed (errno set). */
int tc_oh_poll(tc_oh *h);

/* Reports workers silent for heartbeat_timeout_ms as lost. */
void tc_oh_expire(tc_oh *h);

/* Milliseconds until the next heartbeat expiry could happen (>= 0), or -1
 * when no live worker is waiting to expire. Lets a waiter wake in time to
 * report a lost worker. */
long tc_oh_next_expiry_ms(const tc_oh *h);

/* Picks the live worker for a batch of nsteps: the one with the most free
 * capacity among those with free >= nsteps; a batch larger than a worker's
 * whole capacity may go only to that worker while it is fully idle, so an
 * oversized batch is never refused forever and never piles on a busy
 * worker. Workers advertising capacity 0 take nothing; ties go to the
 * least recently sent to. The one selection rule: publish_batch and the
 * loop (the order it fills workers in, nsteps 1) both use it. skip: NULL,
 * or a flag per worker index to leave out. Returns the index in
 * h->workers, or -1. */
long tc_oh_choose_worker(const tc_oh *h, size_t nsteps, const unsigned char *skip);

int tc_oh_worker_live(const tc_oh_worker *w);

/* The worker with this id, or NULL. */
tc_oh_worker *tc_oh_worker_by_id(tc_oh *h, const char *id);

/* Non-zero when w serves the queue q (n bytes). */
int tc_oh_worker_serves(const tc_oh_worker *w, const char *q, size_t n);

/* Remembers that w has no handler named (n bytes) / asks whether it was
 * seen to lack it. A worker keeps this for as long as it is in the table
 * (a restarted worker has a new id). */
void tc_oh_worker_note_lacks(tc_oh_worker *w, const char *handler, size_t n);
int tc_oh_worker_lacks(const tc_oh_worker *w, const char *handler, size_t n);

/* Live, capacity > 0, not in its HWM send back-off, not dropped as
 * not_reading, and neither isolating a suspect step still in flight nor
 * draining for one with steps in flight: the loop sends only to such
 * workers. */
int tc_oh_worker_sendable(const tc_oh *h, const tc_oh_worker *w, int64_t now_mono_ms);

/* Sendable with nothing in flight: a worker a suspect step may go to. */
int tc_oh_worker_idle(const tc_oh *h, const tc_oh_worker *w, int64_t now_mono_ms);

/* CLOCK_MONOTONIC in milliseconds, the clock tc_oh_worker_sendable takes. */
int64_t tc_oh_now_ms(void);

/* Writes a fresh batch id ("<prefix>-<seq>", unique per handle) into buf. */
void tc_oh_next_batch_id(tc_oh *h, char *buf, size_t len);

/* Sends body on topic "batch.<worker id>." and, only when libzmq took it,
 * records the steps in flight for that worker. 0 ok; -1 with errno: EAGAIN
 * refused at the high-water mark (counted; the worker backs off 50 ms
 * doubling to 1 s, and after heartbeat_timeout_ms of nothing but refusals
 * is lost as "not_reading"), ENOMEM, EINVAL, or a socket error. */
int tc_oh_send_batch(tc_oh *h, size_t worker_index, const char *batch_id, const tc_oh_step *steps,
                     size_t nsteps, const void *body, size_t len);

/* Packed step maps of a batch, one or more (spliced as they are). */
typedef struct tc_oh_entry {
    const char *ptr;
    size_t len;
} tc_oh_entry;

/* The one batch builder (docs/protocol.md 4.1), for the loop and the
 * manual publish_batch alike: into out (reset first) the envelope
 * (protocol_version, type, batch_id, worker_id, sent_at, this handle's
 * limits), nextra further key/value pairs already packed in extra (keys
 * not among the envelope's: see tc_oh_batch_key), and the steps array:
 * nsteps step maps, packed, in npieces pieces spliced in order (one piece
 * per step for the loop, one for all of them for publish_batch). nsteps 0
 * measures the envelope. 0, or -1 out of memory. */
int tc_oh_build_batch(tc_codec_writer *out, const tc_oh *h, const char *batch_id, const char *worker_id,
                      size_t nsteps, const tc_oh_entry *pieces, size_t npieces, const char *extra, size_t extra_len,
                      size_t nextra);

/* Non-zero for a key tc_oh_build_batch writes itself. */
int tc_oh_batch_key(const char *p, size_t n);

/* tc_oh_send_batch in three parts, for a caller whose readers take a lock
 * around changes to the table (the orchestration loop) but that sends
 * without it: tc_oh_send_reserve (table change: room for nsteps in flight;
 * -1 with EINVAL or ENOMEM) and tc_oh_send_record (table change: the
 * outcome; sent 0 with err EAGAIN counts a refusal and backs the worker
 * off) under the lock, tc_oh_send_raw (the send only: no table change,
 * though the batch socket's counters move) outside it. */
int tc_oh_send_reserve(tc_oh *h, size_t worker_index, const char *batch_id, size_t nsteps);
int tc_oh_send_raw(tc_oh *h, size_t worker_index, const void *body, size_t len);
void tc_oh_send_record(tc_oh *h, size_t worker_index, const char *batch_id, const tc_oh_step *steps,
                       size_t nsteps, int sent, int err);

/* Turns TC_OH_EV_COMPLETION events on or off; off also drops those queued. */
void tc_oh_set_queue_completions(tc_oh *h, int on);

/* The oldest queued event, or NULL; tc_oh_event_pop frees it. */
tc_oh_event *tc_oh_event_peek(tc_oh *h);
void tc_oh_event_pop(tc_oh *h);

/* Live entries of a worker's in-flight table, in table order; calls fn for each. */
void tc_oh_worker_each_in_flight(const tc_oh_worker *w, void (*fn)(const tc_oh_inflight *, void *),
                                 void *arg);

const char *tc_oh_bad_reason_name(tc_oh_bad_reason r);

/* Counts a bad message and keeps a printf-style detail for the log. The
 * binding uses it too, for a body msgpack-c accepted and the codec did not. */
void tc_oh_count_bad(tc_oh *h, tc_oh_bad_reason r, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

#endif
