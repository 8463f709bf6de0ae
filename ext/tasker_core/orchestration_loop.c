/*
 * orchestration_loop.c: the native orchestration loop (see
 * orchestration_loop.h). One iteration: read what the sockets have
 * (results, heartbeats, subscriptions) through the handle core, write the
 * results back with one tasker_apply_results call, release the steps of
 * lost workers, claim as many ready steps as the live workers have room
 * for, send them as batches, then mark them dispatched with one call.
 * Messages are hints; PostgreSQL decides: every statement is keyed on
 * (step, attempt), so a result applied twice or late changes nothing.
 */
#define _GNU_SOURCE /* pipe2, pthread_timedjoin_np */
#include "orchestration_loop.h"

#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <msgpack.h>
#include <poll.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <zmq.h>

#include "codec.h"
#include "protocol.h"
#include "store.h"

/* A result to write back. output and error are msgpack bytes inside
 * owned (the body as it arrived, or the error map the loop packed);
 * NULL is SQL NULL. */
typedef struct pending_result {
    int64_t step_id;
    int64_t attempt;
    int success, retryable;
    int64_t retry_after_ms; /* -1: none */
    char *owned;
    const char *output, *error;
    size_t output_len, error_len;
} pending_result;

typedef struct step_pair {
    int64_t step_id;
    int64_t attempt;
} step_pair;

typedef struct pair_list {
    step_pair *v;
    size_t n, cap;
} pair_list;

/* A growable buffer for array literals and binary arrays; oom sticks. */
typedef struct sbuf {
    char *p;
    size_t len, cap;
    int oom;
} sbuf;

/* Steps a worker refused unstarted, not for anything wrong with them:
 * for want of their handler (and which worker lacks it), or because it is
 * draining (worker_id ""). */
typedef struct refused_step {
    int64_t step_id, attempt;
    char worker_id[TC_OH_WORKER_ID_MAX + 1];
} refused_step;

typedef struct refused_list {
    refused_step *v;
    size_t n, cap;
} refused_list;

struct tc_loop {
    tc_oh *oh;
    pthread_mutex_t mu;
    pthread_t thread;
    int started, joined;
    atomic_int stop;
    int wake[2];

    char *conninfo;
    char owner[TC_LOOP_OWNER_MAX + 1];
    int batch_size, lease_ms, poll_interval_ms, housekeeping_interval_ms;
    int max_lost;
    char max_lost_text[16];
    size_t max_pending;

    tc_store db;
    int db_up, ever_connected, listening;
    long backoff_ms;
    int64_t next_connect_ms, next_housekeeping_ms;
    int64_t next_suspect_check_ms; /* a claim that came back empty checks for suspects no sooner */
    int apply_failures;

    pending_result *results;
    size_t nresults, results_cap;
    /* results are written on a connection of their own (see "applying
     * results"): the call in flight holds its results in applying */
    tc_store adb;
    int adb_up, apply_sent;
    long abackoff_ms;
    int64_t next_aconnect_ms;
    pending_result *applying;
    size_t napplying, applying_cap;
    pair_list lost;    /* in flight on a lost worker: a lost attempt (redispatched or failed) */
    pair_list unsent;  /* claimed but not sent: release, count as released */
    refused_list refused; /* refused by their worker as unknown_handler or draining: hand back, no attempt lost */
    pair_list no_handler; /* claimed, and no worker serving the queue has the handler: put back for a while */
    char *limited_queues, *queue_limits; /* array literals passed to every claim */

    tc_loop_stats st; /* under mu */
    /* the handle's socket counters as of the loop's last send, for readers
     * (the loop sends without mu): under mu */
    tc_socket_counters batch_counters, result_counters;
    uint64_t lat_ring[TC_LOOP_LATENCY_RING];
    uint64_t lat_total_us;
};

/* ---- small helpers ------------------------------------------------------ */

static uint64_t mono_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

static void sb_reserve(sbuf *b, size_t more)
{
    if (b->oom || b->len + more + 1 <= b->cap) return;
    size_t nc = b->cap ? b->cap : 256;
    while (nc < b->len + more + 1) nc *= 2;
    char *p = realloc(b->p, nc);
    if (!p) {
        b->oom = 1;
        return;
    }
    b->p = p;
    b->cap = nc;
}

static void sb_put(sbuf *b, const char *s, size_t n)
{
    sb_reserve(b, n);
    if (b->oom) return;
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
}

static void sb_puts(sbuf *b, const char *s)
{
    sb_put(b, s, strlen(s));
}

static void sb_printf(sbuf *b, const char *fmt, long long v)
{
    char tmp[32];
    int n = snprintf(tmp, sizeof(tmp), fmt, v);
    sb_put(b, tmp, (size_t)n);
}

static void sb_reset(sbuf *b)
{
    b->len = 0;
    b->oom = 0;
    if (b->p) b->p[0] = '\0';
}

static void sb_free(sbuf *b)
{
    free(b->p);
    memset(b, 0, sizeof(*b));
}

/* An element of a text[] literal, always quoted (an unquoted NULL would be
 * read as SQL NULL). */
static void sb_text_elem(sbuf *b, const char *p, size_t n)
{
    sb_put(b, "\"", 1);
    for (size_t i = 0; i < n; i++) {
        if (p[i] == '"' || p[i] == '\\') sb_put(b, "\\", 1);
        sb_put(b, &p[i], 1);
    }
    sb_put(b, "\"", 1);
}

static int pairs_push(pair_list *l, int64_t step_id, int64_t attempt)
{
    if (l->n == l->cap) {
        size_t nc = l->cap ? l->cap * 2 : 64;
        step_pair *v = realloc(l->v, nc * sizeof(*v));
        if (!v) return -1;
        l->v = v;
        l->cap = nc;
    }
    l->v[l->n].step_id = step_id;
    l->v[l->n].attempt = attempt;
    l->n++;
    return 0;
}

static void refused_push(refused_list *l, const tc_oh_inflight *e, const char *worker_id)
{
    if (l->n == l->cap) {
        size_t nc = l->cap ? l->cap * 2 : 16;
        refused_step *v = realloc(l->v, nc * sizeof(*v));
        if (!v) return; /* the claim deadline takes the step back */
        l->v = v;
        l->cap = nc;
    }
    refused_step *r = &l->v[l->n++];
    r->step_id = e->step_id;
    r->attempt = e->attempt;
    snprintf(r->worker_id, sizeof(r->worker_id), "%s", worker_id);
}

static void pairs_literals(const pair_list *l, sbuf *ids, sbuf *attempts)
{
    sb_reset(ids);
    sb_reset(attempts);
    sb_puts(ids, "{");
    sb_puts(attempts, "{");
    for (size_t i = 0; i < l->n; i++) {
        sb_printf(ids, i ? ",%lld" : "%lld", (long long)l->v[i].step_id);
        sb_printf(attempts, i ? ",%lld" : "%lld", (long long)l->v[i].attempt);
    }
    sb_puts(ids, "}");
    sb_puts(attempts, "}");
}

static void result_free(pending_result *r)
{
    free(r->owned);
}

/* ---- PostgreSQL binary arrays (array_recv: one dimension, lower bound 1) -- */

enum { OID_BOOL = 16, OID_BYTEA = 17, OID_INT8 = 20, OID_INT4 = 23 };

static void sb_be32(sbuf *b, uint32_t v)
{
    v = htobe32(v);
    sb_put(b, (const char *)&v, 4);
}

static void sb_be64(sbuf *b, uint64_t v)
{
    v = htobe64(v);
    sb_put(b, (const char *)&v, 8);
}

/* The header of an array of n elements of type oid (the has-null flag is
 * informational: array_recv finds NULLs itself). */
static void bin_array_begin(sbuf *b, uint32_t oid, size_t n)
{
    sb_reset(b);
    sb_be32(b, 1); /* ndim */
    sb_be32(b, 0); /* flags */
    sb_be32(b, oid);
    sb_be32(b, (uint32_t)n);
    sb_be32(b, 1); /* lower bound */
}

static void bin_int8(sbuf *b, int64_t v)
{
    sb_be32(b, 8);
    sb_be64(b, (uint64_t)v);
}

static void bin_int4(sbuf *b, int32_t v)
{
    sb_be32(b, 4);
    sb_be32(b, (uint32_t)v);
}

static void bin_bool(sbuf *b, int v)
{
    sb_be32(b, 1);
    sb_put(b, v ? "\x01" : "\x00", 1);
}

/* Bytes as they are; p NULL is SQL NULL. */
static void bin_bytes(sbuf *b, const char *p, size_t n)
{
    if (!p) {
        sb_be32(b, 0xffffffffu);
        return;
    }
    sb_be32(b, (uint32_t)n);
    sb_put(b, p, n);
}

/* mu held. */
static void publish_counters(tc_loop *l)
{
    l->batch_counters = l->oh->batch.counters;
    l->result_counters = l->oh->result.counters;
}

/* ---- the database connection --------------------------------------------- */

static void note_db_error(tc_loop *l, const char *what)
{
    pthread_mutex_lock(&l->mu);
    l->st.db_errors++;
    snprintf(l->st.last_db_error, sizeof(l->st.last_db_error), "%.60s: %.180s", what, l->db.err);
    pthread_mutex_unlock(&l->mu);
}

/* After a failed statement: a lost connection is closed and retried with
 * backoff; anything else is only counted. Returns non-zero when the
 * connection was lost. */
static int db_failed(tc_loop *l, const char *what)
{
    note_db_error(l, what);
    if (tc_store_ok(&l->db)) return 0;
    tc_store_close(&l->db);
    l->db_up = 0;
    l->listening = 0;
    l->backoff_ms = 50;
    l->next_connect_ms = tc_oh_now_ms() + l->backoff_ms;
    pthread_mutex_lock(&l->mu);
    l->st.db_connected = 0;
    pthread_mutex_unlock(&l->mu);
    return 1;
}

