/*
 * protocol.c: parses result-channel messages of wire protocol versions 1
 * and 2 into C structs (see protocol.h). Validation is strict on the fields the loop
 * acts on and lenient on the rest, so a newer worker that adds keys still
 * talks to this orchestrator.
 */
#include "protocol.h"

#include "codec.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

static const char *const err_names[TC_PROTO_ERR_COUNT] = {"ok", "undecodable_body", "wrong_protocol_version",
                                                          "unknown_type", "invalid_fields"};

const char *tc_proto_err_name(tc_proto_err e)
{
    return (e >= 0 && e < TC_PROTO_ERR_COUNT) ? err_names[e] : "unknown";
}

/* The first pair of a msgpack map under a str key, or NULL. */
static const msgpack_object_kv *map_pair(const msgpack_object *map, const char *key)
{
    size_t kl = strlen(key);
    for (uint32_t i = 0; i < map->via.map.size; i++) {
        const msgpack_object *k = &map->via.map.ptr[i].key;
        if (k->type == MSGPACK_OBJECT_STR && k->via.str.size == kl && memcmp(k->via.str.ptr, key, kl) == 0)
            return &map->via.map.ptr[i];
    }
    return NULL;
}

/* The value under a str key of a msgpack map, or NULL. */
const msgpack_object *tc_proto_map_get(const msgpack_object *map, const char *key)
{
    const msgpack_object_kv *kv = map_pair(map, key);
    return kv ? &kv->val : NULL;
}

int tc_proto_value_bytes(const msgpack_object *map, const char *body, size_t len, const char *key, tc_proto_str *out)
{
    const msgpack_object_kv *kv = map_pair(map, key);
    if (!kv) return 1;
    /* msgpack-c points a str at its bytes in body: the value starts right
     * after its key's, and tc_codec_skip finds where it ends. */
    const char *start = kv->key.via.str.ptr + kv->key.via.str.size;
    size_t n;
    uintptr_t at = (uintptr_t)start, lo = (uintptr_t)body;
    if (at < lo || at >= lo + len || tc_codec_skip(start, len - (size_t)(at - lo), &n) != 0) return -1;
    out->ptr = start;
    out->len = n;
    return 0;
}

static int as_int(const msgpack_object *v, int64_t *out)
{
    if (!v) return 0;
    if (v->type == MSGPACK_OBJECT_POSITIVE_INTEGER && v->via.u64 <= INT64_MAX) {
        *out = (int64_t)v->via.u64;
        return 1;
    }
    if (v->type == MSGPACK_OBJECT_NEGATIVE_INTEGER) {
        *out = v->via.i64;
        return 1;
    }
    return 0;
}

/* Ruby packs binary-encoded Strings (a worker id built from
 * Socket.gethostname, for one) as bin: text fields accept either. */
static int as_str(const msgpack_object *v, tc_proto_str *out)
{
    if (v && v->type == MSGPACK_OBJECT_STR) {
        out->ptr = v->via.str.ptr;
        out->len = v->via.str.size;
        return 1;
    }
    if (v && v->type == MSGPACK_OBJECT_BIN) {
        out->ptr = v->via.bin.ptr;
        out->len = v->via.bin.size;
        return 1;
    }
    return 0;
}

static int str_eq(tc_proto_str s, const char *lit)
{
    return s.len == strlen(lit) && memcmp(s.ptr, lit, s.len) == 0;
}

