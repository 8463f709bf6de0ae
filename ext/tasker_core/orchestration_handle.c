/*
 * orchestration_handle.c: the orchestrator's side of wire protocol v1 in
 * plain C (see orchestration_handle.h). Owns the worker table and the
 * credit and in-flight accounting that decide which worker a batch goes
 * to; reads heartbeats, goodbyes, subscriptions and results off the two
 * sockets. Never raises, never touches Ruby.
 */
#include "orchestration_handle.h"

#include "codec.h"
#include "protocol.h"

#include <msgpack.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static const char *const bad_names[TC_OH_BAD_COUNT] = {
    "malformed_frame", "undecodable_body", "wrong_protocol_version", "unknown_type",
    "invalid_fields",  "unknown_worker",   "duplicate_result", "too_large",
    "topic_mismatch",  "not_dispatched",
};

const char *tc_oh_bad_reason_name(tc_oh_bad_reason r)
{
    return (r >= 0 && r < TC_OH_BAD_COUNT) ? bad_names[r] : "unknown";
}

int64_t tc_oh_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static double wall_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

void tc_oh_count_bad(tc_oh *h, tc_oh_bad_reason r, const char *fmt, ...)
{
    va_list ap;
    h->stats.bad[r]++;
    va_start(ap, fmt);
    vsnprintf(h->bad_detail[r], sizeof(h->bad_detail[r]), fmt, ap);
    va_end(ap);
}

static int valid_worker_id(const char *p, size_t n)
{
    if (n == 0 || n > TC_OH_WORKER_ID_MAX) return 0;
    for (size_t i = 0; i < n; i++) {
        char c = p[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' ||
              c == '-'))
            return 0;
    }
    return 1;
}

/* ---- in-flight table ------------------------------------------------ */

static uint64_t slot_hash(int64_t step_id, int64_t attempt)
{
    uint64_t x = (uint64_t)step_id * 0x9E3779B97F4A7C15ull ^ (uint64_t)attempt * 0xC2B2AE3D27D4EB4Full;
    x ^= x >> 29;
    return x;
}

static tc_oh_slot *slot_find(const tc_oh_worker *w, int64_t step_id, int64_t attempt)
{
    if (w->nslots == 0) return NULL;
    size_t mask = w->nslots - 1;
    for (size_t i = slot_hash(step_id, attempt) & mask, probes = 0; probes < w->nslots;
         i = (i + 1) & mask, probes++) {
        tc_oh_slot *s = &w->slots[i];
        if (s->state == 0) return NULL;
        if (s->state == 1 && s->e.step_id == step_id && s->e.attempt == attempt) return s;
    }
    return NULL;
}

static void slot_put_fresh(tc_oh_slot *slots, size_t nslots, const tc_oh_inflight *e)
{
    size_t mask = nslots - 1;
    size_t i = slot_hash(e->step_id, e->attempt) & mask;
    while (slots[i].state == 1) i = (i + 1) & mask;
    slots[i].e = *e;
    slots[i].state = 1;
}

/* Makes room for n more entries without any further allocation, so that
 * recording a batch after a successful send cannot fail. */
static int inflight_reserve(tc_oh_worker *w, size_t n)
{
    size_t need = w->used + w->tombstones + n;
    if (w->used + n > TC_OH_MAX_IN_FLIGHT) return -1;
    if (w->nslots && need * 4 < w->nslots * 3) return 0;
    size_t ns = w->nslots ? w->nslots : 16;
    while ((w->used + n) * 2 >= ns) ns *= 2;
    tc_oh_slot *slots = calloc(ns, sizeof(*slots));
    if (!slots) return -1;
    for (size_t i = 0; i < w->nslots; i++)
        if (w->slots[i].state == 1) slot_put_fresh(slots, ns, &w->slots[i].e);
    free(w->slots);
    w->slots = slots;
    w->nslots = ns;
    w->tombstones = 0;
    return 0;
}

/* Only after inflight_reserve. A step already in flight with the same
 * attempt is replaced, so in_flight stays the number of distinct steps. */
static void inflight_put(tc_oh_worker *w, const tc_oh_inflight *e)
{
    tc_oh_slot *s = slot_find(w, e->step_id, e->attempt);
    if (s) {
        s->e = *e;
        return;
    }
    size_t mask = w->nslots - 1;
    size_t i = slot_hash(e->step_id, e->attempt) & mask;
    while (w->slots[i].state == 1) i = (i + 1) & mask;
    if (w->slots[i].state == 2) w->tombstones--;
    w->slots[i].e = *e;
    w->slots[i].state = 1;
    w->used++;
}