static int db_connect(tc_loop *l)
{
    if (tc_store_connect(&l->db, l->conninfo, 2, NULL) != 0) return -1;
    /* Task creation and releases notify; hearing it wakes the loop at
     * once instead of at the next poll interval. Polling still works
     * without it (PgBouncer in transaction mode drops LISTEN). */
    PGresult *r = tc_store_exec(&l->db, "LISTEN tasker_steps_ready", 0, NULL, NULL, NULL);
    l->listening = r != NULL;
    PQclear(r);
    l->db_up = 1;
    pthread_mutex_lock(&l->mu);
    if (l->ever_connected) l->st.db_reconnects++;
    l->st.db_connected = 1;
    pthread_mutex_unlock(&l->mu);
    l->ever_connected = 1;
    l->backoff_ms = 50;
    return 0;
}

static void ensure_db(tc_loop *l)
{
    if (l->db_up || tc_oh_now_ms() < l->next_connect_ms) return;
    if (db_connect(l) == 0) return;
    note_db_error(l, "reconnect");
    l->backoff_ms = l->backoff_ms * 2 > 2000 ? 2000 : l->backoff_ms * 2;
    l->next_connect_ms = tc_oh_now_ms() + l->backoff_ms;
}

static PGresult *exec_text(tc_loop *l, const char *sql, int n, const char *const *vals)
{
    return tc_store_exec(&l->db, sql, n, vals, NULL, NULL);
}

/* ---- results in, results out --------------------------------------------- */

static int results_push(tc_loop *l, const pending_result *r)
{
    if (l->nresults == l->results_cap) {
        size_t nc = l->results_cap ? l->results_cap * 2 : 256;
        pending_result *v = realloc(l->results, nc * sizeof(*v));
        if (!v) return -1;
        l->results = v;
        l->results_cap = nc;
    }
    l->results[l->nresults++] = *r;
    return 0;
}

/* Queues a failed, not retryable result with the error map of
 * docs/protocol.md section 8, applied with the workers' results. -1 when
 * out of memory (the claim deadline then takes the step). */
static int fail_step(tc_loop *l, int64_t step_id, int64_t attempt, const char *error_class, const char *message)
{
    tc_codec_writer w;
    if (tc_codec_writer_init(&w, 96 + strlen(error_class) + strlen(message)) != 0) return -1;
    msgpack_packer *pk = &w.pk;
    msgpack_pack_map(pk, 5);
    msgpack_pack_str_with_body(pk, "class", 5);
    msgpack_pack_str_with_body(pk, error_class, strlen(error_class));
    msgpack_pack_str_with_body(pk, "message", 7);
    msgpack_pack_str_with_body(pk, message, strlen(message));
    msgpack_pack_str_with_body(pk, "backtrace", 9);
    msgpack_pack_array(pk, 0);
    msgpack_pack_str_with_body(pk, "retryable", 9);
    msgpack_pack_false(pk);
    msgpack_pack_str_with_body(pk, "retry_after", 11);
    msgpack_pack_nil(pk);
    /* the buffer becomes the pending result's */
    pending_result r = {.step_id = step_id, .attempt = attempt, .retry_after_ms = -1,
                        .owned = w.sbuf.data, .error = w.sbuf.data, .error_len = w.sbuf.size};
    if (w.failed || results_push(l, &r) != 0) {
        tc_codec_writer_destroy(&w);
        return -1;
    }
    return 0;
}

/* A result the handle core parsed and checked as it arrived: its body
 * moves into the pending result, output or error stay the bytes the
 * worker sent. An absent output is stored as msgpack nil. mu held. */
static void take_result(tc_loop *l, tc_oh_event *ev)
{
    static const char nil[1] = {(char)0xc0};
    if (l->nresults >= l->max_pending) {
        /* PostgreSQL has been away long: the claim deadline re-dispatches these. */
        l->st.results_dropped++;
        return;
    }
    pending_result r = {.step_id = ev->step_id, .attempt = ev->attempt, .success = ev->success,
                        .retryable = ev->retryable, .retry_after_ms = ev->retry_after_ms, .owned = ev->body};
    if (ev->success) {
        r.output = ev->output ? ev->output : nil;
        r.output_len = ev->output ? ev->output_len : 1;
    } else {
        r.error = ev->error;
        r.error_len = ev->error_len;
    }
    if (results_push(l, &r) != 0) return; /* the event keeps the body and frees it */
    ev->body = NULL;
}

/* Drains the core's event queue (mu held). */
static void drain_events(tc_loop *l)
{
    tc_oh_event *ev;
    while ((ev = tc_oh_event_peek(l->oh)) != NULL) {
        if (ev->kind == TC_OH_EV_LOST && !strcmp(ev->reason, "unknown_handler")) {
            for (size_t i = 0; i < ev->n_in_flight; i++) refused_push(&l->refused, &ev->in_flight[i], ev->worker_id);
        } else if (ev->kind == TC_OH_EV_LOST && !strcmp(ev->reason, "draining")) {
            for (size_t i = 0; i < ev->n_in_flight; i++) refused_push(&l->refused, &ev->in_flight[i], "");
        } else if (ev->kind == TC_OH_EV_LOST) {
            for (size_t i = 0; i < ev->n_in_flight; i++)
                pairs_push(&l->lost, ev->in_flight[i].step_id, ev->in_flight[i].attempt);
        } else if (ev->kind == TC_OH_EV_FAIL) {
            /* refused by their worker as too_deep / invalid_step: sending
             * them again would be refused again */
            for (size_t i = 0; i < ev->n_in_flight; i++)
                if (fail_step(l, ev->in_flight[i].step_id, ev->in_flight[i].attempt, ev->error_class, ev->message) == 0)
                    l->st.failed_refused++;
        } else if (ev->kind == TC_OH_EV_RESULT) {
            take_result(l, ev);
        }
        tc_oh_event_pop(l->oh);
    }
    l->st.pending_results = l->nresults + l->napplying;
}

/* Hands steps back to pending. unsent (lost 0): claimed and never sent, no
 * attempt lost. lost (lost 1): in flight on a worker that was lost, or
 * refused by it: a lost attempt, dispatched again or, past
 * max_lost_attempts, failed with StepLostError (db/migrate/0005). */
static int release_pairs(tc_loop *l, pair_list *pl, int lost)
{
    if (!pl->n || !l->db_up) return 0;
    sbuf ids = {0}, att = {0};
    pairs_literals(pl, &ids, &att);
    const char *vals[3] = {ids.p, att.p, l->max_lost_text};
    const char *fn = lost ? "tasker_release_lost_steps" : "tasker_release_steps";
    int rc = -1;
    if (!ids.oom && !att.oom) {
        PGresult *r = lost ? exec_text(l, "SELECT released, failed FROM tasker_release_lost_steps($1::bigint[], "
                                          "$2::int[], $3::int)", 3, vals)
                           : exec_text(l, "SELECT tasker_release_steps($1::bigint[], $2::int[]), 0", 2, vals);
        if (r) {
            uint64_t released = (uint64_t)atoll(PQgetvalue(r, 0, 0));
            uint64_t failed = (uint64_t)atoll(PQgetvalue(r, 0, 1));
            PQclear(r);
            pthread_mutex_lock(&l->mu);
            if (lost) {
                l->st.redispatched += released;
                l->st.lost_failed += failed;
            } else {
                l->st.released += released;
            }
            pthread_mutex_unlock(&l->mu);
            pl->n = 0;
            rc = 0;
        } else if (!db_failed(l, fn)) {
            pl->n = 0; /* not a connection problem: the deadline requeues them */
        }
    }
    sb_free(&ids);
    sb_free(&att);
    return rc;
}

/* tasker_put_back_steps (db/migrate/0011): pl back to pending without a
 * lost attempt, ready after delay_ms (NULL: now, and announced), its
 * history rows giving reason. Returns the result (step_id, handler) or
 * NULL; pl is emptied unless the connection failed. */
static PGresult *put_back_pairs(tc_loop *l, pair_list *pl, const char *delay_ms, const char *reason)
{
    if (!pl->n || !l->db_up) return NULL;
    sbuf ids = {0}, att = {0};
    pairs_literals(pl, &ids, &att);
    const char *vals[4] = {ids.p, att.p, delay_ms, reason};
    PGresult *r = NULL;
    if (!ids.oom && !att.oom) {
        r = exec_text(l, "SELECT step_id, handler FROM tasker_put_back_steps($1::bigint[], $2::int[], $3::int, $4)", 4,
                      vals);
        if (r || !db_failed(l, "tasker_put_back_steps")) pl->n = 0;
    }
    sb_free(&ids);
    sb_free(&att);
    return r;
}

/* As tasker_defer_steps: put back for want of a handler, after delay_ms. */
static PGresult *defer_pairs(tc_loop *l, pair_list *pl, int delay_ms)
{
    char delay[16];
    snprintf(delay, sizeof(delay), "%d", delay_ms < 0 ? 0 : delay_ms);
    return put_back_pairs(l, pl, delay, "unknown_handler");
}

/* Refused because its worker drains (else: for want of its handler). */
static int refused_draining(const refused_step *r)
{
    return r->worker_id[0] == '\0';
}

/* Steps refused unstarted (unknown_handler, draining): back to pending at
 * once, no attempt lost. A worker that lacked a step's handler is
 * remembered to, so the next claim sends the step to another worker
 * serving the queue (or, if none has it, puts it back for
 * TC_LOOP_NO_HANDLER_DELAY_MS); a draining worker is sent nothing more.
 * Each kind is put back in a call of its own; one whose call failed on a
 * lost connection stays queued for the next iteration. */