void tc_proto_parse_connection(const msgpack_object *m, tc_proto_conn *out)
{
    memset(out, 0, sizeof(*out));
    const msgpack_object *c = m && m->type == MSGPACK_OBJECT_MAP ? tc_proto_map_get(m, "connection") : NULL;
    if (!c || c->type != MSGPACK_OBJECT_MAP) return;
    /* Stored in int columns: out of range reads as unsaid. */
    if (!as_int(tc_proto_map_get(c, "connects"), &out->connects) || out->connects < 0 || out->connects > INT32_MAX)
        out->connects = 0;
    if (!as_int(tc_proto_map_get(c, "disconnects"), &out->disconnects) || out->disconnects < 0 || out->disconnects > INT32_MAX)
        out->disconnects = 0;
    if (!as_str(tc_proto_map_get(c, "last_event"), &out->last_event)) out->last_event = (tc_proto_str){NULL, 0};
    const msgpack_object *at = tc_proto_map_get(c, "last_event_at");
    double t = 0;
    if (at && (at->type == MSGPACK_OBJECT_FLOAT32 || at->type == MSGPACK_OBJECT_FLOAT64))
        t = at->via.f64;
    else if (at && at->type == MSGPACK_OBJECT_POSITIVE_INTEGER)
        t = (double)at->via.u64;
    /* Up to the year 5000 or so, well inside timestamptz. */
    out->last_event_at = isfinite(t) && t > 0 && t < 1e11 ? t : 0;
}

static int64_t limit_in(const msgpack_object *l, const char *key, int64_t max)
{
    int64_t v;
    return as_int(tc_proto_map_get(l, key), &v) && v >= 1 && v <= max ? v : 0;
}

static void parse_limits(const msgpack_object *m, tc_proto_limits *out)
{
    memset(out, 0, sizeof(*out));
    const msgpack_object *l = tc_proto_map_get(m, "limits");
    if (!l || l->type != MSGPACK_OBJECT_MAP) return;
    out->max_batch_steps = limit_in(l, "max_batch_steps", TC_PROTO_MAX_LIST);
    out->max_message_bytes = limit_in(l, "max_message_bytes", INT64_MAX);
    out->max_payload_depth = limit_in(l, "max_payload_depth", 10000);
}

/* [step_id, attempt >= 1] */
static int in_flight_pair(const msgpack_object *e, int64_t *step_id, int64_t *attempt)
{
    return e->type == MSGPACK_OBJECT_ARRAY && e->via.array.size == 2 && as_int(&e->via.array.ptr[0], step_id) &&
           as_int(&e->via.array.ptr[1], attempt) && *attempt >= 1;
}

/* Both or neither; a malformed list drops the reconciliation, not the heartbeat. */
static void parse_reconcile(const msgpack_object *m, tc_proto_msg *out)
{
    const msgpack_object *lb = tc_proto_map_get(m, "last_batch_id");
    const msgpack_object *ifs = tc_proto_map_get(m, "in_flight_steps");
    if (!lb || !ifs || ifs->type != MSGPACK_OBJECT_ARRAY || ifs->via.array.size > TC_PROTO_MAX_LIST) return;
    if (lb->type == MSGPACK_OBJECT_NIL)
        out->last_batch_id = (tc_proto_str){NULL, 0};
    else if (!as_str(lb, &out->last_batch_id))
        return;
    int64_t s, a;
    for (uint32_t i = 0; i < ifs->via.array.size; i++)
        if (!in_flight_pair(&ifs->via.array.ptr[i], &s, &a)) return;
    out->in_flight_steps = ifs;
    out->reconcile = 1;
}

void tc_proto_in_flight_step(const tc_proto_msg *m, size_t i, int64_t *step_id, int64_t *attempt)
{
    in_flight_pair(&m->in_flight_steps->via.array.ptr[i], step_id, attempt);
}

int tc_proto_queue_name_ok(const char *p, size_t n)
{
    if (n < 1 || n > TC_PROTO_QUEUE_MAX) return 0;
    for (size_t i = 0; i < n; i++) {
        char c = p[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' || c == '.' ||
              c == ':' || c == '-'))
            return 0;
    }
    return 1;
}