static void inflight_remove(tc_oh_worker *w, tc_oh_slot *s)
{
    s->state = 2;
    w->used--;
    w->tombstones++;
}

static void inflight_clear(tc_oh_worker *w)
{
    free(w->slots);
    w->slots = NULL;
    w->nslots = w->used = w->tombstones = 0;
}

void tc_oh_worker_each_in_flight(const tc_oh_worker *w, void (*fn)(const tc_oh_inflight *, void *),
                                 void *arg)
{
    for (size_t i = 0; i < w->nslots; i++)
        if (w->slots[i].state == 1) fn(&w->slots[i].e, arg);
}

/* ---- events ----------------------------------------------------------- */

static tc_oh_event *event_push(tc_oh *h)
{
    if (h->ev_head > 0 && h->ev_head + h->ev_count == h->ev_cap) {
        memmove(h->events, h->events + h->ev_head, h->ev_count * sizeof(*h->events));
        h->ev_head = 0;
    }
    if (h->ev_head + h->ev_count == h->ev_cap) {
        size_t nc = h->ev_cap ? h->ev_cap * 2 : 64;
        tc_oh_event *ev = realloc(h->events, nc * sizeof(*ev));
        if (!ev) return NULL;
        h->events = ev;
        h->ev_cap = nc;
    }
    tc_oh_event *e = &h->events[h->ev_head + h->ev_count];
    memset(e, 0, sizeof(*e));
    return e; /* committed by the caller with h->ev_count++ */
}

static void event_free(tc_oh_event *e)
{
    free(e->body);
    free(e->in_flight);
    memset(e, 0, sizeof(*e));
}

tc_oh_event *tc_oh_event_peek(tc_oh *h)
{
    return h->ev_count ? &h->events[h->ev_head] : NULL;
}

void tc_oh_event_pop(tc_oh *h)
{
    if (!h->ev_count) return;
    event_free(&h->events[h->ev_head]);
    h->ev_head++;
    h->ev_count--;
    if (h->ev_count == 0) h->ev_head = 0;
}

/* ---- worker table ------------------------------------------------------ */

int tc_oh_worker_live(const tc_oh_worker *w)
{
    return w->subscribed && w->heartbeated;
}

int tc_oh_worker_sendable(const tc_oh *h, const tc_oh_worker *w, int64_t now_mono_ms)
{
    (void)h;
    return tc_oh_worker_live(w) && !w->not_reading && w->capacity > 0 && now_mono_ms >= w->backoff_until_mono_ms;
}

static tc_oh_worker *worker_find(tc_oh *h, const char *id, size_t n)
{
    for (size_t i = 0; i < h->nworkers; i++)
        if (strlen(h->workers[i].id) == n && memcmp(h->workers[i].id, id, n) == 0) return &h->workers[i];
    return NULL;
}

static tc_oh_worker *worker_find_or_add(tc_oh *h, const char *id, size_t n)
{
    tc_oh_worker *w = worker_find(h, id, n);
    if (w) return w;
    if (h->nworkers >= TC_OH_MAX_WORKERS) {
        h->stats.worker_table_full++;
        return NULL;
    }
    if (h->nworkers == h->workers_cap) {
        size_t nc = h->workers_cap ? h->workers_cap * 2 : 8;
        tc_oh_worker *ws = realloc(h->workers, nc * sizeof(*ws));
        if (!ws) return NULL;
        h->workers = ws;
        h->workers_cap = nc;
    }
    w = &h->workers[h->nworkers++];
    memset(w, 0, sizeof(*w));
    memcpy(w->id, id, n);
    w->id[n] = '\0';
    return w;
}

static void worker_remove(tc_oh *h, tc_oh_worker *w)
{
    inflight_clear(w);
    size_t i = (size_t)(w - h->workers);
    memmove(&h->workers[i], &h->workers[i + 1], (h->nworkers - i - 1) * sizeof(*w));
    h->nworkers--;
}

static void copy_in_flight(const tc_oh_inflight *e, void *arg)
{
    tc_oh_event *ev = arg;
    ev->in_flight[ev->n_in_flight++] = *e;
}