static void hand_back_refused(tc_loop *l)
{
    if (!l->refused.n || !l->db_up) return;
    for (int draining = 0; draining <= 1; draining++) {
        pair_list pl = {0};
        for (size_t i = 0; i < l->refused.n; i++)
            if (refused_draining(&l->refused.v[i]) == draining)
                pairs_push(&pl, l->refused.v[i].step_id, l->refused.v[i].attempt);
        if (!pl.n) continue;
        PGresult *r = draining ? put_back_pairs(l, &pl, NULL, "draining") : defer_pairs(l, &pl, 0);
        if (pl.n == 0) {
            pthread_mutex_lock(&l->mu);
            for (int row = 0; !draining && r && row < PQntuples(r); row++) {
                int64_t id = atoll(PQgetvalue(r, row, 0));
                const char *handler = PQgetvalue(r, row, 1);
                for (size_t i = 0; i < l->refused.n; i++) {
                    if (l->refused.v[i].step_id != id || refused_draining(&l->refused.v[i])) continue;
                    tc_oh_worker *w = tc_oh_worker_by_id(l->oh, l->refused.v[i].worker_id);
                    if (w) tc_oh_worker_note_lacks(w, handler, strlen(handler));
                }
            }
            uint64_t *count = draining ? &l->st.handed_back_draining : &l->st.handed_back_unknown_handler;
            *count += r ? (uint64_t)PQntuples(r) : 0;
            pthread_mutex_unlock(&l->mu);
            /* done with this kind: keep only the other */
            size_t k = 0;
            for (size_t i = 0; i < l->refused.n; i++)
                if (refused_draining(&l->refused.v[i]) != draining) l->refused.v[k++] = l->refused.v[i];
            l->refused.n = k;
        }
        PQclear(r);
        free(pl.v);
    }
}

/* ---- applying results ---------------------------------------------------------
 *
 * Results are written by tasker_apply_results calls on a connection of
 * their own (adb) while the loop claims on db, so that a batch's results
 * are written while the next batch is chosen: one call in flight at a time,
 * its results kept in applying until its outcome is read. Without adb (it
 * cannot connect) they are written on db, between claims, as before. */

#define APPLY_SQL                                                                                                     \
    "SELECT applied, stale FROM tasker_apply_results($1::bigint[], $2::int[], $3::boolean[], $4::bytea[], "          \
    "$5::bytea[], $6::boolean[], $7::int[])"

/* The seven binary array parameters for results v[0..n). out of memory: -1. */
typedef struct apply_params {
    sbuf b[7];
    const char *vals[7];
    int lens[7], fmts[7];
} apply_params;

static int apply_params_build(apply_params *ap, const pending_result *v, size_t n)
{
    static const uint32_t oids[7] = {OID_INT8, OID_INT4, OID_BOOL, OID_BYTEA, OID_BYTEA, OID_BOOL, OID_INT4};
    memset(ap, 0, sizeof(*ap));
    for (int k = 0; k < 7; k++) bin_array_begin(&ap->b[k], oids[k], n);
    for (size_t i = 0; i < n; i++) {
        const pending_result *r = &v[i];
        bin_int8(&ap->b[0], r->step_id);
        bin_int4(&ap->b[1], (int32_t)r->attempt);
        bin_bool(&ap->b[2], r->success);
        bin_bytes(&ap->b[3], r->output, r->output_len);
        bin_bytes(&ap->b[4], r->error, r->error_len);
        bin_bool(&ap->b[5], r->retryable);
        if (r->retry_after_ms >= 0)
            bin_int4(&ap->b[6], (int32_t)r->retry_after_ms);
        else
            bin_bytes(&ap->b[6], NULL, 0);
    }
    int oom = 0;
    for (int k = 0; k < 7; k++) {
        oom |= ap->b[k].oom;
        ap->vals[k] = ap->b[k].p;
        ap->lens[k] = (int)ap->b[k].len;
        ap->fmts[k] = 1;
    }
    return oom ? -1 : 0;
}

static void apply_params_free(apply_params *ap)
{
    for (int k = 0; k < 7; k++) sb_free(&ap->b[k]);
}

/* The outcome of a call for results v[0..n): r its result, or NULL with
 * s's error. Returns 1 when the results are done with (written, or
 * dropped: an error that is not a deadlock or a serialization failure, or
 * one three times in a row, would fail forever, and the claim deadline
 * takes those steps), 0 when they are to be written again. */
static int apply_outcome(tc_loop *l, PGresult *r, const tc_store *s, const pending_result *v, size_t n)
{
    if (r) {
        uint64_t applied = (uint64_t)atoll(PQgetvalue(r, 0, 0));
        uint64_t stale = (uint64_t)atoll(PQgetvalue(r, 0, 1));
        uint64_t ok = 0, bad = 0, retry = 0;
        for (size_t i = 0; i < n; i++) {
            if (v[i].success)
                ok++;
            else {
                bad++;
                if (v[i].retryable) retry++;
            }
        }
        pthread_mutex_lock(&l->mu);
        l->st.apply_calls++;
        l->st.applied_results += applied;
        l->st.stale_results += stale;
        /* The function reports totals only: when some were stale the
         * split by outcome is what the workers reported. */
        l->st.completed += ok;
        l->st.failed += bad;
        l->st.retried += retry;
        pthread_mutex_unlock(&l->mu);
        l->apply_failures = 0;
        return 1;
    }
    if (!tc_store_ok(s)) return 0; /* the connection went: written again once one is back */
    if (strncmp(s->sqlstate, "40", 2) != 0 || ++l->apply_failures >= 3) {
        pthread_mutex_lock(&l->mu);
        l->st.results_dropped += n;
        pthread_mutex_unlock(&l->mu);
        l->apply_failures = 0;
        return 1;
    }
    return 0;
}

static void results_free(pending_result *v, size_t n)
{
    for (size_t i = 0; i < n; i++) result_free(&v[i]);
}

static void publish_pending(tc_loop *l)
{
    pthread_mutex_lock(&l->mu);
    l->st.pending_results = l->nresults + l->napplying;
    pthread_mutex_unlock(&l->mu);
}

/* Everything pending, written now on db (blocking). */
static int apply_results(tc_loop *l)
{
    if (!l->nresults || !l->db_up) return 0;
    apply_params ap;
    int rc = -1;
    if (apply_params_build(&ap, l->results, l->nresults) == 0) {
        PGresult *r = tc_store_exec(&l->db, APPLY_SQL, 7, ap.vals, ap.lens, ap.fmts);
        if (!r) db_failed(l, "tasker_apply_results");
        if (apply_outcome(l, r, &l->db, l->results, l->nresults)) {
            results_free(l->results, l->nresults);
            l->nresults = 0;
            rc = 0;
        }
        PQclear(r);
    }
    apply_params_free(&ap);
    publish_pending(l);
    return rc;
}

static void adb_down(tc_loop *l, const char *what)
{
    pthread_mutex_lock(&l->mu);
    l->st.db_errors++;
    snprintf(l->st.last_db_error, sizeof(l->st.last_db_error), "%.60s: %.180s", what, l->adb.err);
    pthread_mutex_unlock(&l->mu);
    tc_store_close(&l->adb);
    l->adb_up = 0;
    /* A connect blocks the loop (up to its timeout) while results go on
     * being written on db, so failing ones are tried ever less often. */
    l->abackoff_ms = l->abackoff_ms ? (l->abackoff_ms * 2 > 30000 ? 30000 : l->abackoff_ms * 2) : 50;
    l->next_aconnect_ms = tc_oh_now_ms() + l->abackoff_ms;
}

/* The call in flight on adb, back to pending ahead of what came since. */
static void apply_requeue(tc_loop *l)
{
    size_t need = l->nresults + l->napplying;
    if (need > l->results_cap) {
        pending_result *v = realloc(l->results, need * sizeof(*v));
        if (!v) { /* keep them where they are: written again from applying */
            return;
        }
        l->results = v;
        l->results_cap = need;
    }
    memmove(l->results + l->napplying, l->results, l->nresults * sizeof(*l->results));
    memcpy(l->results, l->applying, l->napplying * sizeof(*l->results));
    l->nresults += l->napplying;
    l->napplying = 0;
}

/* Reads the outcome of the call in flight, when it has come (wait: block
 * until it does). */
static void apply_collect(tc_loop *l, int wait)
{
    if (!l->apply_sent) return;
    int c;
    while ((c = tc_store_consume(&l->adb)) == 0) {
        if (!wait) return;
        struct pollfd p = {tc_store_socket(&l->adb), POLLIN, 0};
        poll(&p, 1, 1000);
    }
    if (c < 0) tc_store_close(&l->adb); /* could not read: the outcome is unknown, the call is made again */
    PGresult *r = c > 0 && tc_store_ok(&l->adb) ? tc_store_take_result(&l->adb) : NULL;
    l->apply_sent = 0;
    int done = apply_outcome(l, r, &l->adb, l->applying, l->napplying);
    PQclear(r);
    if (done) {
        results_free(l->applying, l->napplying);
        l->napplying = 0;
    } else {
        apply_requeue(l);
    }
    if (!tc_store_ok(&l->adb)) adb_down(l, "tasker_apply_results");
    publish_pending(l);
}

/* Sends everything pending in one call on adb, connecting it first when it
 * is due; with no adb, writes it on db now. */
static void apply_send(tc_loop *l)
{
    if (l->napplying && !l->apply_sent) apply_requeue(l); /* one that found no memory to go back */
    if (l->apply_sent || !l->nresults || l->napplying) return;
    if (!l->adb_up && tc_oh_now_ms() >= l->next_aconnect_ms) {
        if (tc_store_connect(&l->adb, l->conninfo, 2, NULL) == 0) {
            l->adb_up = 1;
            l->abackoff_ms = 0;
        } else {
            adb_down(l, "connect (results)");
        }
    }
    if (!l->adb_up) {
        apply_results(l);
        return;
    }
    apply_params ap;
    if (apply_params_build(&ap, l->results, l->nresults) != 0) {
        apply_params_free(&ap);
        return;
    }
    int sent = tc_store_send(&l->adb, APPLY_SQL, 7, ap.vals, ap.lens, ap.fmts) == 0;
    apply_params_free(&ap); /* libpq copied the parameters */
    int f;
    while (sent && (f = tc_store_flush(&l->adb)) != 0) {
        if (f < 0) {
            sent = 0;
            break;
        }
        struct pollfd p = {tc_store_socket(&l->adb), POLLIN | POLLOUT, 0};
        if (poll(&p, 1, 1000) > 0 && (p.revents & POLLIN) && tc_store_consume(&l->adb) < 0) sent = 0;
    }
    if (!sent) {
        adb_down(l, "tasker_apply_results");
        apply_results(l);
        return;
    }
    /* the results move to applying: swap the buffers */
    pending_result *v = l->applying;
    size_t cap = l->applying_cap;
    l->applying = l->results;
    l->applying_cap = l->results_cap;
    l->napplying = l->nresults;
    l->results = v;
    l->results_cap = cap;
    l->nresults = 0;
    l->apply_sent = 1;
    publish_pending(l);
}

