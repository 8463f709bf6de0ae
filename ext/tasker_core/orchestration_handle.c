/*
 * orchestration_handle.c: the orchestrator's side of the wire protocol
 * (versions 1 and 2) in plain C (see orchestration_handle.h). Owns the worker table and the
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

/* An isolated step's worker takes work again once its table is empty; a
 * worker drained for a suspect waits for it. */
static void inflight_remove(tc_oh_worker *w, tc_oh_slot *s)
{
    s->state = 2;
    if (--w->used == 0 && w->isolating == TC_OH_ISOLATE_RUN) w->isolating = TC_OH_ISOLATE_NONE;
    w->tombstones++;
}

static void inflight_clear(tc_oh_worker *w)
{
    free(w->slots);
    w->slots = NULL;
    w->nslots = w->used = w->tombstones = 0;
    w->isolating = TC_OH_ISOLATE_NONE;
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

void tc_oh_set_queue_completions(tc_oh *h, int on)
{
    h->queue_completions = on;
    if (on) return;
    size_t k = h->ev_head;
    for (size_t i = h->ev_head; i < h->ev_head + h->ev_count; i++) {
        if (h->events[i].kind == TC_OH_EV_COMPLETION)
            event_free(&h->events[i]);
        else
            h->events[k++] = h->events[i];
    }
    h->ev_count = k - h->ev_head;
    if (h->ev_count == 0) h->ev_head = 0;
}

/* ---- worker table ------------------------------------------------------ */

/* A goodbye only clears heartbeated: the worker's next heartbeat, while it
 * is still subscribed, makes it live again. */
int tc_oh_worker_live(const tc_oh_worker *w)
{
    return (w->subscribed > 0 || w->leaving_until_mono_ms) && w->heartbeated && !w->not_reading;
}

int tc_oh_worker_sendable(const tc_oh *h, const tc_oh_worker *w, int64_t now_mono_ms)
{
    (void)h;
    return tc_oh_worker_live(w) && w->subscribed > 0 && !w->drained && w->capacity > 0 &&
           now_mono_ms >= w->backoff_until_mono_ms && !(w->isolating && w->used > 0);
}

int tc_oh_worker_idle(const tc_oh *h, const tc_oh_worker *w, int64_t now_mono_ms)
{
    return w->used == 0 && tc_oh_worker_sendable(h, w, now_mono_ms);
}

static void worker_default_limits(const tc_oh *h, tc_oh_worker *w)
{
    w->max_batch_steps = TC_OH_DEFAULT_MAX_BATCH_STEPS;
    w->max_message_bytes = h->max_message_bytes > 0 ? h->max_message_bytes : INT64_MAX;
    w->max_payload_depth = TC_OH_DEFAULT_MAX_PAYLOAD_DEPTH;
}

static void worker_default_queues(tc_oh_worker *w)
{
    snprintf(w->queues[0], sizeof(w->queues[0]), "default");
    w->nqueues = 1;
}

int tc_oh_worker_serves(const tc_oh_worker *w, const char *q, size_t n)
{
    for (size_t i = 0; i < w->nqueues; i++)
        if (strlen(w->queues[i]) == n && memcmp(w->queues[i], q, n) == 0) return 1;
    return 0;
}

/* FNV-1a, never 0 (0 marks an empty slot). */
static uint64_t handler_hash(const char *p, size_t n)
{
    uint64_t h = 1469598103934665603ULL;
    for (size_t i = 0; i < n; i++) h = (h ^ (unsigned char)p[i]) * 1099511628211ULL;
    return h ? h : 1;
}

int tc_oh_worker_lacks(const tc_oh_worker *w, const char *handler, size_t n)
{
    uint64_t h = handler_hash(handler, n);
    for (size_t i = 0; i < TC_OH_LACKS_MAX && i < w->nlacks; i++)
        if (w->lacks[i] == h) return 1;
    return 0;
}

void tc_oh_worker_note_lacks(tc_oh_worker *w, const char *handler, size_t n)
{
    if (tc_oh_worker_lacks(w, handler, n)) return;
    w->lacks[w->nlacks % TC_OH_LACKS_MAX] = handler_hash(handler, n);
    w->nlacks++;
}

static void backoff_reset(tc_oh_worker *w)
{
    w->backoff_ms = w->backoff_until_mono_ms = w->refused_since_mono_ms = 0;
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
    worker_default_limits(h, w);
    worker_default_queues(w);
    return w;
}

tc_oh_worker *tc_oh_worker_by_id(tc_oh *h, const char *id) { return worker_find(h, id, strlen(id)); }

static void worker_remove(tc_oh *h, tc_oh_worker *w)
{
    inflight_clear(w);
    size_t i = (size_t)(w - h->workers);
    memmove(&h->workers[i], &h->workers[i + 1], (h->nworkers - i - 1) * sizeof(*w));
    h->nworkers--;
}

/* Queues a LOST or FAIL event carrying a copy of entries. Out of memory
 * the event is lost and the steps come back at their lease deadline. */
static void emit_steps(tc_oh *h, tc_oh_event_kind kind, const char *worker_id, const char *reason,
                       const tc_oh_inflight *entries, size_t n, const char *error_class, const char *message)
{
    tc_oh_event *ev = event_push(h);
    if (!ev) return;
    if (n) {
        ev->in_flight = malloc(n * sizeof(*ev->in_flight));
        if (!ev->in_flight) return;
        memcpy(ev->in_flight, entries, n * sizeof(*entries));
    }
    ev->kind = kind;
    ev->n_in_flight = n;
    snprintf(ev->worker_id, sizeof(ev->worker_id), "%s", worker_id);
    snprintf(ev->reason, sizeof(ev->reason), "%s", reason);
    if (error_class) snprintf(ev->error_class, sizeof(ev->error_class), "%s", error_class);
    if (message) snprintf(ev->message, sizeof(ev->message), "%s", message);
    h->ev_count++;
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
    tc_oh_inflight *all = w->used ? malloc(w->used * sizeof(*all)) : NULL;
    size_t k = 0;
    if (all)
        for (size_t i = 0; i < w->nslots; i++)
            if (w->slots[i].state == 1) all[k++] = w->slots[i].e;
    if (all || !w->used) emit_steps(h, TC_OH_EV_LOST, w->id, reason, all, k, NULL, NULL);
    free(all);
    inflight_clear(w);
    w->heartbeated = 0;
}

void tc_oh_expire(tc_oh *h)
{
    int64_t now = tc_oh_now_ms();
    for (size_t i = 0; i < h->nworkers;) {
        tc_oh_worker *w = &h->workers[i];
        if (w->leaving_until_mono_ms && now >= w->leaving_until_mono_ms) {
            /* Unsubscribed, and no goodbye within the grace: what it still
             * holds is lost. */
            worker_lose(h, w, "unsubscribed");
            worker_remove(h, w);
            continue;
        }
        if (h->heartbeat_timeout_ms > 0 && w->heartbeated &&
            now - w->last_heartbeat_mono_ms >= h->heartbeat_timeout_ms) {
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
    int64_t now = tc_oh_now_ms(), best = -1;
    for (size_t i = 0; i < h->nworkers; i++) {
        const tc_oh_worker *w = &h->workers[i];
        int64_t at = -1;
        if (h->heartbeat_timeout_ms > 0 && w->heartbeated) at = w->last_heartbeat_mono_ms + h->heartbeat_timeout_ms;
        if (w->leaving_until_mono_ms && (at < 0 || w->leaving_until_mono_ms < at)) at = w->leaving_until_mono_ms;
        if (at < 0) continue;
        int64_t left = at - now;
        if (left < 0) left = 0;
        if (best < 0 || left < best) best = left;
    }
    return (long)best;
}

long tc_oh_choose_worker(const tc_oh *h, size_t nsteps, const unsigned char *skip)
{
    long best = -1;
    int64_t best_free = 0, now = tc_oh_now_ms();
    for (size_t i = 0; i < h->nworkers; i++) {
        const tc_oh_worker *w = &h->workers[i];
        if ((skip && skip[i]) || !tc_oh_worker_sendable(h, w, now)) continue;
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
     * of losing the batch silently; libzmq checks only the pipes the topic
     * matches, so one worker's full pipe holds up no other worker.
     * MANUAL: libzmq installs no subscription by itself; handle_subscription
     * installs only "batch.<worker id>.", so a peer subscribed to "" or
     * "batch." receives nothing. In manual mode every (un)subscription
     * reaches recv, duplicates included (VERBOSE/VERBOSER do not apply), and
     * a closed connection yields one unsubscription per topic it asked for. */
    if (tc_socket_set_int(&h->batch, ZMQ_SNDHWM, cfg->send_hwm, err, errlen) < 0 ||
        tc_socket_set_int(&h->batch, ZMQ_LINGER, cfg->linger_ms, err, errlen) < 0 ||
        tc_socket_set_int(&h->batch, ZMQ_XPUB_NODROP, 1, err, errlen) < 0 ||
        tc_socket_set_int(&h->batch, ZMQ_XPUB_MANUAL, 1, err, errlen) < 0 ||
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

/* A send refused at the high-water mark: back off (50 ms doubling to 1 s);
 * after heartbeat_timeout_ms of nothing but refusals the worker has
 * stopped reading and is dropped until it subscribes again. */
static void note_refusal(tc_oh *h, tc_oh_worker *w)
{
    int64_t now = tc_oh_now_ms();
    if (!w->refused_since_mono_ms) w->refused_since_mono_ms = now ? now : 1;
    w->backoff_ms = w->backoff_ms ? w->backoff_ms * 2 : TC_OH_BACKOFF_MIN_MS;
    if (w->backoff_ms > TC_OH_BACKOFF_MAX_MS) w->backoff_ms = TC_OH_BACKOFF_MAX_MS;
    w->backoff_until_mono_ms = now + w->backoff_ms;
    if (w->not_reading || h->heartbeat_timeout_ms <= 0 || now - w->refused_since_mono_ms < h->heartbeat_timeout_ms)
        return;
    worker_lose(h, w, "not_reading");
    w->not_reading = 1;
    h->stats.workers_not_reading++;
    if (h->n_not_reading_log < TC_OH_NOT_READING_LOG)
        snprintf(h->not_reading_log[h->n_not_reading_log++], sizeof(h->not_reading_log[0]), "%s", w->id);
}

void tc_oh_next_batch_id(tc_oh *h, char *buf, size_t len)
{
    snprintf(buf, len, "%s-%llu", h->batch_id_prefix, (unsigned long long)++h->batch_seq);
}

int tc_oh_send_reserve(tc_oh *h, size_t worker_index, const char *batch_id, size_t nsteps)
{
    if (!h->open || worker_index >= h->nworkers || strlen(batch_id) > TC_OH_BATCH_ID_MAX) {
        errno = EINVAL;
        return -1;
    }
    if (inflight_reserve(&h->workers[worker_index], nsteps) < 0) {
        errno = ENOMEM;
        return -1;
    }
    return 0;
}

int tc_oh_send_raw(tc_oh *h, size_t worker_index, const void *body, size_t len)
{
    const tc_oh_worker *w = &h->workers[worker_index];
    char topic[TC_OH_WORKER_ID_MAX + 8];
    int tlen = snprintf(topic, sizeof(topic), "batch.%s.", w->id);
    const void *bufs[2] = {topic, body};
    size_t lens[2] = {(size_t)tlen, len};
    return tc_socket_send_parts(&h->batch, bufs, lens, 2) < 0 ? -1 : 0;
}

void tc_oh_send_record(tc_oh *h, size_t worker_index, const char *batch_id, const tc_oh_step *steps,
                       size_t nsteps, int sent, int err)
{
    tc_oh_worker *w = &h->workers[worker_index];
    if (!sent) {
        if (err == EAGAIN) {
            h->stats.send_refused++;
            note_refusal(h, w);
        }
        return;
    }
    backoff_reset(w);
    for (size_t i = 0; i < nsteps; i++) {
        tc_oh_inflight e = {.step_id = steps[i].step_id, .task_id = steps[i].task_id,
                            .attempt = steps[i].attempt};
        snprintf(e.batch_id, sizeof(e.batch_id), "%s", batch_id);
        inflight_put(w, &e);
    }
    w->last_dispatch_seq = ++h->dispatch_seq;
    h->stats.batches_published++;
    h->stats.steps_published += nsteps;
}

int tc_oh_send_batch(tc_oh *h, size_t worker_index, const char *batch_id, const tc_oh_step *steps,
                     size_t nsteps, const void *body, size_t len)
{
    if (tc_oh_send_reserve(h, worker_index, batch_id, nsteps) < 0) return -1;
    int rc = tc_oh_send_raw(h, worker_index, body, len);
    int e = errno;
    tc_oh_send_record(h, worker_index, batch_id, steps, nsteps, rc == 0, e);
    errno = e;
    return rc;
}

/* ---- the batch builder --------------------------------------------------- */

static void pack_key(msgpack_packer *pk, const char *s)
{
    size_t n = strlen(s);
    msgpack_pack_str(pk, n);
    msgpack_pack_str_body(pk, s, n);
}

/* The version worker_id speaks (its latest heartbeat's); batches carry no
 * field of a later version, so a version 1 worker reads them as before. */
static int worker_version(const tc_oh *h, const char *worker_id)
{
    for (size_t i = 0; i < h->nworkers; i++)
        if (strcmp(h->workers[i].id, worker_id) == 0)
            return h->workers[i].protocol_version >= 1 && h->workers[i].protocol_version <= TC_OH_PROTOCOL_VERSION
                       ? h->workers[i].protocol_version
                       : 1;
    return 1;
}

/* The orchestrator's limits, told to workers in every batch (docs/protocol.md 4.1). */
static void pack_limits(msgpack_packer *pk, const tc_oh *h)
{
    msgpack_pack_map(pk, 3);
    pack_key(pk, "max_result_bytes");
    msgpack_pack_uint64(pk, (uint64_t)h->max_result_bytes);
    pack_key(pk, "max_message_bytes");
    msgpack_pack_int64(pk, h->max_message_bytes > 0 ? (int64_t)h->max_message_bytes : INT64_MAX);
    pack_key(pk, "max_payload_depth");
    msgpack_pack_int64(pk, (int64_t)h->max_payload_depth);
}

int tc_oh_build_batch(tc_codec_writer *out, const tc_oh *h, const char *batch_id, const char *worker_id,
                      size_t nsteps, const tc_oh_entry *pieces, size_t npieces, const char *extra, size_t extra_len,
                      size_t nextra)
{
    msgpack_packer *pk = &out->pk;
    tc_codec_writer_reset(out);
    msgpack_pack_map(pk, 7 + nextra);
    pack_key(pk, "protocol_version");
    msgpack_pack_int(pk, worker_version(h, worker_id));
    pack_key(pk, "type");
    pack_key(pk, "batch");
    pack_key(pk, "batch_id");
    pack_key(pk, batch_id);
    pack_key(pk, "worker_id");
    pack_key(pk, worker_id);
    pack_key(pk, "sent_at");
    msgpack_pack_double(pk, wall_s());
    pack_key(pk, "limits");
    pack_limits(pk, h);
    if (nextra) pk->callback(pk->data, extra, extra_len);
    pack_key(pk, "steps");
    msgpack_pack_array(pk, nsteps);
    for (size_t i = 0; i < npieces; i++) pk->callback(pk->data, pieces[i].ptr, pieces[i].len);
    return out->failed ? -1 : 0;
}

int tc_oh_batch_key(const char *p, size_t n)
{
    static const char *const keys[] = {"protocol_version", "type", "batch_id", "worker_id", "sent_at", "limits", "steps"};
    for (size_t i = 0; i < sizeof(keys) / sizeof(keys[0]); i++)
        if (strlen(keys[i]) == n && memcmp(keys[i], p, n) == 0) return 1;
    return 0;
}

/* ---- receiving --------------------------------------------------------- */

static int str_is(const char *p, size_t n, const char *lit)
{
    return strlen(lit) == n && memcmp(p, lit, n) == 0;
}

#define CLIP(n) ((int)((n) > 64 ? 64 : (n)))

/* Queues a copy of body (the frame is closed after the poll), or body
 * itself when owned (malloc'd by the caller, freed here if not queued);
 * for a RESULT, the fields parsed from it, spans rebased onto the copy. */
static void queue_body(tc_oh *h, tc_oh_event_kind kind, const void *body, size_t len, const tc_proto_msg *m,
                       char *owned)
{
    tc_oh_event *ev = event_push(h);
    if (!ev) {
        free(owned);
        return;
    }
    ev->body = owned ? owned : malloc(len ? len : 1);
    if (!ev->body) return;
    if (!owned) memcpy(ev->body, body, len);
    ev->len = len;
    ev->kind = kind;
    if (kind == TC_OH_EV_RESULT) {
        ev->step_id = m->step_id;
        ev->task_id = m->task_id;
        ev->attempt = m->attempt;
        ev->success = m->success;
        ev->retryable = m->retryable;
        ev->retry_after_ms = m->retry_after_ms;
        if (m->output_bytes.ptr) {
            ev->output = ev->body + (m->output_bytes.ptr - (const char *)body);
            ev->output_len = m->output_bytes.len;
        }
        if (m->error_bytes.ptr) {
            ev->error = ev->body + (m->error_bytes.ptr - (const char *)body);
            ev->error_len = m->error_bytes.len;
        }
    }
    h->ev_count++;
}

static tc_oh_worker *live_sender(tc_oh *h, tc_proto_str wid, const char *type)
{
    tc_oh_worker *w = worker_find(h, wid.ptr, wid.len);
    if (!w || !tc_oh_worker_live(w)) {
        tc_oh_count_bad(h, TC_OH_BAD_UNKNOWN_WORKER, "%s from worker %.*s, which is not live", type, CLIP(wid.len),
                        wid.ptr);
        return NULL;
    }
    return w;
}

static int batch_is(const tc_oh_inflight *e, tc_proto_str bid)
{
    return bid.ptr && str_is(bid.ptr, bid.len, e->batch_id);
}

/* The seq of a batch id this handle generated ("<prefix>-<seq>"); 0 for
 * any other id. */
static int own_batch_seq(const tc_oh *h, const char *id, size_t n, uint64_t *seq)
{
    size_t pl = strlen(h->batch_id_prefix);
    if (n <= pl + 1 || n > TC_OH_BATCH_ID_MAX || memcmp(id, h->batch_id_prefix, pl) != 0 || id[pl] != '-') return 0;
    uint64_t v = 0;
    for (size_t i = pl + 1; i < n; i++) {
        if (id[i] < '0' || id[i] > '9' || v > (UINT64_MAX - 9) / 10) return 0;
        v = v * 10 + (uint64_t)(id[i] - '0');
    }
    *seq = v;
    return 1;
}

static void recent_add(tc_oh_worker *w, int64_t step_id, int64_t attempt)
{
    unsigned i = w->recent_next++ % TC_OH_RECENT;
    w->recent[i][0] = step_id;
    w->recent[i][1] = attempt;
}

static int recent_has(const tc_oh_worker *w, int64_t step_id, int64_t attempt)
{
    unsigned n = w->recent_next < TC_OH_RECENT ? w->recent_next : TC_OH_RECENT;
    for (unsigned i = 0; i < n; i++)
        if (w->recent[i][0] == step_id && w->recent[i][1] == attempt) return 1;
    return 0;
}

/* Applied only from the worker the (step, attempt) is in flight on, with
 * the batch it was sent in; anything else is counted and dropped. */
static void on_partial(tc_oh *h, const tc_proto_msg *m, const void *body, size_t len, char *owned)
{
    h->stats.partial_results++;
    tc_oh_worker *w = live_sender(h, m->worker_id, "partial_result");
    tc_oh_slot *s = w ? slot_find(w, m->step_id, m->attempt) : NULL;
    if (!s || !batch_is(&s->e, m->batch_id)) free(owned);
    if (!w) return;
    if (!s) {
        if (recent_has(w, m->step_id, m->attempt))
            tc_oh_count_bad(h, TC_OH_BAD_DUPLICATE, "a second partial_result for step %lld attempt %lld from %s",
                            (long long)m->step_id, (long long)m->attempt, w->id);
        else
            tc_oh_count_bad(h, TC_OH_BAD_NOT_DISPATCHED,
                            "partial_result for step %lld attempt %lld from %s, which it was not sent",
                            (long long)m->step_id, (long long)m->attempt, w->id);
        return;
    }
    if (!batch_is(&s->e, m->batch_id)) {
        tc_oh_count_bad(h, TC_OH_BAD_NOT_DISPATCHED,
                        "partial_result for step %lld attempt %lld from %s with batch_id %.*s; it was sent in %s",
                        (long long)m->step_id, (long long)m->attempt, w->id, CLIP(m->batch_id.len), m->batch_id.ptr,
                        s->e.batch_id);
        return;
    }
    inflight_remove(w, s);
    recent_add(w, m->step_id, m->attempt);
    queue_body(h, TC_OH_EV_RESULT, body, len, m, owned);
}

static tc_oh_bad_reason bad_of(tc_proto_err e);

/* docs/protocol.md 4.3: each entry is applied exactly as a partial_result
 * of its own, with the same checks (sender, batch, duplicate); a bad entry
 * is counted and the others still apply. Each entry becomes the
 * partial_result body it stands for (the envelope's protocol_version, type
 * and worker_id in front of the entry's pairs, copied once), so the loop
 * and the manual API see one kind of result. */
static void on_partials(tc_oh *h, const tc_proto_msg *m, const char *body, size_t len)
{
    h->stats.partial_results_messages++;
    const char *cursor = NULL;
    for (size_t i = 0; i < m->results->via.array.size; i++) {
        tc_proto_msg e;
        tc_proto_str pairs;
        uint32_t np;
        char detail[160];
        tc_proto_err err = tc_proto_next_result(m, i, &cursor, body, len, &e, &pairs, &np, detail, sizeof(detail));
        if (err != TC_PROTO_OK) {
            tc_oh_count_bad(h, bad_of(err), "%s", detail);
            if (err == TC_PROTO_ERR_UNDECODABLE) return;
            continue;
        }
        msgpack_sbuffer sb;
        msgpack_packer pk;
        msgpack_sbuffer_init(&sb);
        msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
        int bad = msgpack_pack_map(&pk, (size_t)np + 3) != 0;
        pack_key(&pk, "protocol_version");
        bad |= msgpack_pack_int(&pk, e.version) != 0;
        pack_key(&pk, "type");
        pack_key(&pk, "partial_result");
        pack_key(&pk, "worker_id");
        bad |= msgpack_pack_str_with_body(&pk, e.worker_id.ptr, e.worker_id.len) != 0;
        size_t head = sb.size;
        bad |= msgpack_sbuffer_write(&sb, pairs.ptr, pairs.len) != 0;
        if (bad || !sb.data) {
            msgpack_sbuffer_destroy(&sb);
            continue; /* out of memory: the lease deadline dispatches it again */
        }
        if (e.output_bytes.ptr) e.output_bytes.ptr = sb.data + head + (e.output_bytes.ptr - pairs.ptr);
        if (e.error_bytes.ptr) e.error_bytes.ptr = sb.data + head + (e.error_bytes.ptr - pairs.ptr);
        /* queue_body rebases from the body it is given: hand it the new one. */
        on_partial(h, &e, sb.data, sb.size, sb.data);
    }
}

/* The completion follows the batch's last partial on the same connection,
 * so steps of this batch still in flight lost their partial: free their
 * credit (the lease deadline dispatches them again), or the worker would
 * look busy forever. No event for the loop. */
static void on_completion(tc_oh *h, const tc_proto_msg *m, const void *body, size_t len)
{
    h->stats.batch_completions++;
    tc_oh_worker *w = live_sender(h, m->worker_id, "batch_completion");
    if (!w) return;
    for (size_t i = 0; i < w->nslots; i++)
        if (w->slots[i].state == 1 && batch_is(&w->slots[i].e, m->batch_id)) {
            inflight_remove(w, &w->slots[i]);
            h->stats.steps_released_by_completion++;
        }
    if (h->queue_completions) queue_body(h, TC_OH_EV_COMPLETION, body, len, m, NULL);
}

static int cmp_pair(const void *a, const void *b)
{
    const int64_t *x = a, *y = b;
    if (x[0] != y[0]) return x[0] < y[0] ? -1 : 1;
    return x[1] < y[1] ? -1 : x[1] > y[1];
}

/* docs/protocol.md section 6: steps sent to this worker in last_batch_id or
 * an earlier batch of this handle, with no result yet, that the worker does
 * not list, are taken back as lost. */
static void reconcile(tc_oh *h, tc_oh_worker *w, const tc_proto_msg *m)
{
    uint64_t last, seq;
    if (!m->reconcile || !m->last_batch_id.ptr || !w->used) return;
    /* An id this handle did not generate (or has not yet) changes nothing. */
    if (!own_batch_seq(h, m->last_batch_id.ptr, m->last_batch_id.len, &last) || last > h->batch_seq) return;
    size_t n = m->in_flight_steps->via.array.size;
    int64_t(*listed)[2] = n ? malloc(n * sizeof(*listed)) : NULL;
    tc_oh_inflight *gone = malloc(w->used * sizeof(*gone));
    if ((n && !listed) || !gone) goto done;
    for (size_t i = 0; i < n; i++) tc_proto_in_flight_step(m, i, &listed[i][0], &listed[i][1]);
    if (n) qsort(listed, n, sizeof(*listed), cmp_pair);
    size_t k = 0;
    for (size_t i = 0; i < w->nslots; i++) {
        tc_oh_slot *s = &w->slots[i];
        if (s->state != 1 || !own_batch_seq(h, s->e.batch_id, strlen(s->e.batch_id), &seq) || seq > last) continue;
        int64_t key[2] = {s->e.step_id, s->e.attempt};
        if (n && bsearch(key, listed, n, sizeof(*listed), cmp_pair)) continue;
        gone[k++] = s->e;
        inflight_remove(w, s);
    }
    if (k) {
        h->stats.steps_reconciled += k;
        emit_steps(h, TC_OH_EV_LOST, w->id, "reconciled", gone, k, NULL, NULL);
    }
done:
    free(listed);
    free(gone);
}

static void on_heartbeat(tc_oh *h, const tc_proto_msg *m)
{
    h->stats.heartbeats++;
    tc_oh_worker *w = worker_find_or_add(h, m->worker_id.ptr, m->worker_id.len);
    if (!w) return;
    if (m->host.ptr)
        snprintf(w->host, sizeof(w->host), "%.*s", (int)(m->host.len > TC_OH_HOST_MAX ? TC_OH_HOST_MAX : m->host.len),
                 m->host.ptr);
    w->pid = m->pid;
    w->capacity = m->capacity;
    w->protocol_version = m->version;
    const tc_proto_conn *conn = &m->connection;
    w->connects = conn->connects;
    w->disconnects = conn->disconnects;
    /* Kept only when it looks like an event name ([a-z0-9_], short): it
     * goes into a text column as is. */
    size_t en = conn->last_event.ptr && conn->last_event.len <= TC_OH_CONN_EVENT_MAX ? conn->last_event.len : 0;
    for (size_t k = 0; k < en; k++) {
        char ch = conn->last_event.ptr[k];
        if (!((ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9') || ch == '_')) en = 0;
    }
    if (en) memcpy(w->last_connection_event, conn->last_event.ptr, en);
    w->last_connection_event[en] = '\0';
    w->last_connection_event_at = conn->last_event_at;
    worker_default_limits(h, w);
    if (m->limits.max_batch_steps) w->max_batch_steps = m->limits.max_batch_steps;
    if (m->limits.max_message_bytes) w->max_message_bytes = m->limits.max_message_bytes;
    if (m->limits.max_payload_depth) w->max_payload_depth = m->limits.max_payload_depth;
    if (m->queues) {
        w->nqueues = m->queues->via.array.size;
        for (size_t i = 0; i < w->nqueues; i++) {
            tc_proto_str q = tc_proto_queue(m, i);
            memcpy(w->queues[i], q.ptr, q.len);
            w->queues[i][q.len] = '\0';
        }
    } else {
        worker_default_queues(w);
    }
    w->heartbeated = 1;
    w->last_heartbeat_at = wall_s();
    w->last_heartbeat_mono_ms = tc_oh_now_ms();
    reconcile(h, w, m);
}

/* A goodbye drops the worker (its steps are dispatched again) but does not
 * disable it: the legitimate order is unsubscribe, goodbye, close, so a
 * worker still subscribed that heartbeats again is live again, and a forged
 * goodbye costs a re-dispatch only. */
static void on_goodbye(tc_oh *h, const tc_proto_msg *m)
{
    h->stats.goodbyes++;
    tc_oh_worker *w = worker_find(h, m->worker_id.ptr, m->worker_id.len);
    if (!w) return;
    worker_lose(h, w, "goodbye");
    if (!w->subscribed) worker_remove(h, w);
}

static int refused_step_found(tc_oh_worker *w, const tc_proto_msg *m, size_t i, tc_oh_slot **out)
{
    int64_t step_id, attempt;
    tc_proto_str r, msg;
    tc_proto_refused_step(m, i, &step_id, &attempt, &r, &msg);
    *out = slot_find(w, step_id, attempt);
    return *out && (!m->batch_id.ptr || batch_is(&(*out)->e, m->batch_id));
}

/* Takes one refused step (or a whole batch's steps) out of flight and
 * queues what the reason asks for: FAIL for too_deep and invalid_step,
 * LOST "unknown_handler" or "draining" (no lost attempt: the caller hands
 * them back to pending) for those two, LOST ("refused") for anything else.
 * A draining worker gets nothing more on this connection, whatever its
 * heartbeats say: each step costs it at most one hand back per connection,
 * not a loop of sends and refusals. */
static void refuse(tc_oh *h, tc_oh_worker *w, tc_proto_str reason, tc_proto_str message, const tc_oh_inflight *steps,
                   size_t n)
{
    const char *cls = str_is(reason.ptr, reason.len, "too_deep")       ? "TaskerCore::PayloadTooDeepError"
                      : str_is(reason.ptr, reason.len, "invalid_step") ? "TaskerCore::BatchRefusedError"
                                                                       : NULL;
    char text[TC_OH_MESSAGE_MAX + 1];
    snprintf(text, sizeof(text), "worker %s refused the step%s: %.*s", w->id, n == 1 ? "" : "s",
             (int)(message.len > 200 ? 200 : message.len), message.ptr);
    const char *why = str_is(reason.ptr, reason.len, "unknown_handler") ? "unknown_handler"
                      : str_is(reason.ptr, reason.len, "draining")      ? "draining"
                                                                        : "refused";
    if (!strcmp(why, "draining")) w->drained = 1;
    emit_steps(h, cls ? TC_OH_EV_FAIL : TC_OH_EV_LOST, w->id, why, steps, n, cls, text);
}

/* docs/protocol.md 4.7: accepted only from the worker the batch was sent
 * to, for steps of that batch still in flight on it (all of them when
 * steps is empty); without a batch_id only listed steps each in flight on
 * that worker. Credit is freed at once. */
static void on_refusal(tc_oh *h, const tc_proto_msg *m)
{
    tc_oh_worker *w = live_sender(h, m->worker_id, "batch_refusal");
    if (!w) return;
    size_t n = m->steps->via.array.size;
    tc_oh_slot *s;
    if (n == 0) {
        size_t k = 0;
        tc_oh_inflight *all = m->batch_id.ptr && w->used ? malloc(w->used * sizeof(*all)) : NULL;
        if (all)
            for (size_t i = 0; i < w->nslots; i++)
                if (w->slots[i].state == 1 && batch_is(&w->slots[i].e, m->batch_id)) {
                    all[k++] = w->slots[i].e;
                    inflight_remove(w, &w->slots[i]);
                }
        if (k) {
            h->stats.refusals++;
            refuse(h, w, m->reason, m->message, all, k);
        } else if (m->batch_id.ptr && (all || !w->used)) {
            tc_oh_count_bad(h, TC_OH_BAD_NOT_DISPATCHED, "batch_refusal from %s for batch %.*s, not in flight on it",
                            w->id, CLIP(m->batch_id.len), m->batch_id.ptr);
        } else if (!m->batch_id.ptr) {
            tc_oh_count_bad(h, TC_OH_BAD_INVALID_FIELDS, "batch_refusal from %s with neither a batch_id nor steps",
                            w->id);
        }
        free(all);
        return;
    }
    /* All or nothing: one step not in flight there and the refusal is not
     * from the worker that holds the batch. */
    for (size_t i = 0; i < n; i++)
        if (!refused_step_found(w, m, i, &s)) {
            tc_oh_count_bad(h, TC_OH_BAD_NOT_DISPATCHED,
                            "batch_refusal from %s for a step not in flight on it (entry %zu, batch %.*s)", w->id, i,
                            CLIP(m->batch_id.len), m->batch_id.ptr ? m->batch_id.ptr : "nil");
            return;
        }
    h->stats.refusals++;
    for (size_t i = 0; i < n; i++) {
        int64_t step_id, attempt;
        tc_proto_str r, msg;
        tc_proto_refused_step(m, i, &step_id, &attempt, &r, &msg);
        s = slot_find(w, step_id, attempt);
        if (!s) continue; /* listed twice */
        tc_oh_inflight e = s->e;
        inflight_remove(w, s);
        refuse(h, w, r, msg, &e, 1);
    }
}

static tc_oh_bad_reason bad_of(tc_proto_err e)
{
    switch (e) {
    case TC_PROTO_ERR_VERSION: return TC_OH_BAD_PROTOCOL_VERSION;
    case TC_PROTO_ERR_TYPE: return TC_OH_BAD_UNKNOWN_TYPE;
    case TC_PROTO_ERR_FIELDS: return TC_OH_BAD_INVALID_FIELDS;
    default: return TC_OH_BAD_UNDECODABLE;
    }
}

static const char *type_name(tc_proto_type t)
{
    switch (t) {
    case TC_PROTO_PARTIAL_RESULT: return "partial_result";
    case TC_PROTO_BATCH_COMPLETION: return "batch_completion";
    case TC_PROTO_HEARTBEAT: return "heartbeat";
    case TC_PROTO_GOODBYE: return "goodbye";
    case TC_PROTO_BATCH_REFUSAL: return "batch_refusal";
    case TC_PROTO_PARTIAL_RESULTS: return "partial_results";
    }
    return "";
}

static void handle_result_message(tc_oh *h, const void *topic, size_t tlen, const void *body, size_t len)
{
    msgpack_unpacked u;
    tc_proto_msg m;
    char detail[160];
    msgpack_unpacked_init(&u);
    tc_proto_err e = tc_proto_parse(&u, body, len, &m, detail, sizeof(detail));
    if (e != TC_PROTO_OK) {
        tc_oh_count_bad(h, bad_of(e), "%s", detail);
        goto done;
    }
    const char *tn = type_name(m.type);
    if (!str_is(topic, tlen, tn)) {
        tc_oh_count_bad(h, TC_OH_BAD_TOPIC_MISMATCH, "a %s under the topic %.*s", tn, CLIP(tlen), (const char *)topic);
        goto done;
    }
    if (!valid_worker_id(m.worker_id.ptr, m.worker_id.len)) {
        tc_oh_count_bad(h, TC_OH_BAD_INVALID_FIELDS, "a %s whose worker_id is not [A-Za-z0-9_-]{1,%d}", tn,
                        TC_OH_WORKER_ID_MAX);
        goto done;
    }
    switch (m.type) {
    case TC_PROTO_PARTIAL_RESULT: on_partial(h, &m, body, len, NULL); break;
    case TC_PROTO_PARTIAL_RESULTS: on_partials(h, &m, body, len); break;
    case TC_PROTO_BATCH_COMPLETION: on_completion(h, &m, body, len); break;
    case TC_PROTO_HEARTBEAT: on_heartbeat(h, &m); break;
    case TC_PROTO_GOODBYE: on_goodbye(h, &m); break;
    case TC_PROTO_BATCH_REFUSAL: on_refusal(h, &m); break;
    }
done:
    msgpack_unpacked_destroy(&u);
}

/* XPUB_MANUAL: only "batch.<worker id>." is installed, right after it was
 * read (libzmq applies ZMQ_SUBSCRIBE to the connection of the last message
 * read); "" , "batch." or any other prefix is refused and counted. A worker
 * may be subscribed over more than one connection for a moment (it
 * reconnected before the old connection was seen closed): it is lost only
 * when the last one goes. */
static void handle_subscription(tc_oh *h, const unsigned char *p, size_t n)
{
    static const char prefix[] = "batch.";
    const size_t pl = sizeof(prefix) - 1;
    char err[128];
    if (n < 1 || (p[0] != 0 && p[0] != 1)) return;
    int sub = p[0] == 1;
    const char *topic = (const char *)p + 1;
    size_t tn = n - 1;
    const char *id = topic + pl;
    size_t idn = tn >= pl + 1 ? tn - pl - 1 : 0;
    if (tn < pl + 2 || memcmp(topic, prefix, pl) != 0 || topic[tn - 1] != '.' || !valid_worker_id(id, idn)) {
        if (sub) h->stats.subscriptions_refused++;
        return;
    }
    if (sub) {
        tc_oh_worker *w = worker_find(h, id, idn);
        if (w && w->leaving_until_mono_ms) {
            /* Back before its grace ran out: what the old connection held
             * may never have reached it, and a worker that does not
             * reconcile would hold that credit for good. Taken back, as
             * at any unsubscription before; the worker starts afresh. */
            worker_lose(h, w, "unsubscribed");
            worker_remove(h, w);
        }
        w = worker_find_or_add(h, id, idn);
        if (!w || tc_socket_set_bytes(&h->batch, ZMQ_SUBSCRIBE, topic, tn, err, sizeof(err)) < 0) {
            h->stats.subscriptions_refused++;
            return;
        }
        h->stats.subscriptions++;
        w->subscribed++;
        /* A new connection: a worker dropped as not_reading, or drained,
         * starts afresh. */
        w->not_reading = 0;
        w->drained = 0;
        backoff_reset(w);
    } else {
        h->stats.unsubscriptions++;
        /* After a closed connection libzmq has removed it already (and
         * ignores this); after an explicit unsubscribe it removes it now. */
        tc_socket_set_bytes(&h->batch, ZMQ_UNSUBSCRIBE, topic, tn, err, sizeof(err));
        tc_oh_worker *w = worker_find(h, id, idn);
        if (w && w->subscribed > 1) {
            w->subscribed--;
        } else if (w && w->leaving_until_mono_ms) {
            /* already leaving: the grace is not extended */
        } else if (w && tc_oh_worker_live(w)) {
            /* Unsubscribed (a worker shutting down in order: its last
             * results, its completions and its goodbye may still be on
             * their way on the result connection): heard a while longer,
             * sent nothing; its goodbye or the grace's end takes back what
             * it still holds. */
            w->subscribed = 0;
            w->leaving_until_mono_ms = tc_oh_now_ms() + TC_OH_LEAVE_GRACE_MS;
        } else if (w) {
            /* The worker unsubscribed or its connection dropped (a crash
             * or kill -9 included). */
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
        /* Before the next recv: in manual mode ZMQ_SUBSCRIBE applies to
         * the connection of the subscription read last. */
        if (n == 1) handle_subscription(h, zmq_msg_data(&frames[0]), zmq_msg_size(&frames[0]));
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
            handle_result_message(h, zmq_msg_data(&frames[0]), zmq_msg_size(&frames[0]), zmq_msg_data(&frames[1]),
                                  zmq_msg_size(&frames[1]));
        for (int f = 0; f < n; f++) zmq_msg_close(&frames[f]);
    }
    tc_oh_expire(h);
    return total;
}