/* Reports a live worker as lost with what it had in flight, and forgets
 * that in-flight set: those steps are the caller's to re-dispatch. */
static void worker_lose(tc_oh *h, tc_oh_worker *w, const char *reason)
{
    if (!tc_oh_worker_live(w)) {
        inflight_clear(w);
        return;
    }
    h->stats.workers_lost++;
    tc_oh_event *ev = event_push(h);
    if (ev) {
        ev->kind = TC_OH_EV_LOST;
        snprintf(ev->worker_id, sizeof(ev->worker_id), "%s", w->id);
        snprintf(ev->reason, sizeof(ev->reason), "%s", reason);
        if (w->used) ev->in_flight = malloc(w->used * sizeof(*ev->in_flight));
        if (ev->in_flight || !w->used) {
            tc_oh_worker_each_in_flight(w, copy_in_flight, ev);
            h->ev_count++;
        }
    }
    inflight_clear(w);
    w->heartbeated = 0;
}

void tc_oh_expire(tc_oh *h)
{
    if (h->heartbeat_timeout_ms <= 0) return;
    int64_t now = tc_oh_now_ms();
    for (size_t i = 0; i < h->nworkers;) {
        tc_oh_worker *w = &h->workers[i];
        if (w->heartbeated && now - w->last_heartbeat_mono_ms >= h->heartbeat_timeout_ms) {
            worker_lose(h, w, "heartbeat_timeout");
            /* A silent worker that never subscribed is just noise; one that
             * is still subscribed may come back with its next heartbeat. */
            if (!w->subscribed) {
                worker_remove(h, w);
                continue;
            }
        }
        i++;
    }
}

long tc_oh_next_expiry_ms(const tc_oh *h)
{
    if (h->heartbeat_timeout_ms <= 0) return -1;
    int64_t now = tc_oh_now_ms(), best = -1;
    for (size_t i = 0; i < h->nworkers; i++) {
        const tc_oh_worker *w = &h->workers[i];
        if (!w->heartbeated) continue;
        int64_t left = w->last_heartbeat_mono_ms + h->heartbeat_timeout_ms - now;
        if (left < 0) left = 0;
        if (best < 0 || left < best) best = left;
    }
    return (long)best;
}

long tc_oh_choose_worker(const tc_oh *h, size_t nsteps)
{
    long best = -1;
    int64_t best_free = 0;
    for (size_t i = 0; i < h->nworkers; i++) {
        const tc_oh_worker *w = &h->workers[i];
        if (!tc_oh_worker_live(w) || w->capacity <= 0) continue;
        int64_t free_ = w->capacity - (int64_t)w->used;
        int fits = free_ >= (int64_t)nsteps || ((int64_t)nsteps > w->capacity && w->used == 0);
        if (!fits) continue;
        if (best < 0 || free_ > best_free ||
            (free_ == best_free && w->last_dispatch_seq < h->workers[best].last_dispatch_seq)) {
            best = (long)i;
            best_free = free_;
        }
    }
    return best;
}

/* ---- open / close ------------------------------------------------------ */

int tc_oh_forked(const tc_oh *h)
{
    return tc_socket_forked(&h->batch) || tc_socket_forked(&h->result);
}