/* ---- claiming and dispatching -------------------------------------------- */

static int64_t be64(const char *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
    return (int64_t)be64toh(v);
}

static int32_t be32(const char *p)
{
    uint32_t v;
    memcpy(&v, p, 4);
    return (int32_t)be32toh(v);
}

/* A one-dimensional array in PostgreSQL's binary format. */
typedef struct bin_array {
    const char *p, *end;
    int32_t n;
} bin_array;

static int array_open(bin_array *a, const char *p, int len)
{
    a->end = p + len;
    a->n = 0;
    if (len < 12) return -1;
    int32_t ndim = be32(p);
    if (ndim == 0) {
        a->p = p + 12;
        return 0;
    }
    if (ndim != 1 || len < 20) return -1;
    a->n = be32(p + 12);
    a->p = p + 20;
    return 0;
}

/* Next element: 1 with *ptr and *len (*ptr NULL for SQL NULL), 0 at the end, -1 malformed. */
static int array_next(bin_array *a, const char **ptr, int32_t *len)
{
    if (a->p >= a->end) return 0;
    if (a->end - a->p < 4) return -1;
    *len = be32(a->p);
    a->p += 4;
    if (*len < 0) {
        *ptr = NULL;
        return 1;
    }
    if (a->end - a->p < *len) return -1;
    *ptr = a->p;
    a->p += *len;
    return 1;
}

static void pack_str(msgpack_packer *pk, const char *s, size_t n)
{
    msgpack_pack_str(pk, n);
    msgpack_pack_str_body(pk, s, n);
}

static void pack_key(msgpack_packer *pk, const char *s)
{
    pack_str(pk, s, strlen(s));
}

/* Stored payloads are msgpack already: written straight into the entry
 * (through the writer, so a failed allocation sticks in its flag). */
static void splice_msgpack(msgpack_packer *pk, const char *p, size_t n)
{
    if (!p || n == 0)
        msgpack_pack_nil(pk);
    else
        pk->callback(pk->data, p, n);
}

/* Columns of the claim, binary format. */
enum { C_STEP, C_TASK, C_NAME, C_HANDLER, C_CONFIG, C_ATTEMPT, C_TIMEOUT, C_CONTEXT, C_DEP_NAMES, C_DEP_OUTPUTS,
       C_LOST, C_QUEUE, C_COUNT };

/* One step map of a batch (docs/protocol.md 4.1). */
static int pack_step(msgpack_packer *pk, const PGresult *res, int row)
{
    bin_array names, outs;
    if (array_open(&names, PQgetvalue(res, row, C_DEP_NAMES), PQgetlength(res, row, C_DEP_NAMES)) < 0 ||
        array_open(&outs, PQgetvalue(res, row, C_DEP_OUTPUTS), PQgetlength(res, row, C_DEP_OUTPUTS)) < 0 ||
        names.n != outs.n)
        return -1;
    msgpack_pack_map(pk, 9);
    pack_key(pk, "step_id");
    msgpack_pack_int64(pk, be64(PQgetvalue(res, row, C_STEP)));
    pack_key(pk, "task_id");
    msgpack_pack_int64(pk, be64(PQgetvalue(res, row, C_TASK)));
    pack_key(pk, "step_name");
    pack_str(pk, PQgetvalue(res, row, C_NAME), (size_t)PQgetlength(res, row, C_NAME));
    pack_key(pk, "handler");
    pack_str(pk, PQgetvalue(res, row, C_HANDLER), (size_t)PQgetlength(res, row, C_HANDLER));
    pack_key(pk, "handler_config");
    splice_msgpack(pk, PQgetvalue(res, row, C_CONFIG), (size_t)PQgetlength(res, row, C_CONFIG));
    pack_key(pk, "attempt");
    msgpack_pack_int32(pk, be32(PQgetvalue(res, row, C_ATTEMPT)));
    pack_key(pk, "timeout_ms");
    msgpack_pack_int32(pk, be32(PQgetvalue(res, row, C_TIMEOUT)));
    pack_key(pk, "context");
    splice_msgpack(pk, PQgetvalue(res, row, C_CONTEXT), (size_t)PQgetlength(res, row, C_CONTEXT));
    pack_key(pk, "dependency_results");
    msgpack_pack_map(pk, (size_t)names.n);
    for (int32_t i = 0; i < names.n; i++) {
        const char *np, *op;
        int32_t nl, ol;
        if (array_next(&names, &np, &nl) != 1 || array_next(&outs, &op, &ol) != 1 || !np) return -1;
        pack_str(pk, np, (size_t)nl);
        splice_msgpack(pk, op, op ? (size_t)ol : 0);
    }
    return 0;
}

/* A claimed step on its way out. ROW_DEFERRED: no live worker serving its
 * queue has its handler (each refused it): put back for a while. */
enum { ROW_PENDING, ROW_SENT, ROW_UNSENT, ROW_FAILED, ROW_DEFERRED };

typedef struct claimed_row {
    size_t off, len; /* its packed step map in the entries buffer */
    int depth;       /* the deepest of its context, handler_config and dependency outputs */
    char deepest[96]; /* which one that is, for the error message */
    int state;
    int suspect;      /* lost TC_LOOP_SUSPECT_LOST times or more: goes alone to an idle worker */
    const char *queue, *handler; /* in the claim's result */
    size_t queue_len, handler_len;
} claimed_row;

/* w serves the row's queue and has not refused its handler. */
static int worker_takes(const tc_oh_worker *w, const claimed_row *r)
{
    return tc_oh_worker_serves(w, r->queue, r->queue_len) && !tc_oh_worker_lacks(w, r->handler, r->handler_len);
}

static int payload_depth(const char *p, int32_t len)
{
    int d = 0;
    /* Malformed bytes report the depth seen so far: the worker refuses
     * them as undecodable, which is not this check's business. */
    if (p && len > 0) tc_codec_depth(p, (size_t)len, &d, NULL, 0);
    return d;
}

static void row_depth(const PGresult *res, int row, claimed_row *r)
{
    r->depth = payload_depth(PQgetvalue(res, row, C_CONTEXT), PQgetlength(res, row, C_CONTEXT));
    snprintf(r->deepest, sizeof(r->deepest), "context");
    int d = payload_depth(PQgetvalue(res, row, C_CONFIG), PQgetlength(res, row, C_CONFIG));
    if (d > r->depth) {
        r->depth = d;
        snprintf(r->deepest, sizeof(r->deepest), "handler_config");
    }
    bin_array names, outs;
    if (array_open(&names, PQgetvalue(res, row, C_DEP_NAMES), PQgetlength(res, row, C_DEP_NAMES)) < 0 ||
        array_open(&outs, PQgetvalue(res, row, C_DEP_OUTPUTS), PQgetlength(res, row, C_DEP_OUTPUTS)) < 0)
        return;
    const char *np, *op;
    int32_t nl, ol;
    while (array_next(&names, &np, &nl) == 1 && array_next(&outs, &op, &ol) == 1) {
        d = payload_depth(op, ol);
        if (d <= r->depth) continue;
        r->depth = d;
        snprintf(r->deepest, sizeof(r->deepest), "output of dependency \"%.*s\"", np ? (int)(nl < 48 ? nl : 48) : 0,
                 np ? np : "");
    }
}

/* A batch of the chosen step maps, copied from the entries buffer, built
 * by the handle core's one batch builder. n = 0 measures the envelope. */
static int build_batch(tc_codec_writer *out, const tc_oh *h, const char *batch_id, const char *worker_id,
                       const char *entries, const claimed_row *rows, const int *idx, int n, tc_oh_entry *picked)
{
    for (int i = 0; i < n; i++) picked[i] = (tc_oh_entry){entries + rows[idx[i]].off, rows[idx[i]].len};
    return tc_oh_build_batch(out, h, batch_id, worker_id, (size_t)n, picked, (size_t)n, NULL, 0, 0);
}

/* Bytes of a message to w besides its step maps: the topic, the envelope
 * with the longest batch id, and the steps array header at its widest. */
static int64_t envelope_bytes(tc_codec_writer *scratch, const tc_oh *h, const tc_oh_worker *w)
{
    char id[TC_OH_BATCH_ID_MAX + 1];
    memset(id, 'x', TC_OH_BATCH_ID_MAX);
    id[TC_OH_BATCH_ID_MAX] = '\0';
    build_batch(scratch, h, id, w->id, NULL, NULL, NULL, 0, NULL);
    return (int64_t)scratch->sbuf.size + 4 + (int64_t)(strlen("batch.") + strlen(w->id) + 1);
}

/* What one batch to a worker may hold: its heartbeat's limits (the core
 * fills in the defaults when it gave none, docs/protocol.md 4.5). */
typedef struct worker_limits {
    int64_t steps, bytes, depth;
    int64_t envelope; /* bytes of a batch to it besides the step maps */
} worker_limits;

static worker_limits limits_of(const tc_oh *h, const tc_oh_worker *w, tc_codec_writer *scratch)
{
    worker_limits wl = {.steps = w->max_batch_steps, .bytes = w->max_message_bytes, .depth = w->max_payload_depth};
    wl.envelope = envelope_bytes(scratch, h, w);
    return wl;
}

static int row_fits(const claimed_row *r, const worker_limits *wl)
{
    return (int64_t)r->len + wl->envelope <= wl->bytes && r->depth <= wl->depth;
}

/* The queues the sendable workers serve, and for each the free capacity
 * of the workers serving it (a worker's free capacity counts for each of
 * its queues; the claim's limit caps the total), as array literals for the
 * claim. Returns how many queues (0 for none or out of memory). */
