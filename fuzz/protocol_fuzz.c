/*
 * protocol_fuzz.c: libFuzzer harness for the result-channel message parser
 * of the native loop (ext/tasker_core/protocol.c): parse, then re-encode
 * the pieces the loop splices into its SQL parameters (output, error),
 * check that their located bytes decode to exactly those objects, and
 * walk the batch_completion steps, as the loop does; walk what the handle
 * reads of a heartbeat (limits, in_flight_steps, queues) and a batch_refusal.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "protocol.h"

/* The bytes the loop stores for obj are one msgpack value, the same as
 * obj: both re-packed give the same bytes (msgpack_object_equal would
 * call a NaN unequal to itself). */
static void same_value(const tc_proto_str *bytes, const msgpack_object *obj)
{
    if (!obj) {
        if (bytes->ptr) abort();
        return;
    }
    if (!bytes->ptr || bytes->len == 0) abort();
    msgpack_unpacked v;
    size_t off = 0;
    msgpack_unpacked_init(&v);
    if (msgpack_unpack_next(&v, bytes->ptr, bytes->len, &off) != MSGPACK_UNPACK_SUCCESS || off != bytes->len) abort();
    msgpack_sbuffer a, b;
    msgpack_sbuffer_init(&a);
    msgpack_sbuffer_init(&b);
    if (tc_proto_pack_object(&a, &v.data) != 0 || tc_proto_pack_object(&b, obj) != 0 || a.size != b.size ||
        memcmp(a.data, b.data, a.size) != 0)
        abort();
    msgpack_sbuffer_destroy(&a);
    msgpack_sbuffer_destroy(&b);
    msgpack_unpacked_destroy(&v);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *buf = malloc(size ? size : 1);
    memcpy(buf, data, size);
    msgpack_unpacked u;
    msgpack_unpacked_init(&u);
    tc_proto_msg m;
    char detail[160];
    memset(&m, 0, sizeof(m));
    detail[0] = '\0';
    tc_proto_err e = tc_proto_parse(&u, buf, size, &m, detail, sizeof(detail));
    if (e == TC_PROTO_OK) {
        volatile size_t sink = 0;
        for (size_t i = 0; i < m.worker_id.len; i++) sink += (unsigned char)m.worker_id.ptr[i];
        for (size_t i = 0; i < m.batch_id.len; i++) sink += (unsigned char)m.batch_id.ptr[i];
        msgpack_sbuffer sb;
        msgpack_sbuffer_init(&sb);
        if (m.type == TC_PROTO_PARTIAL_RESULT) {
            if (tc_proto_pack_object(&sb, m.output) != 0) abort();
            if (tc_proto_pack_object(&sb, m.error) != 0) abort();
            same_value(&m.output_bytes, m.output);
            same_value(&m.error_bytes, m.error);
        }
        if (m.type == TC_PROTO_PARTIAL_RESULTS) {
            /* each entry as the handle reads it: a partial_result whose
             * pairs lie inside the body and whose output and error bytes
             * lie inside its pairs */
            const char *cursor = NULL;
            if (!m.results || m.results->type != MSGPACK_OBJECT_ARRAY) abort();
            for (size_t i = 0; i < m.results->via.array.size; i++) {
                tc_proto_msg r;
                tc_proto_str pairs;
                uint32_t np = 0;
                tc_proto_err re = tc_proto_next_result(&m, i, &cursor, buf, size, &r, &pairs, &np, detail, sizeof(detail));
                if (re == TC_PROTO_ERR_UNDECODABLE) break;
                if (re != TC_PROTO_OK) continue;
                if (r.type != TC_PROTO_PARTIAL_RESULT || r.attempt < 1 || pairs.ptr < buf || pairs.ptr + pairs.len > buf + size)
                    abort();
                if (r.output_bytes.ptr && (r.output_bytes.ptr < pairs.ptr || r.output_bytes.ptr + r.output_bytes.len > pairs.ptr + pairs.len))
                    abort();
                if (r.error_bytes.ptr && (r.error_bytes.ptr < pairs.ptr || r.error_bytes.ptr + r.error_bytes.len > pairs.ptr + pairs.len))
                    abort();
                same_value(&r.output_bytes, r.output);
                same_value(&r.error_bytes, r.error);
            }
        }
        if (m.type == TC_PROTO_BATCH_COMPLETION && m.steps) {
            if (m.steps->type != MSGPACK_OBJECT_ARRAY) abort();
            if (tc_proto_pack_object(&sb, m.steps) != 0) abort();
        }
        if (m.type == TC_PROTO_HEARTBEAT) {
            if (m.limits.max_batch_steps < 0 || m.limits.max_message_bytes < 0 || m.limits.max_payload_depth < 0) abort();
            if (m.reconcile) {
                if (!m.in_flight_steps || m.in_flight_steps->type != MSGPACK_OBJECT_ARRAY) abort();
                for (size_t i = 0; i < m.in_flight_steps->via.array.size; i++) {
                    int64_t s = 0, a = 0;
                    tc_proto_in_flight_step(&m, i, &s, &a);
                    if (a < 1) abort();
                    sink += (size_t)s;
                }
                for (size_t i = 0; i < m.last_batch_id.len; i++) sink += (unsigned char)m.last_batch_id.ptr[i];
            }
            if (m.queues) {
                if (m.queues->type != MSGPACK_OBJECT_ARRAY || m.queues->via.array.size < 1 ||
                    m.queues->via.array.size > TC_PROTO_MAX_QUEUES)
                    abort();
                for (size_t i = 0; i < m.queues->via.array.size; i++) {
                    tc_proto_str q = tc_proto_queue(&m, i);
                    if (!q.ptr || !tc_proto_queue_name_ok(q.ptr, q.len)) abort();
                    sink += q.len;
                }
            }
        }
        if (m.type == TC_PROTO_BATCH_REFUSAL) {
            if (!m.steps || m.steps->type != MSGPACK_OBJECT_ARRAY) abort();
            for (size_t i = 0; i < m.reason.len; i++) sink += (unsigned char)m.reason.ptr[i];
            for (size_t i = 0; i < m.message.len; i++) sink += (unsigned char)m.message.ptr[i];
            for (size_t i = 0; i < m.steps->via.array.size; i++) {
                int64_t s = 0, a = 0;
                tc_proto_str r = {0}, msg = {0};
                tc_proto_refused_step(&m, i, &s, &a, &r, &msg);
                if (a < 1 || !r.ptr || !msg.ptr) abort();
                sink += r.len + msg.len;
            }
        }
        sink += sb.size;
        (void)sink;
        msgpack_sbuffer_destroy(&sb);
    } else if (e <= TC_PROTO_OK || e >= TC_PROTO_ERR_COUNT || strnlen(detail, sizeof(detail)) == sizeof(detail)) {
        abort();
    }
    msgpack_unpacked_destroy(&u);
    free(buf);
    return 0;
}