int tc_oh_open(tc_oh *h, const tc_oh_config *cfg, char *err, size_t errlen)
{
    h->send_hwm = cfg->send_hwm;
    h->recv_hwm = cfg->recv_hwm;
    h->linger_ms = cfg->linger_ms;
    h->heartbeat_timeout_ms = cfg->heartbeat_timeout_ms;
    h->max_message_bytes = cfg->max_message_bytes;
    h->max_result_bytes = cfg->max_result_bytes;
    h->max_payload_depth = cfg->max_payload_depth > 0 ? cfg->max_payload_depth : TC_OH_DEFAULT_MAX_PAYLOAD_DEPTH;
    h->curve = cfg->curve != NULL;
    if (cfg->curve) snprintf(h->zap_domain, sizeof(h->zap_domain), "%s", cfg->curve->domain);
    /* Batch ids must not repeat across handles or restarts either: a late
     * result for an old batch must not look like one for a new batch. */
    snprintf(h->batch_id_prefix, sizeof(h->batch_id_prefix), "%lx-%lx-%lx", (unsigned long)getpid(),
             (unsigned long)(wall_s() * 1000.0), (unsigned long)((uintptr_t)h >> 4) & 0xffffff);

    if (tc_socket_open(&h->batch, ZMQ_XPUB, err, errlen) < 0) goto fail;
    /* Both sockets are CURVE servers (before bind): a peer whose key is not
     * on the domain's allow-list never completes a handshake, so it can
     * neither subscribe to batches nor send results. */
    if (cfg->curve && tc_curve_apply_server(&h->batch, cfg->curve, err, errlen) < 0) goto fail;
    /* The batch XPUB receives only subscriptions; keep them small too. */
    if (cfg->max_message_bytes > 0 &&
        tc_socket_set_bytes(&h->batch, ZMQ_MAXMSGSIZE, &(int64_t){cfg->max_message_bytes}, sizeof(int64_t), err,
                            errlen) < 0)
        goto fail;
    /* NODROP: a full pipe refuses the send (we count and report it) instead
     * of losing the batch silently. VERBOSE: every subscription reaches us,
     * so a worker that reconnects is seen again. */
    if (tc_socket_set_int(&h->batch, ZMQ_SNDHWM, cfg->send_hwm, err, errlen) < 0 ||
        tc_socket_set_int(&h->batch, ZMQ_LINGER, cfg->linger_ms, err, errlen) < 0 ||
        tc_socket_set_int(&h->batch, ZMQ_XPUB_NODROP, 1, err, errlen) < 0 ||
        tc_socket_set_int(&h->batch, ZMQ_XPUB_VERBOSE, 1, err, errlen) < 0 ||
        tc_socket_bind(&h->batch, cfg->batch_endpoint, err, errlen) < 0 ||
        tc_socket_last_endpoint(&h->batch, h->batch_endpoint, sizeof(h->batch_endpoint)) < 0)
        goto fail;

    if (tc_socket_open(&h->result, ZMQ_SUB, err, errlen) < 0) goto fail;
    if (cfg->curve && tc_curve_apply_server(&h->result, cfg->curve, err, errlen) < 0) goto fail;
    /* A frame over the limit makes libzmq drop that peer's connection (it
     * reconnects); nothing of it is buffered or reaches the parser. */
    if (cfg->max_message_bytes > 0 &&
        tc_socket_set_bytes(&h->result, ZMQ_MAXMSGSIZE, &(int64_t){cfg->max_message_bytes}, sizeof(int64_t), err,
                            errlen) < 0)
        goto fail;
    if (tc_socket_set_int(&h->result, ZMQ_RCVHWM, cfg->recv_hwm, err, errlen) < 0 ||
        tc_socket_set_int(&h->result, ZMQ_LINGER, cfg->linger_ms, err, errlen) < 0 ||
        tc_socket_set_bytes(&h->result, ZMQ_SUBSCRIBE, "", 0, err, errlen) < 0 ||
        tc_socket_bind(&h->result, cfg->result_endpoint, err, errlen) < 0 ||
        tc_socket_last_endpoint(&h->result, h->result_endpoint, sizeof(h->result_endpoint)) < 0)
        goto fail;

    h->open = 1;
    return 0;
fail: {
    int e = errno;
    tc_socket_close(&h->batch);
    tc_socket_close(&h->result);
    errno = e;
    return -1;
}
}

void tc_oh_close(tc_oh *h)
{
    if (h->curve && !tc_oh_forked(h)) tc_zap_forget(h->zap_domain);
    tc_socket_close(&h->batch);
    tc_socket_close(&h->result);
    for (size_t i = 0; i < h->nworkers; i++) inflight_clear(&h->workers[i]);
    free(h->workers);
    h->workers = NULL;
    h->nworkers = h->workers_cap = 0;
    while (h->ev_count) tc_oh_event_pop(h);
    free(h->events);
    h->events = NULL;
    h->ev_cap = h->ev_head = 0;
    h->open = 0;
}

/* ---- sending ----------------------------------------------------------- */

void tc_oh_next_batch_id(tc_oh *h, char *buf, size_t len)
{
    snprintf(buf, len, "%s-%llu", h->batch_id_prefix, (unsigned long long)++h->batch_seq);
}