static size_t queue_rooms(const tc_loop *l, int64_t now, sbuf *names, sbuf *rooms)
{
    size_t cap = l->oh->nworkers * TC_OH_MAX_QUEUES, n = 0;
    const char **q = cap ? malloc(cap * sizeof(*q)) : NULL;
    long *room = cap ? calloc(cap, sizeof(*room)) : NULL;
    for (size_t i = 0; q && room && i < l->oh->nworkers; i++) {
        const tc_oh_worker *w = &l->oh->workers[i];
        long f = (long)(w->capacity - (int64_t)w->used);
        if (!tc_oh_worker_sendable(l->oh, w, now) || f <= 0) continue;
        for (size_t j = 0; j < w->nqueues; j++) {
            size_t k = 0;
            while (k < n && strcmp(q[k], w->queues[j]) != 0) k++;
            if (k == n) q[n++] = w->queues[j];
            room[k] += f;
        }
    }
    sb_reset(names);
    sb_reset(rooms);
    sb_puts(names, "{");
    sb_puts(rooms, "{");
    for (size_t k = 0; q && room && k < n; k++) {
        if (k) {
            sb_puts(names, ",");
            sb_puts(rooms, ",");
        }
        sb_text_elem(names, q[k], strlen(q[k]));
        sb_printf(rooms, "%lld", (long long)room[k]);
    }
    sb_puts(names, "}");
    sb_puts(rooms, "}");
    free(q);
    free(room);
    return names->oom || rooms->oom ? 0 : n;
}

/* Up to limit ready steps from the queues named (each up to its room), of
 * which at most suspects lost TC_LOOP_SUSPECT_LOST times or more (one per
 * idle worker): a suspect with no idle worker for it stays pending,
 * unclaimed, until one is free (db/migrate/0008). Claimed straight to
 * in_progress, within the configured concurrency limits (db/migrate/0011). */
static PGresult *claim(tc_loop *l, long limit, long suspects, const char *queues, const char *rooms)
{
    char lim[24], lease[24], lost[24], sus[24];
    snprintf(lim, sizeof(lim), "%ld", limit);
    snprintf(lease, sizeof(lease), "%d", l->lease_ms);
    snprintf(lost, sizeof(lost), "%d", TC_LOOP_SUSPECT_LOST);
    snprintf(sus, sizeof(sus), "%ld", suspects);
    const char *vals[9] = {l->owner, lease, lost, sus, lim, queues, rooms, l->limited_queues, l->queue_limits};
    PGconn *c = l->db.conn;
    if (PQisnonblocking(c)) PQsetnonblocking(c, 0);
    /* Binary results: ids and attempts without parsing, bytea without
     * unescaping, arrays as length-prefixed elements. tasker_claim_queued
     * itself, not tasker_claim_steps_v4 (a SQL function around it that
     * PostgreSQL parses and plans again on every call). */
    PGresult *r = PQexecParams(c,
                               "SELECT step_id, task_id, step_name, handler, handler_config, attempt, timeout_ms, "
                               "context, dep_names, dep_outputs, lost_attempts, queue "
                               "FROM tasker_claim_queued($1, $2::int, 'in_progress', $3::int, $4::int, $5::int, "
                               "$6::text[], $7::int[], $8::text[], $9::int[])",
                               9, NULL, vals, NULL, NULL, 1);
    if (r && PQresultStatus(r) == PGRES_TUPLES_OK && PQnfields(r) == C_COUNT) return r;
    const char *state = r ? PQresultErrorField(r, PG_DIAG_SQLSTATE) : NULL;
    snprintf(l->db.sqlstate, sizeof(l->db.sqlstate), "%s", state ? state : "08006");
    snprintf(l->db.err, sizeof(l->db.err), "%s", r ? PQresultErrorMessage(r) : PQerrorMessage(c));
    PQclear(r);
    return NULL;
}

/* Fails, not retryable, the claimed steps that no live worker can take:
 * an entry over every live worker's max_message_bytes, or a payload
 * nested deeper than every live worker's max_payload_depth. Sending them
 * would cost the workers' connections (libzmq drops a connection that
 * delivers a message over ZMQ_MAXMSGSIZE) or a refusal, every time.
 * Counts them in *too_large and *too_deep. Returns the number failed. */
static int fail_unsendable(tc_loop *l, const PGresult *res, claimed_row *rows, int n, tc_codec_writer *scratch,
                           uint64_t *too_large_n, uint64_t *too_deep_n)
{
    int64_t room = -1, bytes_limit = 0;
    int depth_limit = 0;
    for (size_t i = 0; i < l->oh->nworkers; i++) {
        const tc_oh_worker *w = &l->oh->workers[i];
        if (!tc_oh_worker_live(w)) continue;
        worker_limits wl = limits_of(l->oh, w, scratch);
        if (wl.bytes - wl.envelope > room) {
            room = wl.bytes - wl.envelope;
            bytes_limit = wl.bytes;
        }
        if (wl.depth > depth_limit) depth_limit = (int)wl.depth;
    }
    if (room < 0 && depth_limit == 0) return 0; /* no live worker: nothing to measure against */
    int failed = 0;
    char msg[512];
    for (int i = 0; i < n; i++) {
        claimed_row *r = &rows[i];
        if (r->state != ROW_PENDING) continue;
        int64_t step_id = be64(PQgetvalue(res, i, C_STEP));
        const char *name = PQgetvalue(res, i, C_NAME);
        int too_large = (int64_t)r->len > room;
        const char *cls;
        if (too_large) {
            cls = "TaskerCore::PayloadTooLargeError";
            snprintf(msg, sizeof(msg),
                     "step %lld (\"%.60s\") is %zu bytes as a batch entry: over max_message_bytes %lld of every "
                     "live worker (less %lld bytes of topic and envelope)",
                     (long long)step_id, name, r->len, (long long)bytes_limit, (long long)(bytes_limit - room));
        } else if (r->depth > depth_limit) {
            cls = "TaskerCore::PayloadTooDeepError";
            snprintf(msg, sizeof(msg), "step %lld (\"%.60s\"): its %.40s nests %s%d levels, over max_payload_depth %d of "
                     "every live worker",
                     (long long)step_id, name, r->deepest, r->depth > TC_CODEC_MAX_DEPTH ? "more than " : "",
                     r->depth > TC_CODEC_MAX_DEPTH ? TC_CODEC_MAX_DEPTH : r->depth, depth_limit);
        } else {
            continue;
        }
        if (fail_step(l, step_id, be32(PQgetvalue(res, i, C_ATTEMPT)), cls, msg) != 0) continue;
        r->state = ROW_FAILED;
        if (too_large)
            (*too_large_n)++;
        else
            (*too_deep_n)++;
        failed++;
    }
    return failed;
}

/* ---- suspects waiting: draining a worker for one ---------------------------- */

#define LOOP_STR_(x) #x
#define LOOP_STR(x) LOOP_STR_(x)

/* The queues of the suspects the claim would take now, among the queues
 * in $1, found through the partial index tasker_workflow_steps_suspect
 * (db/migrate/0008: its predicate, with the constant, so the planner can
 * use it). */
#define SUSPECT_WAITING_SQL                                                                                    \
    "SELECT DISTINCT s.queue FROM tasker_workflow_steps s JOIN tasker_tasks t ON t.id = s.task_id "          \
    "WHERE s.state = 'pending' AND s.pending_parents = 0 AND s.lost_attempts >= " LOOP_STR(TC_LOOP_SUSPECT_LOST) \
    " AND s.next_attempt_at <= now() AND t.state IN ('pending', 'in_progress') AND s.queue = ANY ($1::text[])"

/* The worker drained for a suspect (at most one), or NULL. mu held. */
static tc_oh_worker *drained_worker(const tc_loop *l)
{
    for (size_t i = 0; i < l->oh->nworkers; i++)
        if (l->oh->workers[i].isolating == TC_OH_ISOLATE_DRAIN) return &l->oh->workers[i];
    return NULL;
}

/* A drained worker that is idle at a claim got the suspect from it if one
 * was waiting (suspects come first, one per idle worker); if it did not,
 * it is drained no more. mu held. */
static void end_idle_drain(tc_loop *l, int64_t now)
{
    tc_oh_worker *d = drained_worker(l);
    if (d && tc_oh_worker_idle(l->oh, d, now)) d->isolating = TC_OH_ISOLATE_NONE;
}

/* Some idle worker serves queue q. */
static int idle_serves(const tc_loop *l, const char *q, int64_t now)
{
    for (size_t i = 0; i < l->oh->nworkers; i++) {
        const tc_oh_worker *w = &l->oh->workers[i];
        if (tc_oh_worker_idle(l->oh, w, now) && tc_oh_worker_serves(w, q, strlen(q))) return 1;
    }
    return 0;
}

/* A worker that could be drained for a suspect. */
static int drainable(const tc_loop *l, const tc_oh_worker *w, int64_t now)
{
    return w->isolating == TC_OH_ISOLATE_NONE && tc_oh_worker_sendable(l->oh, w, now);
}

/* Appends to the array literal b the queues of the drained worker d, or
 * (d NULL) those of the drainable workers that no idle worker serves, each
 * once. Returns how many. */
static size_t suspect_queues(const tc_loop *l, const tc_oh_worker *d, int64_t now, sbuf *b)
{
    size_t n = 0;
    for (size_t i = 0; i < l->oh->nworkers; i++) {
        const tc_oh_worker *w = &l->oh->workers[i];
        if (d ? w != d : !drainable(l, w, now)) continue;
        for (size_t j = 0; j < w->nqueues; j++) {
            const char *q = w->queues[j];
            size_t len = strlen(q);
            if (!d && idle_serves(l, q, now)) continue;
            int seen = 0; /* already added from an earlier worker */
            for (size_t k = 0; !d && k < i && !seen; k++)
                seen = drainable(l, &l->oh->workers[k], now) && tc_oh_worker_serves(&l->oh->workers[k], q, len);
            if (seen) continue;
            if (n++) sb_puts(b, ",");
            sb_text_elem(b, q, len);
        }
    }
    return n;
}

/* w serves one of the queues in the first column of r. */
static int serves_any(const tc_oh_worker *w, const PGresult *r)
{
    for (int i = 0; i < PQntuples(r); i++)
        if (tc_oh_worker_serves(w, PQgetvalue(r, i, 0), (size_t)PQgetlength(r, i, 0))) return 1;
    return 0;
}