/* All or nothing: one bad name and the worker reads as serving "default". */
static void parse_queues(const msgpack_object *m, tc_proto_msg *out)
{
    const msgpack_object *q = tc_proto_map_get(m, "queues");
    if (!q || q->type != MSGPACK_OBJECT_ARRAY || q->via.array.size < 1 || q->via.array.size > TC_PROTO_MAX_QUEUES)
        return;
    tc_proto_str s;
    for (uint32_t i = 0; i < q->via.array.size; i++)
        if (!as_str(&q->via.array.ptr[i], &s) || !tc_proto_queue_name_ok(s.ptr, s.len)) return;
    out->queues = q;
}

tc_proto_str tc_proto_queue(const tc_proto_msg *m, size_t i)
{
    tc_proto_str s = {NULL, 0};
    as_str(&m->queues->via.array.ptr[i], &s);
    return s;
}

/* {step_id, attempt >= 1, reason, message} */
static int refused_step(const msgpack_object *e, int64_t *step_id, int64_t *attempt, tc_proto_str *reason,
                        tc_proto_str *message)
{
    return e->type == MSGPACK_OBJECT_MAP && as_int(tc_proto_map_get(e, "step_id"), step_id) &&
           as_int(tc_proto_map_get(e, "attempt"), attempt) && *attempt >= 1 &&
           as_str(tc_proto_map_get(e, "reason"), reason) && as_str(tc_proto_map_get(e, "message"), message);
}

void tc_proto_refused_step(const tc_proto_msg *m, size_t i, int64_t *step_id, int64_t *attempt, tc_proto_str *reason,
                           tc_proto_str *message)
{
    refused_step(&m->steps->via.array.ptr[i], step_id, attempt, reason, message);
}

#define FAIL(reason, ...)                                  \
    do {                                                   \
        if (detail) snprintf(detail, detail_len, __VA_ARGS__); \
        return reason;                                     \
    } while (0)

/* Version 2: every map inside v has str keys (docs/protocol.md 2). Depth
 * is bounded by tc_codec_check, which ran over the whole body first. */
static int string_keys(const msgpack_object *v)
{
    if (v->type == MSGPACK_OBJECT_ARRAY) {
        for (uint32_t i = 0; i < v->via.array.size; i++)
            if (!string_keys(&v->via.array.ptr[i])) return 0;
    } else if (v->type == MSGPACK_OBJECT_MAP) {
        for (uint32_t i = 0; i < v->via.map.size; i++)
            if (v->via.map.ptr[i].key.type != MSGPACK_OBJECT_STR || !string_keys(&v->via.map.ptr[i].val)) return 0;
    }
    return 1;
}

/* The fields of one result (a partial_result, or an entry of
 * partial_results) from map m; worker_id is read by the caller. */