int tc_oh_send_batch(tc_oh *h, size_t worker_index, const char *batch_id, const tc_oh_step *steps,
                     size_t nsteps, const void *body, size_t len)
{
    if (!h->open || worker_index >= h->nworkers || strlen(batch_id) > TC_OH_BATCH_ID_MAX) {
        errno = EINVAL;
        return -1;
    }
    tc_oh_worker *w = &h->workers[worker_index];
    if (inflight_reserve(w, nsteps) < 0) {
        errno = ENOMEM;
        return -1;
    }
    char topic[TC_OH_WORKER_ID_MAX + 8];
    int tlen = snprintf(topic, sizeof(topic), "batch.%s.", w->id);
    const void *bufs[2] = {topic, body};
    size_t lens[2] = {(size_t)tlen, len};
    if (tc_socket_send_parts(&h->batch, bufs, lens, 2) < 0) {
        if (errno == EAGAIN) h->stats.send_refused++;
        return -1;
    }
    for (size_t i = 0; i < nsteps; i++) {
        tc_oh_inflight e = {.step_id = steps[i].step_id, .task_id = steps[i].task_id,
                            .attempt = steps[i].attempt};
        snprintf(e.batch_id, sizeof(e.batch_id), "%s", batch_id);
        inflight_put(w, &e);
    }
    w->last_dispatch_seq = ++h->dispatch_seq;
    h->stats.batches_published++;
    h->stats.steps_published += nsteps;
    return 0;
}

/* ---- receiving --------------------------------------------------------- */

static int get_int(const msgpack_object *map, const char *key, int64_t *out)
{
    const msgpack_object *v = tc_proto_map_get(map, key);
    if (!v) return 0;
    if (v->type == MSGPACK_OBJECT_POSITIVE_INTEGER) {
        if (v->via.u64 > INT64_MAX) return 0;
        *out = (int64_t)v->via.u64;
        return 1;
    }
    if (v->type == MSGPACK_OBJECT_NEGATIVE_INTEGER) {
        *out = v->via.i64;
        return 1;
    }
    return 0;
}

static int get_str(const msgpack_object *map, const char *key, const char **p, size_t *n)
{
    const msgpack_object *v = tc_proto_map_get(map, key);
    /* Ruby packs binary-encoded Strings (Socket.gethostname, for one) as
     * bin: accept either for text fields. */
    if (v && v->type == MSGPACK_OBJECT_STR) {
        *p = v->via.str.ptr;
        *n = v->via.str.size;
        return 1;
    }
    if (v && v->type == MSGPACK_OBJECT_BIN) {
        *p = v->via.bin.ptr;
        *n = v->via.bin.size;
        return 1;
    }
    return 0;
}

static int str_is(const char *p, size_t n, const char *lit)
{
    return strlen(lit) == n && memcmp(p, lit, n) == 0;
}

static void queue_result(tc_oh *h, const void *body, size_t len, int duplicate)
{
    tc_oh_event *ev = event_push(h);
    if (!ev) return;
    ev->body = malloc(len ? len : 1);
    if (!ev->body) return;
    memcpy(ev->body, body, len);
    ev->len = len;
    ev->kind = TC_OH_EV_RESULT;
    ev->duplicate = duplicate;
    h->ev_count++;
}

static tc_oh_worker *live_sender(tc_oh *h, const char *wid, size_t wn, const char *type)
{
    tc_oh_worker *w = worker_find(h, wid, wn);
    if (!w || !tc_oh_worker_live(w)) {
        tc_oh_count_bad(h, TC_OH_BAD_UNKNOWN_WORKER, "%s from worker %.*s, which is not live", type,
                        (int)(wn > 64 ? 64 : wn), wid);
        return NULL;
    }
    return w;
}

static void release_batch(const tc_oh_inflight *e, void *arg);

struct release_ctx {
    tc_oh_worker *w;
    const char *bid;
    size_t bn;
    size_t released;
};

