/*
 * protocol.h: wire protocol messages (versions 1 and 2) from the result
 * channel (docs/protocol.md), parsed in plain C with msgpack-c for the native
 * orchestration loop. Never raises, never touches Ruby.
 *
 * Parsed fields point into the msgpack_unpacked zone and the body buffer
 * (msgpack-c references strings in place): both must outlive the struct.
 */
#ifndef TASKER_CORE_PROTOCOL_H
#define TASKER_CORE_PROTOCOL_H

#include <msgpack.h>
#include <stddef.h>
#include <stdint.h>

typedef enum tc_proto_type {
    TC_PROTO_PARTIAL_RESULT = 1,
    TC_PROTO_BATCH_COMPLETION,
    TC_PROTO_HEARTBEAT,
    TC_PROTO_GOODBYE,
    TC_PROTO_BATCH_REFUSAL,
    TC_PROTO_PARTIAL_RESULTS /* version 2: several partial_results in one message */
} tc_proto_type;

/* The protocol versions this parser speaks (docs/protocol.md 12). */
#define TC_PROTO_VERSION_MIN 1
#define TC_PROTO_VERSION_MAX 2

/* Most entries accepted in one partial_results; a longer list is malformed. */
#define TC_PROTO_MAX_RESULTS 10000

/* Longest in_flight_steps (heartbeat) or steps (batch_refusal) list
 * accepted; a longer one is malformed. */
#define TC_PROTO_MAX_LIST (1 << 20)

/* A heartbeat's optional "queues": 1 to TC_PROTO_MAX_QUEUES names, each 1
 * to TC_PROTO_QUEUE_MAX bytes of [A-Za-z0-9_.:-] (lib/tasker_core/queues.rb). */
#define TC_PROTO_MAX_QUEUES 16
#define TC_PROTO_QUEUE_MAX 63

/* Why a body was refused; counted per reason by the caller. */
typedef enum tc_proto_err {
    TC_PROTO_OK = 0,
    TC_PROTO_ERR_UNDECODABLE,   /* not exactly one msgpack map */
    TC_PROTO_ERR_VERSION,       /* protocol_version missing or not 1 or 2 */
    TC_PROTO_ERR_TYPE,          /* type missing or unknown */
    TC_PROTO_ERR_FIELDS,        /* a required field missing or of the wrong type */
    TC_PROTO_ERR_COUNT
} tc_proto_err;

typedef struct tc_proto_str {
    const char *ptr;
    size_t len;
} tc_proto_str;

/* A heartbeat's optional "connection": the worker's socket monitor totals.
 * Absent (an older worker) or of the wrong type: zeros and a NULL
 * last_event; a bad field is ignored, never the message. */
typedef struct tc_proto_conn {
    int64_t connects, disconnects;
    tc_proto_str last_event; /* ptr NULL when unsaid */
    double last_event_at;    /* epoch seconds; 0 when unsaid */
} tc_proto_conn;

/* A heartbeat's optional "limits"; a field unsaid, mistyped or out of
 * range reads as 0 (the caller's default). */
typedef struct tc_proto_limits {
    int64_t max_batch_steps;   /* 1 .. TC_PROTO_MAX_LIST */
    int64_t max_message_bytes; /* >= 1 */
    int64_t max_payload_depth; /* 1 .. 10000 */
} tc_proto_limits;