static tc_proto_err parse_result_fields(const msgpack_object *m, const char *body, size_t len, tc_proto_msg *out,
                                        char *detail, size_t detail_len)
{
    tc_proto_str status;
    if (!as_int(tc_proto_map_get(m, "step_id"), &out->step_id) || !as_int(tc_proto_map_get(m, "attempt"), &out->attempt) ||
        out->attempt < 1)
        FAIL(TC_PROTO_ERR_FIELDS, "partial_result without step_id and attempt >= 1");
    as_int(tc_proto_map_get(m, "task_id"), &out->task_id);
    /* A result is accepted only with the batch it was sent in. */
    if (!as_str(tc_proto_map_get(m, "batch_id"), &out->batch_id)) FAIL(TC_PROTO_ERR_FIELDS, "partial_result without a batch_id");
    if (!as_str(tc_proto_map_get(m, "status"), &status)) FAIL(TC_PROTO_ERR_FIELDS, "partial_result without a status");
    if (str_eq(status, "complete"))
        out->success = 1;
    else if (str_eq(status, "error"))
        out->success = 0;
    else
        FAIL(TC_PROTO_ERR_FIELDS, "partial_result with status %.*s", (int)(status.len > 32 ? 32 : status.len),
             status.ptr);
    out->output = tc_proto_map_get(m, "output");
    if (out->output && tc_proto_value_bytes(m, body, len, "output", &out->output_bytes) != 0)
        FAIL(TC_PROTO_ERR_UNDECODABLE, "a partial_result whose output could not be located");
    if (out->version >= 2 && out->output && !string_keys(out->output))
        FAIL(TC_PROTO_ERR_FIELDS, "a version 2 partial_result for step %lld whose output has a map key that is not a string",
             (long long)out->step_id);
    out->retryable = 1;
    out->retry_after_ms = -1;
    const msgpack_object *e = tc_proto_map_get(m, "error");
    if (e && e->type == MSGPACK_OBJECT_MAP) {
        out->error = e;
        if (tc_proto_value_bytes(m, body, len, "error", &out->error_bytes) != 0)
            FAIL(TC_PROTO_ERR_UNDECODABLE, "a partial_result whose error could not be located");
        const msgpack_object *r = tc_proto_map_get(e, "retryable");
        if (r && r->type == MSGPACK_OBJECT_BOOLEAN) out->retryable = r->via.boolean;
        const msgpack_object *ra = tc_proto_map_get(e, "retry_after");
        double secs = -1;
        if (ra && (ra->type == MSGPACK_OBJECT_FLOAT32 || ra->type == MSGPACK_OBJECT_FLOAT64))
            secs = ra->via.f64;
        else if (ra && ra->type == MSGPACK_OBJECT_POSITIVE_INTEGER)
            secs = (double)ra->via.u64;
        /* Capped at a day: the store keeps it in an int of milliseconds. */
        if (secs >= 0 && isfinite(secs)) out->retry_after_ms = (int64_t)(secs > 86400 ? 86400000 : secs * 1000.0);
    } else if (e && e->type != MSGPACK_OBJECT_NIL) {
        FAIL(TC_PROTO_ERR_FIELDS, "partial_result whose error is neither a map nor nil");
    } else if (!out->success) {
        FAIL(TC_PROTO_ERR_FIELDS, "partial_result with status error and no error map");
    }
    return TC_PROTO_OK;
}

static tc_proto_err parse_partial(const msgpack_object *m, const char *body, size_t len, tc_proto_msg *out,
                                  char *detail, size_t detail_len)
{
    if (!as_str(tc_proto_map_get(m, "worker_id"), &out->worker_id))
        FAIL(TC_PROTO_ERR_FIELDS, "partial_result without worker_id");
    return parse_result_fields(m, body, len, out, detail, detail_len);
}

/* Version 2: {worker_id, results: [entry, ...]}, each entry a map; the
 * entries themselves are checked one by one by tc_proto_next_result. */
static tc_proto_err parse_partials(const msgpack_object *m, const char *body, size_t len, tc_proto_msg *out,
                                   char *detail, size_t detail_len)
{
    const msgpack_object *r = tc_proto_map_get(m, "results");
    if (!as_str(tc_proto_map_get(m, "worker_id"), &out->worker_id) || !r || r->type != MSGPACK_OBJECT_ARRAY ||
        r->via.array.size == 0 || r->via.array.size > TC_PROTO_MAX_RESULTS)
        FAIL(TC_PROTO_ERR_FIELDS, "partial_results without worker_id and results (an array of 1 to %d maps)",
             TC_PROTO_MAX_RESULTS);
    for (uint32_t i = 0; i < r->via.array.size; i++)
        if (r->via.array.ptr[i].type != MSGPACK_OBJECT_MAP) FAIL(TC_PROTO_ERR_FIELDS, "partial_results entry %u is not a map", i);
    if (tc_proto_value_bytes(m, body, len, "results", &out->results_bytes) != 0)
        FAIL(TC_PROTO_ERR_UNDECODABLE, "a partial_results whose results could not be located");
    out->results = r;
    return TC_PROTO_OK;
}