static void handle_result_message(tc_oh *h, const void *body, size_t len)
{
    msgpack_unpacked u;
    size_t off = 0;
    msgpack_unpacked_init(&u);
    /* Refuse made-up container counts before msgpack-c sizes its zone from them. */
    int rc = tc_codec_check(body, len, NULL, 0) == 0 ? msgpack_unpack_next(&u, body, len, &off) : MSGPACK_UNPACK_PARSE_ERROR;
    if (rc != MSGPACK_UNPACK_SUCCESS || off != len || u.data.type != MSGPACK_OBJECT_MAP) {
        tc_oh_count_bad(h, TC_OH_BAD_UNDECODABLE, "a %zu-byte body that is not one msgpack map", len);
        goto done;
    }
    const msgpack_object *m = &u.data;
    int64_t version;
    if (!get_int(m, "protocol_version", &version) || version != TC_OH_PROTOCOL_VERSION) {
        tc_oh_count_bad(h, TC_OH_BAD_PROTOCOL_VERSION, "a message without protocol_version %d",
                        TC_OH_PROTOCOL_VERSION);
        goto done;
    }
    const char *type;
    size_t tn;
    if (!get_str(m, "type", &type, &tn)) {
        tc_oh_count_bad(h, TC_OH_BAD_UNKNOWN_TYPE, "a message without a type");
        goto done;
    }
    const char *wid = NULL;
    size_t wn = 0;
    int has_wid = get_str(m, "worker_id", &wid, &wn) && valid_worker_id(wid, wn);

    if (str_is(type, tn, "heartbeat")) {
        int64_t capacity, pid = 0;
        if (!has_wid || !get_int(m, "capacity", &capacity) || capacity < 0) {
            tc_oh_count_bad(h, TC_OH_BAD_INVALID_FIELDS, "a heartbeat without a valid worker_id and capacity");
            goto done;
        }
        h->stats.heartbeats++;
        tc_oh_worker *w = worker_find_or_add(h, wid, wn);
        if (!w) goto done;
        get_int(m, "pid", &pid);
        const char *host;
        size_t hn;
        if (get_str(m, "host", &host, &hn))
            snprintf(w->host, sizeof(w->host), "%.*s", (int)(hn > TC_OH_HOST_MAX ? TC_OH_HOST_MAX : hn), host);
        w->pid = pid;
        w->capacity = capacity;
        tc_proto_conn conn;
        tc_proto_parse_connection(m, &conn);
        w->connects = conn.connects;
        w->disconnects = conn.disconnects;
        /* Kept only when it looks like an event name ([a-z0-9_], short): it
         * goes into a text column as is. */
        size_t en = conn.last_event.ptr && conn.last_event.len <= TC_OH_CONN_EVENT_MAX ? conn.last_event.len : 0;
        for (size_t k = 0; k < en; k++) {
            char ch = conn.last_event.ptr[k];
            if (!((ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9') || ch == '_')) en = 0;
        }
        if (en) memcpy(w->last_connection_event, conn.last_event.ptr, en);
        w->last_connection_event[en] = '\0';
        w->last_connection_event_at = conn.last_event_at;
        w->heartbeated = 1;
        w->last_heartbeat_at = wall_s();
        w->last_heartbeat_mono_ms = tc_oh_now_ms();
    } else if (str_is(type, tn, "goodbye")) {
        if (!has_wid) {
            tc_oh_count_bad(h, TC_OH_BAD_INVALID_FIELDS, "a goodbye without a valid worker_id");
            goto done;
        }
        h->stats.goodbyes++;
        tc_oh_worker *w = worker_find(h, wid, wn);
        if (w) {
            worker_lose(h, w, "goodbye");
            if (!w->subscribed) worker_remove(h, w);
        }
    } else if (str_is(type, tn, "partial_result")) {
        int64_t step_id, attempt;
        if (!has_wid || !get_int(m, "step_id", &step_id) || !get_int(m, "attempt", &attempt)) {
            tc_oh_count_bad(h, TC_OH_BAD_INVALID_FIELDS,
                            "a partial_result without a valid worker_id, step_id and attempt");
            goto done;
        }
        h->stats.partial_results++;
        tc_oh_worker *w = live_sender(h, wid, wn, "partial_result");
        tc_oh_slot *s = w ? slot_find(w, step_id, attempt) : NULL;
        if (w && !s)
            tc_oh_count_bad(h, TC_OH_BAD_DUPLICATE, "partial_result for step %lld attempt %lld, not in flight on %s",
                            (long long)step_id, (long long)attempt, w->id);
        if (s) inflight_remove(w, s);
        /* Late and duplicate results still go to the caller: the durable
         * layer applies them idempotently and may still want the output. */
        queue_result(h, body, len, s == NULL);
    } else if (str_is(type, tn, "batch_completion")) {
        const char *bid;
        size_t bn;
        if (!has_wid || !get_str(m, "batch_id", &bid, &bn)) {
            tc_oh_count_bad(h, TC_OH_BAD_INVALID_FIELDS, "a batch_completion without a valid worker_id and batch_id");
            goto done;
        }
        h->stats.batch_completions++;
        tc_oh_worker *w = live_sender(h, wid, wn, "batch_completion");
        if (w && w->used) {
            /* The completion follows the batch's last partial on the same
             * connection, so steps of this batch still in flight lost their
             * partial (dropped at a full pipe): free their credit, or the
             * worker would look busy forever. */
            struct release_ctx rc2 = {w, bid, bn, 0};
            tc_oh_worker_each_in_flight(w, release_batch, &rc2);
            h->stats.steps_released_by_completion += rc2.released;
        }
        queue_result(h, body, len, 0);
    } else {
        tc_oh_count_bad(h, TC_OH_BAD_UNKNOWN_TYPE, "a message of unknown type %.*s", (int)(tn > 40 ? 40 : tn), type);
    }
done:
    msgpack_unpacked_destroy(&u);
}

static void release_batch(const tc_oh_inflight *e, void *arg)
{
    struct release_ctx *c = arg;
    if (strlen(e->batch_id) == c->bn && memcmp(e->batch_id, c->bid, c->bn) == 0) {
        /* Safe during the walk: removal only marks the slot deleted. */
        inflight_remove(c->w, (tc_oh_slot *)e);
        c->released++;
    }
}

static void handle_subscription(tc_oh *h, const unsigned char *p, size_t n)
{
    static const char prefix[] = "batch.";
    const size_t pl = sizeof(prefix) - 1;
    if (n < 1 || (p[0] != 0 && p[0] != 1)) return;
    const char *topic = (const char *)p + 1;
    size_t tn = n - 1;
    /* Only "batch.<id>." names a worker; anything else (a catch-all ""
     * from a debugging tool, say) is not ours to track. */
    if (tn < pl + 2 || memcmp(topic, prefix, pl) != 0 || topic[tn - 1] != '.') return;
    const char *id = topic + pl;
    size_t idn = tn - pl - 1;
    if (!valid_worker_id(id, idn)) return;
    if (p[0] == 1) {
        h->stats.subscriptions++;
        tc_oh_worker *w = worker_find_or_add(h, id, idn);
        if (w) w->subscribed = 1;
    } else {
        h->stats.unsubscriptions++;
        tc_oh_worker *w = worker_find(h, id, idn);
        if (w) {
            /* libzmq sends this when the worker unsubscribes or its
             * connection drops (a crash or kill -9 included). */
            worker_lose(h, w, "unsubscribed");
            worker_remove(h, w);
        }
    }
}

int tc_oh_poll(tc_oh *h)
{
    zmq_msg_t frames[4];
    int total = 0;
    if (!h->open) {
        errno = EBADF;
        return -1;
    }
    /* Subscriptions first: a worker's subscription and first heartbeat
     * race, and either order must make it live. */
    for (int i = 0; i < TC_OH_DRAIN_MAX; i++) {
        int n = tc_socket_recv_parts(&h->batch, frames, 4);
        if (n == 0) break;
        if (n < 0) {
            if (errno == EMSGSIZE) continue;
            return -1;
        }
        total++;
        handle_subscription(h, zmq_msg_data(&frames[0]), zmq_msg_size(&frames[0]));
        for (int f = 0; f < n; f++) zmq_msg_close(&frames[f]);
    }
    for (int i = 0; i < TC_OH_DRAIN_MAX; i++) {
        int n = tc_socket_recv_parts(&h->result, frames, 4);
        if (n == 0) break;
        if (n < 0) {
            if (errno == EMSGSIZE) {
                total++;
                tc_oh_count_bad(h, TC_OH_BAD_MALFORMED_FRAME, "a message of more than 4 frames");
                continue;
            }
            return -1;
        }
        total++;
        if (n != 2)
            tc_oh_count_bad(h, TC_OH_BAD_MALFORMED_FRAME, "a message of %d frames, not [topic, body]", n);
        else if (h->max_result_bytes && zmq_msg_size(&frames[1]) > h->max_result_bytes)
            tc_oh_count_bad(h, TC_OH_BAD_TOO_LARGE, "a %zu-byte body, over max_result_bytes (%zu)",
                            zmq_msg_size(&frames[1]), h->max_result_bytes);
        else
            handle_result_message(h, zmq_msg_data(&frames[1]), zmq_msg_size(&frames[1]));
        for (int f = 0; f < n; f++) zmq_msg_close(&frames[f]);
    }
    tc_oh_expire(h);
    return total;
}