typedef struct tc_proto_msg {
    tc_proto_type type;
    int version; /* the message's protocol_version: 1 or 2 */
    tc_proto_str worker_id;
    tc_proto_str batch_id; /* partial_result, batch_completion, batch_refusal (ptr NULL: nil) */

    /* partial_result */
    int64_t step_id, task_id, attempt;
    int success;                  /* status "complete" */
    const msgpack_object *output; /* NULL when absent */
    const msgpack_object *error;  /* a map, or NULL */
    /* output and error as the bytes they arrived as, inside the body (ptr
     * NULL when absent): what the loop stores, never re-packed */
    tc_proto_str output_bytes, error_bytes;
    int retryable;                /* from error.retryable; true when unsaid */
    int64_t retry_after_ms;       /* from error.retry_after (seconds); -1 when nil */

    /* batch_completion: an array of {step_id, attempt, status};
     * batch_refusal: an array of {step_id, attempt, reason, message}, each
     * checked (read them with tc_proto_refused_step) */
    const msgpack_object *steps;

    /* heartbeat */
    int64_t pid, capacity, in_flight;
    tc_proto_str host;
    tc_proto_conn connection;
    tc_proto_limits limits;
    /* last_batch_id and in_flight_steps, both present and well-formed
     * (otherwise reconcile is 0 and the heartbeat still counts) */
    int reconcile;
    tc_proto_str last_batch_id;            /* ptr NULL when nil */
    const msgpack_object *in_flight_steps; /* [[step_id, attempt], ...]: tc_proto_in_flight_step */
    /* "queues", checked (tc_proto_queue reads entry i); NULL when unsaid
     * or malformed: the worker serves "default" (docs/protocol.md 4.5) */
    const msgpack_object *queues;

    /* partial_results: the "results" array, each entry a map (read them
     * in order with tc_proto_next_result) */
    const msgpack_object *results;
    tc_proto_str results_bytes; /* the array's bytes inside the body */

    /* goodbye, batch_refusal */
    tc_proto_str reason;
    /* batch_refusal */
    tc_proto_str message;
} tc_proto_msg;

/* Parses body into *out. u must be initialised by the caller (and
 * destroyed after the last use of *out). On failure returns the reason and
 * writes a short description into detail. */
tc_proto_err tc_proto_parse(msgpack_unpacked *u, const char *body, size_t len, tc_proto_msg *out, char *detail,
                            size_t detail_len);

const char *tc_proto_err_name(tc_proto_err e);

/* Reads the optional "connection" of heartbeat map m into *out (zeroed
 * first); see tc_proto_conn. */
void tc_proto_parse_connection(const msgpack_object *m, tc_proto_conn *out);

/* Entry i of a parsed heartbeat's in_flight_steps. */
void tc_proto_in_flight_step(const tc_proto_msg *m, size_t i, int64_t *step_id, int64_t *attempt);

/* Entry i of a parsed heartbeat's queues. */
tc_proto_str tc_proto_queue(const tc_proto_msg *m, size_t i);

/* Non-zero for a valid queue name (see TC_PROTO_MAX_QUEUES). */
int tc_proto_queue_name_ok(const char *p, size_t n);

/* Entry i of a parsed batch_refusal's steps. */
void tc_proto_refused_step(const tc_proto_msg *m, size_t i, int64_t *step_id, int64_t *attempt, tc_proto_str *reason,
                           tc_proto_str *message);

/* Reads entry i of a parsed partial_results m (from the body m was parsed
 * from) as a partial_result into *out: version and worker_id from the
 * envelope, the rest checked as tc_proto_parse checks a partial_result.
 * Entries are read in order, i from 0, with the same *cursor (NULL before
 * entry 0). *pairs gets the entry's key/value pairs (the map's bytes after
 * its header) inside body and *npairs their number. Returns TC_PROTO_OK or
 * why this entry is refused; the other entries still stand (but after a
 * TC_PROTO_ERR_UNDECODABLE the cursor is lost: stop). */
tc_proto_err tc_proto_next_result(const tc_proto_msg *m, size_t i, const char **cursor, const char *body, size_t len,
                                  tc_proto_msg *out, tc_proto_str *pairs, uint32_t *npairs, char *detail,
                                  size_t detail_len);

/* Appends obj (or nil for NULL) re-encoded as msgpack to sbuf; 0 ok, -1 out of memory. */
int tc_proto_pack_object(msgpack_sbuffer *sbuf, const msgpack_object *obj);

/* The bytes inside body of the value under a str key of map (the first
 * such key, as tc_proto_map_get finds it), map having been unpacked from
 * body by msgpack_unpack_next: 0 with *out, 1 when the key is absent, -1
 * when the value's bytes are not found whole inside body. */
int tc_proto_value_bytes(const msgpack_object *map, const char *body, size_t len, const char *key, tc_proto_str *out);

/* The value under a str key of a msgpack map (linear scan), or NULL. */
const msgpack_object *tc_proto_map_get(const msgpack_object *map, const char *key);

#endif