/* Bytes of the header of the msgpack array or map at p (fix, 16 or 32). */
static size_t container_header(const char *p, size_t left)
{
    unsigned char c = left ? (unsigned char)p[0] : 0;
    if ((c >= 0x80 && c <= 0x9f)) return 1;
    if ((c == 0xdc || c == 0xde) && left >= 3) return 3;
    if ((c == 0xdd || c == 0xdf) && left >= 5) return 5;
    return 0;
}

tc_proto_err tc_proto_next_result(const tc_proto_msg *m, size_t i, const char **cursor, const char *body, size_t len,
                                  tc_proto_msg *out, tc_proto_str *pairs, uint32_t *npairs, char *detail,
                                  size_t detail_len)
{
    memset(out, 0, sizeof(*out));
    out->type = TC_PROTO_PARTIAL_RESULT;
    out->version = m->version;
    out->worker_id = m->worker_id;
    const char *end = m->results_bytes.ptr + m->results_bytes.len;
    if (!*cursor) {
        size_t h = container_header(m->results_bytes.ptr, m->results_bytes.len);
        if (!h) FAIL(TC_PROTO_ERR_UNDECODABLE, "partial_results whose results are not an array");
        *cursor = m->results_bytes.ptr + h;
    }
    size_t n;
    if (i >= m->results->via.array.size || *cursor >= end || tc_codec_skip(*cursor, (size_t)(end - *cursor), &n) != 0)
        FAIL(TC_PROTO_ERR_UNDECODABLE, "partial_results entry %zu could not be located", i);
    const char *at = *cursor;
    *cursor += n;
    size_t h = container_header(at, n);
    if (!h) FAIL(TC_PROTO_ERR_UNDECODABLE, "partial_results entry %zu is not a map", i);
    const msgpack_object *e = &m->results->via.array.ptr[i];
    pairs->ptr = at + h;
    pairs->len = n - h;
    *npairs = e->via.map.size;
    /* The handle turns an entry into a partial_result by putting these
     * three in front of its pairs. */
    if (tc_proto_map_get(e, "protocol_version") || tc_proto_map_get(e, "type") || tc_proto_map_get(e, "worker_id"))
        FAIL(TC_PROTO_ERR_FIELDS, "partial_results entry %zu carries protocol_version, type or worker_id", i);
    return parse_result_fields(e, body, len, out, detail, detail_len);
}