/* A suspect is claimed only for an idle worker serving its queue, and
 * under a steady backlog the loop refills every worker before it empties:
 * a suspect could wait for ever. So while one is ready in a queue that a
 * sendable worker serves and no idle worker does, one worker serving that
 * queue, the one with the least in flight, is drained for it: it gets no
 * new work until it is idle, and then the suspect alone (the next claim,
 * dispatch_suspects). The drain ends when the worker is lost (the core
 * clears it), stops taking work (capacity 0), or no suspect is waiting any
 * more in the queues it serves. A suspect in a queue no worker serves
 * drains nobody. One query, only when a drain is on or some served queue
 * has no idle worker: once per housekeeping interval, or after a claim
 * that came back empty with no idle worker and no drain on (at most once
 * per poll interval). */
static void check_suspects(tc_loop *l)
{
    int64_t now = tc_oh_now_ms();
    int64_t mono = tc_oh_now_ms();
    sbuf queues = {0};
    sb_puts(&queues, "{");
    pthread_mutex_lock(&l->mu);
    tc_oh_worker *d = drained_worker(l);
    if (d && (!tc_oh_worker_live(d) || d->capacity <= 0)) {
        d->isolating = TC_OH_ISOLATE_NONE;
        d = NULL;
    }
    size_t nq = suspect_queues(l, d, now, &queues);
    pthread_mutex_unlock(&l->mu);
    sb_puts(&queues, "}");
    /* Every queue a worker could be drained for has an idle worker, which
     * takes a waiting suspect with the next claim. */
    if ((!d && nq == 0) || queues.oom) {
        sb_free(&queues);
        return;
    }

    l->next_suspect_check_ms = mono + l->poll_interval_ms;
    const char *vals[1] = {queues.p};
    PGresult *r = exec_text(l, SUSPECT_WAITING_SQL, 1, vals);
    sb_free(&queues);
    if (!r) {
        db_failed(l, "suspect check");
        return;
    }
    int waiting = PQntuples(r) > 0;

    pthread_mutex_lock(&l->mu);
    /* Only this thread changes the worker table: d is still valid. */
    if (d && !waiting) {
        d->isolating = TC_OH_ISOLATE_NONE;
    } else if (!d && waiting) {
        tc_oh_worker *best = NULL;
        for (size_t i = 0; i < l->oh->nworkers; i++) {
            tc_oh_worker *w = &l->oh->workers[i];
            if (!drainable(l, w, now) || !serves_any(w, r)) continue;
            if (!best || w->used < best->used ||
                (w->used == best->used && w->last_dispatch_seq < best->last_dispatch_seq))
                best = w;
        }
        if (best) {
            best->isolating = TC_OH_ISOLATE_DRAIN;
            l->st.isolation_drains++;
        }
    }
    pthread_mutex_unlock(&l->mu);
    PQclear(r);
}

/* Sends rows idx[0..take) of the claim to worker wi as one batch and marks
 * them sent (into sent) or unsent (into l->unsent, released after). Only
 * this thread changes the handle core: it packs and sends without mu and
 * takes it only to change the worker table (reserve, record), so a reader
 * is never kept waiting behind a pack or a send. Returns 1 when libzmq
 * took the batch. */
static int send_rows(tc_loop *l, size_t wi, const PGresult *res, claimed_row *rows, const int *idx, int take,
                     const tc_codec_writer *ents, tc_codec_writer *body, tc_oh_step *steps, tc_oh_entry *picked,
                     pair_list *sent)
{
    char batch_id[TC_OH_BATCH_ID_MAX + 1];
    tc_oh_next_batch_id(l->oh, batch_id, sizeof(batch_id));
    for (int j = 0; j < take; j++) {
        steps[j].step_id = be64(PQgetvalue(res, idx[j], C_STEP));
        steps[j].task_id = be64(PQgetvalue(res, idx[j], C_TASK));
        steps[j].attempt = be32(PQgetvalue(res, idx[j], C_ATTEMPT));
    }
    int ok =
        build_batch(body, l->oh, batch_id, l->oh->workers[wi].id, ents->sbuf.data, rows, idx, take, picked) == 0;
    if (ok) {
        pthread_mutex_lock(&l->mu);
        ok = tc_oh_send_reserve(l->oh, wi, batch_id, (size_t)take) == 0;
        pthread_mutex_unlock(&l->mu);
    }
    if (ok) {
        ok = tc_oh_send_raw(l->oh, wi, body->sbuf.data, body->sbuf.size) == 0;
        int e = errno;
        pthread_mutex_lock(&l->mu);
        tc_oh_send_record(l->oh, wi, batch_id, steps, (size_t)take, ok, e);
        pthread_mutex_unlock(&l->mu);
    }
    for (int j = 0; j < take; j++) {
        rows[idx[j]].state = ok ? ROW_SENT : ROW_UNSENT;
        pairs_push(ok ? sent : &l->unsent, steps[j].step_id, steps[j].attempt);
    }
    return ok;
}

/* Each suspect step in a batch of its own to a sendable worker with nothing
 * in flight that can take it (the one drained for it first), which is then
 * isolating: it gets nothing else until the step's result or loss. A
 * suspect with no such worker stays pending and is released unsent. A
 * drained worker that is idle and got no suspect (none was claimed, or it
 * does not fit) is drained no more: it takes other work from this claim
 * on. Only this thread changes the worker table: it reads it without mu. */
static void dispatch_suspects(tc_loop *l, const PGresult *res, claimed_row *rows, int n, int *idx,
                              const tc_codec_writer *ents, tc_codec_writer *body, tc_oh_step *steps,
                              tc_oh_entry *picked, pair_list *sent, int64_t now)
{
    size_t nw = l->oh->nworkers;
    for (int i = 0; i < n; i++) {
        if (rows[i].state != ROW_PENDING || !rows[i].suspect) continue;
        int tried = 0;
        for (int drained = 1; drained >= 0 && !tried; drained--) {
            for (size_t wi = 0; wi < nw; wi++) {
                tc_oh_worker *w = &l->oh->workers[wi];
                if (drained && w->isolating != TC_OH_ISOLATE_DRAIN) continue;
                if (!tc_oh_worker_idle(l->oh, w, now) || !worker_takes(w, &rows[i])) continue;
                worker_limits wl = limits_of(l->oh, w, body);
                if (!row_fits(&rows[i], &wl)) continue;
                idx[0] = i;
                if (send_rows(l, wi, res, rows, idx, 1, ents, body, steps, picked, sent)) {
                    pthread_mutex_lock(&l->mu);
                    w->isolating = TC_OH_ISOLATE_RUN;
                    l->st.isolated++;
                    pthread_mutex_unlock(&l->mu);
                }
                tried = 1;
                break;
            }
        }
    }
    pthread_mutex_lock(&l->mu);
    end_idle_drain(l, now);
    pthread_mutex_unlock(&l->mu);
}

/* Claims what the sendable workers have room for and sends it, each
 * worker's batches within its max_batch_steps and max_message_bytes;
 * suspect steps first, each alone to an idle worker.
 * Returns 1 when the loop should go again at once (the claim was full, or
 * it queued failures to apply), else 0. */
static int claim_and_dispatch(tc_loop *l)
{
    long total_free = 0, sendable = 0, idle = 0;
    int draining = 0;
    int64_t now = tc_oh_now_ms();
    /* Only this thread changes the worker table: read without mu. */
    for (size_t i = 0; i < l->oh->nworkers; i++) {
        const tc_oh_worker *w = &l->oh->workers[i];
        if (w->isolating == TC_OH_ISOLATE_DRAIN) draining = 1;
        if (!tc_oh_worker_sendable(l->oh, w, now)) continue;
        sendable++;
        if (tc_oh_worker_idle(l->oh, w, now)) idle++;
        long f = (long)(w->capacity - (int64_t)w->used);
        if (f > 0) total_free += f;
    }
    /* Never more than the sendable workers can take: a worker in its
     * send back-off gets nothing, so nothing is claimed for it. */
    if (total_free <= 0) return 0;
    long limit = (long)l->batch_size * sendable;
    if (limit > total_free) limit = total_free;

    sbuf qnames = {0}, qrooms = {0};
    size_t nq = queue_rooms(l, now, &qnames, &qrooms);
    /* The idle workers counted here are still idle when the claim comes back. */
    PGresult *res = nq ? claim(l, limit, idle, qnames.p, qrooms.p) : NULL;
    sb_free(&qnames);
    sb_free(&qrooms);
    if (!res) {
        if (nq) db_failed(l, "tasker_claim_queued");
        return 0;
    }
    int n = PQntuples(res);
    if (n == 0) {
        PQclear(res);
        pthread_mutex_lock(&l->mu);
        end_idle_drain(l, now);
        pthread_mutex_unlock(&l->mu);
        /* Nothing claimable, and maybe a suspect held back for want of an
         * idle worker (a drain already on is checked at housekeeping). */
        if (idle == 0 && !draining && tc_oh_now_ms() >= l->next_suspect_check_ms) check_suspects(l);
        return 0;
    }

    claimed_row *rows = calloc((size_t)n, sizeof(*rows));
    int *idx = malloc((size_t)n * sizeof(*idx));
    tc_oh_step *steps = malloc((size_t)n * sizeof(*steps));
    tc_oh_entry *picked = malloc((size_t)n * sizeof(*picked));
    unsigned char *skip = calloc(l->oh->nworkers + 1, 1);
    tc_codec_writer ents, body;
    tc_codec_writer_init(&ents, 0);
    tc_codec_writer_init(&body, 0);
    pair_list sent = {0};
    int failed = 0, unfit = 0;
    uint64_t split = 0;

    /* Each step map packed once; batches are cut from these. */
    for (int i = 0; rows && i < n; i++) {
        rows[i].off = ents.sbuf.size;
        if (pack_step(&ents.pk, res, i) < 0 || ents.failed) {
            ents.sbuf.size = rows[i].off;
            ents.failed = 0;
            rows[i].state = ROW_UNSENT;
            continue;
        }
        rows[i].len = ents.sbuf.size - rows[i].off;
        rows[i].suspect = be32(PQgetvalue(res, i, C_LOST)) >= TC_LOOP_SUSPECT_LOST;
        rows[i].queue = PQgetvalue(res, i, C_QUEUE);
        rows[i].queue_len = (size_t)PQgetlength(res, i, C_QUEUE);
        rows[i].handler = PQgetvalue(res, i, C_HANDLER);
        rows[i].handler_len = (size_t)PQgetlength(res, i, C_HANDLER);
        row_depth(res, i, &rows[i]);
    }

    uint64_t too_large = 0, too_deep = 0;
    if (rows && idx && steps && picked && skip) {
        failed = fail_unsendable(l, res, rows, n, &body, &too_large, &too_deep);
        dispatch_suspects(l, res, rows, n, idx, &ents, &body, steps, picked, &sent, now);
        int first = 0; /* rows before it are all decided */
        /* Worker by worker, in the order the handle core's one selection
         * rule gives (the most free capacity, then the least recently sent
         * to), each filled with batches up to its free capacity before the
         * next, so small claims spread over the workers; a worker is
         * visited once per claim. Suspects went alone above, or wait. */
        while (first < n) {
            long wi = tc_oh_choose_worker(l->oh, 1, skip);
            if (wi < 0) break;
            skip[wi] = 1;
            tc_oh_worker *w = &l->oh->workers[wi];
            long f = (long)(w->capacity - (int64_t)w->used);
            worker_limits wl = limits_of(l->oh, w, &body);
            long per = l->batch_size < wl.steps ? l->batch_size : (long)wl.steps;
            while (f > 0 && first < n) {
                long most = f < per ? f : per;
                int take = 0;
                int64_t bytes = wl.envelope;
                /* In claim order, the steps this worker can take, until the
                 * next would overflow its max_message_bytes. */
                for (int i = first; i < n && take < most; i++) {
                    if (rows[i].state != ROW_PENDING || rows[i].suspect || !row_fits(&rows[i], &wl) ||
                        !worker_takes(w, &rows[i]))
                        continue;
                    if (bytes + (int64_t)rows[i].len > wl.bytes) {
                        split++;
                        break;
                    }
                    bytes += (int64_t)rows[i].len;
                    idx[take++] = i;
                }
                if (take == 0) break;
                int ok = send_rows(l, (size_t)wi, res, rows, idx, take, &ents, &body, steps, picked, &sent);
                while (first < n && rows[first].state != ROW_PENDING) first++;
                if (!ok) break; /* refused at the high-water mark: the core backs this worker off */
                f -= take;
            }
        }
    }
    /* Claimed and not sent: back to pending, no attempt lost. A step too
     * big or too deep for every sendable worker (but not every live one),
     * or a suspect no idle worker could take, waits for one that takes it:
     * the loop goes on at the next poll, not at once. A step whose handler
     * every live worker serving its queue refused waits longer. */
    uint64_t deferred = 0;
    for (int i = 0; rows && i < n; i++) {
        if (rows[i].state != ROW_PENDING) continue;
        int takers = 0;
        for (size_t wi = 0; wi < l->oh->nworkers && !takers; wi++)
            takers = tc_oh_worker_live(&l->oh->workers[wi]) && worker_takes(&l->oh->workers[wi], &rows[i]);
        if (takers) continue;
        rows[i].state = ROW_DEFERRED;
        pairs_push(&l->no_handler, be64(PQgetvalue(res, i, C_STEP)), be32(PQgetvalue(res, i, C_ATTEMPT)));
        deferred++;
    }
    for (int i = 0; i < n; i++) {
        if (rows && rows[i].state == ROW_PENDING) unfit = 1;
        if (!rows || rows[i].state == ROW_PENDING || rows[i].state == ROW_UNSENT)
            pairs_push(&l->unsent, be64(PQgetvalue(res, i, C_STEP)), be32(PQgetvalue(res, i, C_ATTEMPT)));
    }
    pthread_mutex_lock(&l->mu);
    l->st.claimed += (uint64_t)n;
    l->st.claim_calls++;
    l->st.failed_too_large += too_large;
    l->st.failed_too_deep += too_deep;
    l->st.dispatched += sent.n;
    l->st.batches_split_by_bytes += split;
    l->st.deferred_no_handler += deferred;
    publish_counters(l);
    pthread_mutex_unlock(&l->mu);
    tc_codec_writer_destroy(&ents);
    tc_codec_writer_destroy(&body);
    free(rows);
    free(idx);
    free(steps);
    free(picked);
    free(skip);
    PQclear(res);

    /* The claim moved the steps straight to in_progress (db/migrate/0009):
     * nothing to mark for the ones sent. */
    free(sent.v);
    release_pairs(l, &l->unsent, 0);
    PQclear(defer_pairs(l, &l->no_handler, TC_LOOP_NO_HANDLER_DELAY_MS));
    if (failed) return 1;
    return n == limit && !unfit;
}

/* ---- housekeeping -------------------------------------------------------- */

/* db/migrate/0004: the workers' socket monitor totals ride along;
 * db/migrate/0011: and the queues each serves (joined by commas). */
#define UPSERT_WORKERS_SQL                                                                                   \
    "SELECT tasker_upsert_workers($1, $2::text[], $3::text[], $4::int[], $5::int[], $6::int[], $7::float8[], " \
    "$8::int[], $9::int[], $10::text[], $11::float8[], $12::text[])"

static void upsert_workers(tc_loop *l)
{
    enum { NB = 11 };
    sbuf b[NB] = {{0}};
    for (int k = 0; k < NB; k++) sb_puts(&b[k], "{");
    int count = 0;
    /* read without mu: only this thread changes the table */
    for (size_t i = 0; i < l->oh->nworkers; i++) {
        const tc_oh_worker *w = &l->oh->workers[i];
        if (!tc_oh_worker_live(w)) continue;
        const char *sep = count++ ? "," : "";
        for (int k = 0; k < NB; k++) sb_puts(&b[k], sep);
        sb_text_elem(&b[0], w->id, strlen(w->id));
        sb_text_elem(&b[1], w->host, strlen(w->host));
        sb_printf(&b[2], "%lld", (long long)w->pid);
        sb_printf(&b[3], "%lld", (long long)w->capacity);
        sb_printf(&b[4], "%lld", (long long)w->used);
        char t[40];
        snprintf(t, sizeof(t), "%.6f", w->last_heartbeat_at);
        sb_puts(&b[5], t);
        sb_printf(&b[6], "%lld", (long long)w->connects);
        sb_printf(&b[7], "%lld", (long long)w->disconnects);
        if (w->last_connection_event[0])
            sb_text_elem(&b[8], w->last_connection_event, strlen(w->last_connection_event));
        else
            sb_puts(&b[8], "NULL");
        if (w->last_connection_event_at > 0) {
            snprintf(t, sizeof(t), "%.6f", w->last_connection_event_at);
            sb_puts(&b[9], t);
        } else {
            sb_puts(&b[9], "NULL");
        }
        sbuf joined = {0};
        for (size_t q = 0; q < w->nqueues; q++) {
            if (q) sb_puts(&joined, ",");
            sb_puts(&joined, w->queues[q]);
        }
        sb_text_elem(&b[10], joined.p ? joined.p : "default", joined.p ? joined.len : 7);
        b[10].oom |= joined.oom;
        sb_free(&joined);
    }
    int oom = 0;
    for (int k = 0; k < NB; k++) {
        sb_puts(&b[k], "}");
        oom |= b[k].oom;
    }
    if (!oom) {
        const char *vals[NB + 1] = {l->owner, b[0].p, b[1].p, b[2].p, b[3].p, b[4].p,
                                    b[5].p,   b[6].p, b[7].p, b[8].p, b[9].p, b[10].p};
        PGresult *r = exec_text(l, UPSERT_WORKERS_SQL, NB + 1, vals);
        if (r)
            PQclear(r);
        else
            db_failed(l, "tasker_upsert_workers");
    }
    for (int k = 0; k < NB; k++) sb_free(&b[k]);
}

static void housekeeping(tc_loop *l)
{
    int64_t now = tc_oh_now_ms();
    if (now < l->next_housekeeping_ms) return;
    l->next_housekeeping_ms = now + l->housekeeping_interval_ms;
    /* an expired lease is a lost attempt, never a handler failure */
    const char *vals[2] = {"1000", l->max_lost_text};
    PGresult *r = exec_text(l, "SELECT tasker_requeue_expired($1::int, $2::int)", 2, vals);
    if (r) {
        long n = atol(PQgetvalue(r, 0, 0));
        PQclear(r);
        pthread_mutex_lock(&l->mu);
        l->st.timed_out += (uint64_t)n;
        pthread_mutex_unlock(&l->mu);
    } else if (db_failed(l, "tasker_requeue_expired")) {
        return;
    }
    upsert_workers(l);
    if (l->db_up) check_suspects(l);
}

/* ---- the thread ------------------------------------------------------------ */

static void drain_notifications(tc_loop *l)
{
    if (!l->db_up || !l->listening) return;
    if (!PQconsumeInput(l->db.conn)) {
        snprintf(l->db.err, sizeof(l->db.err), "%s", PQerrorMessage(l->db.conn));
        db_failed(l, "LISTEN");
        return;
    }
    PGnotify *n;
    while ((n = PQnotifies(l->db.conn)) != NULL) PQfreemem(n);
}