tc_proto_err tc_proto_parse(msgpack_unpacked *u, const char *body, size_t len, tc_proto_msg *out, char *detail,
                            size_t detail_len)
{
    size_t off = 0;
    memset(out, 0, sizeof(*out));
    /* Before msgpack-c sizes its zone from counts a peer made up. */
    if (tc_codec_check(body, len, NULL, 0) != 0)
        FAIL(TC_PROTO_ERR_UNDECODABLE, "a %zu-byte body that is not one well-formed msgpack value", len);
    if (msgpack_unpack_next(u, body, len, &off) != MSGPACK_UNPACK_SUCCESS || off != len ||
        u->data.type != MSGPACK_OBJECT_MAP)
        FAIL(TC_PROTO_ERR_UNDECODABLE, "a %zu-byte body that is not one msgpack map", len);
    const msgpack_object *m = &u->data;
    int64_t version;
    if (!as_int(tc_proto_map_get(m, "protocol_version"), &version) || version < TC_PROTO_VERSION_MIN ||
        version > TC_PROTO_VERSION_MAX)
        FAIL(TC_PROTO_ERR_VERSION, "a message without protocol_version 1 or 2");
    out->version = (int)version;
    tc_proto_str type;
    if (!as_str(tc_proto_map_get(m, "type"), &type)) FAIL(TC_PROTO_ERR_TYPE, "a message without a type");

    if (str_eq(type, "partial_result")) {
        out->type = TC_PROTO_PARTIAL_RESULT;
        return parse_partial(m, body, len, out, detail, detail_len);
    }
    if (str_eq(type, "partial_results") && version >= 2) {
        out->type = TC_PROTO_PARTIAL_RESULTS;
        return parse_partials(m, body, len, out, detail, detail_len);
    }
    if (str_eq(type, "batch_completion")) {
        out->type = TC_PROTO_BATCH_COMPLETION;
        const msgpack_object *steps = tc_proto_map_get(m, "steps");
        if (!as_str(tc_proto_map_get(m, "worker_id"), &out->worker_id) || !as_str(tc_proto_map_get(m, "batch_id"), &out->batch_id) ||
            !steps || steps->type != MSGPACK_OBJECT_ARRAY)
            FAIL(TC_PROTO_ERR_FIELDS, "batch_completion without worker_id, batch_id and steps");
        out->steps = steps;
        return TC_PROTO_OK;
    }
    if (str_eq(type, "heartbeat")) {
        out->type = TC_PROTO_HEARTBEAT;
        if (!as_str(tc_proto_map_get(m, "worker_id"), &out->worker_id) || !as_int(tc_proto_map_get(m, "capacity"), &out->capacity) ||
            out->capacity < 0)
            FAIL(TC_PROTO_ERR_FIELDS, "heartbeat without worker_id and capacity >= 0");
        as_int(tc_proto_map_get(m, "pid"), &out->pid);
        as_int(tc_proto_map_get(m, "in_flight"), &out->in_flight);
        as_str(tc_proto_map_get(m, "host"), &out->host);
        tc_proto_parse_connection(m, &out->connection);
        parse_limits(m, &out->limits);
        parse_reconcile(m, out);
        parse_queues(m, out);
        return TC_PROTO_OK;
    }
    if (str_eq(type, "goodbye")) {
        out->type = TC_PROTO_GOODBYE;
        if (!as_str(tc_proto_map_get(m, "worker_id"), &out->worker_id)) FAIL(TC_PROTO_ERR_FIELDS, "goodbye without worker_id");
        as_str(tc_proto_map_get(m, "reason"), &out->reason);
        return TC_PROTO_OK;
    }
    if (str_eq(type, "batch_refusal")) {
        out->type = TC_PROTO_BATCH_REFUSAL;
        const msgpack_object *bid = tc_proto_map_get(m, "batch_id");
        const msgpack_object *steps = tc_proto_map_get(m, "steps");
        if (!as_str(tc_proto_map_get(m, "worker_id"), &out->worker_id) || !bid ||
            (bid->type != MSGPACK_OBJECT_NIL && !as_str(bid, &out->batch_id)) ||
            !as_str(tc_proto_map_get(m, "reason"), &out->reason) || !as_str(tc_proto_map_get(m, "message"), &out->message) ||
            !steps || steps->type != MSGPACK_OBJECT_ARRAY || steps->via.array.size > TC_PROTO_MAX_LIST)
            FAIL(TC_PROTO_ERR_FIELDS, "batch_refusal without worker_id, batch_id, reason, message and steps");
        int64_t s, a;
        tc_proto_str r, msg;
        for (uint32_t i = 0; i < steps->via.array.size; i++)
            if (!refused_step(&steps->via.array.ptr[i], &s, &a, &r, &msg))
                FAIL(TC_PROTO_ERR_FIELDS, "batch_refusal step %u without step_id, attempt >= 1, reason and message", i);
        out->steps = steps;
        return TC_PROTO_OK;
    }
    FAIL(TC_PROTO_ERR_TYPE, "a message of unknown type %.*s", (int)(type.len > 40 ? 40 : type.len), type.ptr);
}

int tc_proto_pack_object(msgpack_sbuffer *sbuf, const msgpack_object *obj)
{
    msgpack_packer pk;
    msgpack_packer_init(&pk, sbuf, msgpack_sbuffer_write);
    if (!obj) return msgpack_pack_nil(&pk);
    return msgpack_pack_object(&pk, *obj);
}