static void wait_for_work(tc_loop *l)
{
    zmq_pollitem_t items[5];
    int n = 0;
    items[n++] = (zmq_pollitem_t){.socket = l->oh->batch.zsock, .events = ZMQ_POLLIN};
    items[n++] = (zmq_pollitem_t){.socket = l->oh->result.zsock, .events = ZMQ_POLLIN};
    items[n++] = (zmq_pollitem_t){.fd = l->wake[0], .events = ZMQ_POLLIN};
    int pq = -1;
    if (l->db_up && l->listening && (pq = tc_store_socket(&l->db)) >= 0)
        items[n++] = (zmq_pollitem_t){.fd = pq, .events = ZMQ_POLLIN};
    int aq = l->apply_sent ? tc_store_socket(&l->adb) : -1;
    if (aq >= 0) items[n++] = (zmq_pollitem_t){.fd = aq, .events = ZMQ_POLLIN};

    int64_t now = tc_oh_now_ms();
    long timeout = l->poll_interval_ms;
    long exp = tc_oh_next_expiry_ms(l->oh); /* only this thread changes the table */
    if (exp >= 0 && exp + 1 < timeout) timeout = exp + 1;
    if (l->db_up && l->next_housekeeping_ms - now < timeout)
        timeout = (long)(l->next_housekeeping_ms - now);
    if (!l->db_up && l->next_connect_ms - now < timeout) timeout = (long)(l->next_connect_ms - now);
    if (timeout < 0) timeout = 0;

    if (zmq_poll(items, n, timeout) <= 0) return;
    if (items[2].revents & ZMQ_POLLIN) {
        char buf[64];
        while (read(l->wake[0], buf, sizeof(buf)) > 0) {
        }
    }
    if (pq >= 0 && (items[3].revents & ZMQ_POLLIN)) drain_notifications(l);
}

static void record_latency(tc_loop *l, uint64_t us)
{
    pthread_mutex_lock(&l->mu);
    l->lat_ring[l->st.iterations % TC_LOOP_LATENCY_RING] = us;
    l->st.iterations++;
    l->lat_total_us += us;
    l->st.latency_last_us = us;
    if (us > l->st.latency_max_us) l->st.latency_max_us = us;
    pthread_mutex_unlock(&l->mu);
}

static int iterate(tc_loop *l)
{
    pthread_mutex_lock(&l->mu);
    tc_oh_poll(l->oh);
    drain_events(l);
    publish_counters(l);
    pthread_mutex_unlock(&l->mu);

    apply_collect(l, 0);
    ensure_db(l);
    if (!l->db_up) return 0;
    release_pairs(l, &l->lost, 1);
    release_pairs(l, &l->unsent, 0);
    hand_back_refused(l);
    apply_send(l);
    if (!l->db_up) return 0;
    housekeeping(l);
    if (!l->db_up) return 0;
    /* Claimed right after applying: a dependent step goes out as soon as
     * its last parent's result is in. */
    return claim_and_dispatch(l);
}

struct in_flight_ctx {
    pair_list *pl;
};

static void collect_in_flight(const tc_oh_inflight *e, void *arg)
{
    pairs_push(arg, e->step_id, e->attempt);
}

/* On stop: write back what arrived, and hand the steps still out with
 * workers back to the database, so the next orchestrator sends them again
 * now rather than after their deadline. */
static void shutdown_loop(tc_loop *l)
{
    pthread_mutex_lock(&l->mu);
    tc_oh_poll(l->oh);
    drain_events(l);
    for (size_t i = 0; i < l->oh->nworkers; i++) tc_oh_worker_each_in_flight(&l->oh->workers[i], collect_in_flight, &l->unsent);
    pthread_mutex_unlock(&l->mu);
    apply_collect(l, 1);
    if (l->napplying) apply_requeue(l);
    if (l->db_up) {
        apply_results(l);
        release_pairs(l, &l->lost, 1);
        release_pairs(l, &l->unsent, 0);
        hand_back_refused(l);
        PQclear(defer_pairs(l, &l->no_handler, TC_LOOP_NO_HANDLER_DELAY_MS));
        /* mark this orchestrator's workers disconnected */
        const char *vals[12] = {l->owner, "{}", "{}", "{}", "{}", "{}", "{}", "{}", "{}", "{}", "{}", "{}"};
        PGresult *r = exec_text(l, UPSERT_WORKERS_SQL, 12, vals);
        PQclear(r);
    }
    tc_store_close(&l->db);
    tc_store_close(&l->adb);
    l->db_up = 0;
    l->adb_up = 0;
    pthread_mutex_lock(&l->mu);
    l->st.db_connected = 0;
    pthread_mutex_unlock(&l->mu);
}

static void *loop_main(void *arg)
{
    tc_loop *l = arg;
    while (!atomic_load(&l->stop)) {
        uint64_t t0 = mono_us();
        int more = iterate(l);
        record_latency(l, mono_us() - t0);
        if (!more && !atomic_load(&l->stop)) wait_for_work(l);
    }
    shutdown_loop(l);
    return NULL;
}

/* ---- public ------------------------------------------------------------------ */

tc_loop *tc_loop_new(tc_oh *oh, const tc_loop_config *cfg, char *err, size_t errlen)
{
    tc_loop *l = calloc(1, sizeof(*l));
    if (!l) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    l->wake[0] = l->wake[1] = -1;
    l->oh = oh;
    l->conninfo = strdup(cfg->conninfo ? cfg->conninfo : "");
    l->limited_queues = strdup(cfg->limited_queues ? cfg->limited_queues : "{}");
    l->queue_limits = strdup(cfg->queue_limits ? cfg->queue_limits : "{}");
    snprintf(l->owner, sizeof(l->owner), "%s", cfg->owner ? cfg->owner : "tasker");
    l->batch_size = cfg->batch_size > 0 ? cfg->batch_size : 100;
    l->lease_ms = cfg->lease_ms >= 0 ? cfg->lease_ms : 10000;
    l->poll_interval_ms = cfg->poll_interval_ms > 0 ? cfg->poll_interval_ms : 50;
    l->housekeeping_interval_ms = cfg->housekeeping_interval_ms > 0 ? cfg->housekeeping_interval_ms : 1000;
    l->max_pending = cfg->max_pending_results ? cfg->max_pending_results : 100000;
    l->max_lost = cfg->max_lost_attempts;
    snprintf(l->max_lost_text, sizeof(l->max_lost_text), "%d", l->max_lost);
    l->backoff_ms = 50;
    pthread_mutex_init(&l->mu, NULL);
    if (l->max_lost < 1) {
        snprintf(err, errlen, "max_lost_attempts must be at least 1 (got %d)", l->max_lost);
        tc_loop_free(l);
        return NULL;
    }
    if (!l->conninfo || !l->limited_queues || !l->queue_limits || pipe2(l->wake, O_NONBLOCK | O_CLOEXEC) != 0) {
        snprintf(err, errlen, "could not set up the loop: %s", strerror(errno));
        tc_loop_free(l);
        return NULL;
    }
    return l;
}

int tc_loop_connect(tc_loop *l, char *err, size_t errlen)
{
    if (db_connect(l) != 0) {
        snprintf(err, errlen, "%s", l->db.err);
        return -1;
    }
    return 0;
}

int tc_loop_start(tc_loop *l, char *err, size_t errlen)
{
    atomic_store(&l->stop, 0);
    int rc = pthread_create(&l->thread, NULL, loop_main, l);
    if (rc != 0) {
        snprintf(err, errlen, "could not start the orchestration thread: %s", strerror(rc));
        return -1;
    }
    l->started = 1;
    l->joined = 0;
    return 0;
}

void tc_loop_request_stop(tc_loop *l)
{
    atomic_store(&l->stop, 1);
    if (l->wake[1] >= 0) {
        ssize_t w = write(l->wake[1], "x", 1);
        (void)w; /* a full pipe already wakes the loop */
    }
}

int tc_loop_join(tc_loop *l, long timeout_ms, volatile int *interrupt)
{
    if (!l->started || l->joined) return 0;
    int64_t deadline = timeout_ms < 0 ? -1 : tc_oh_now_ms() + timeout_ms;
    for (;;) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_nsec += 50 * 1000000L; /* short slices: notice interrupts */
        if (ts.tv_nsec >= 1000000000L) {
            ts.tv_sec++;
            ts.tv_nsec -= 1000000000L;
        }
        int rc = pthread_timedjoin_np(l->thread, NULL, &ts);
        if (rc == 0) {
            l->joined = 1;
            return 0;
        }
        if (interrupt && *interrupt) return -1;
        if (deadline >= 0 && tc_oh_now_ms() >= deadline) {
            errno = ETIMEDOUT;
            return -1;
        }
    }
}

int tc_loop_running(const tc_loop *l)
{
    return l && l->started && !l->joined;
}

void tc_loop_free(tc_loop *l)
{
    if (!l) return;
    tc_store_close(&l->db);
    tc_store_close(&l->adb);
    for (size_t i = 0; i < l->nresults; i++) result_free(&l->results[i]);
    free(l->results);
    for (size_t i = 0; i < l->napplying; i++) result_free(&l->applying[i]);
    free(l->applying);
    free(l->lost.v);
    free(l->unsent.v);
    free(l->conninfo);
    free(l->limited_queues);
    free(l->queue_limits);
    free(l->refused.v);
    free(l->no_handler.v);
    if (l->wake[0] >= 0) close(l->wake[0]);
    if (l->wake[1] >= 0) close(l->wake[1]);
    pthread_mutex_destroy(&l->mu);
    free(l);
}

void tc_loop_lock(tc_loop *l)
{
    pthread_mutex_lock(&l->mu);
}

void tc_loop_unlock(tc_loop *l)
{
    pthread_mutex_unlock(&l->mu);
}

void tc_loop_socket_counters(tc_loop *l, tc_socket_counters *batch, tc_socket_counters *result)
{
    *batch = l->batch_counters;
    *result = l->result_counters;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

void tc_loop_stats_snapshot(tc_loop *l, tc_loop_stats *out)
{
    uint64_t ring[TC_LOOP_LATENCY_RING];
    pthread_mutex_lock(&l->mu);
    *out = l->st;
    size_t n = l->st.iterations < TC_LOOP_LATENCY_RING ? (size_t)l->st.iterations : TC_LOOP_LATENCY_RING;
    memcpy(ring, l->lat_ring, n * sizeof(uint64_t));
    out->latency_avg_us = l->st.iterations ? (double)l->lat_total_us / (double)l->st.iterations : 0;
    pthread_mutex_unlock(&l->mu);
    if (n) {
        qsort(ring, n, sizeof(uint64_t), cmp_u64);
        out->latency_p50_us = ring[n / 2];
        out->latency_p99_us = ring[(n * 99) / 100 < n ? (n * 99) / 100 : n - 1];
    }
}
