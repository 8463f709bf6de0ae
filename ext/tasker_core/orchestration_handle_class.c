/*
 * orchestration_handle_class.c: TaskerCore::OrchestrationHandle, the Ruby
 * binding of the orchestration handle core (orchestration_handle.c).
 * Turns batch Hashes into packed bodies (codec), the core's event queue
 * into result Hashes, failures into exceptions, and waits GVL-free.
 */
#include "tasker_core.h"

#include <errno.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "codec.h"
#include "orchestration_handle.h"
#include "orchestration_loop.h"

static VALUE cHandle;

/* How long initialize waits for an endpoint that is still being released. */
#define BIND_RETRY_MS 2000.0

typedef struct oh_wrap {
    tc_oh core;
    VALUE owner; /* the thread that made it: libzmq sockets are single-threaded */
    pid_t pid;
    int initialized;
    int enabled;
    int closed;
    unsigned logged; /* bad reasons already logged, one bit each */
    VALUE logged_not_reading; /* worker id => true, bounded */
    size_t reported_memory;
    /* The native loop; kept after it stops so its stats stay readable. */
    tc_loop *loop;
} oh_wrap;

static int orchestrating(const oh_wrap *w)
{
    return w->loop && tc_loop_running(w->loop) && w->pid == getpid();
}

/* While the loop runs it is the sockets' only user. */
static void raise_if_orchestrating(oh_wrap *w, const char *what)
{
    if (orchestrating(w))
        rb_raise(tc_eError, "%s: the orchestration loop owns the sockets (stop_orchestration first)", what);
}

/* Stops a running loop from a finalizer or close: no GVL release, no raise.
 * The loop needs no Ruby, so joining with the GVL held cannot deadlock. */
static void stop_loop_now(oh_wrap *w)
{
    if (!w->loop) return;
    /* A forked child has no such thread: never join or touch it. */
    if (w->pid != getpid()) return;
    if (tc_loop_running(w->loop)) {
        tc_loop_request_stop(w->loop);
        tc_loop_join(w->loop, -1, NULL);
    }
}

static size_t core_memory(const tc_oh *h)
{
    size_t n = h->workers_cap * sizeof(tc_oh_worker) + h->ev_cap * sizeof(tc_oh_event);
    for (size_t i = 0; i < h->nworkers; i++) n += h->workers[i].nslots * sizeof(tc_oh_slot);
    for (size_t i = 0; i < h->ev_count; i++) {
        const tc_oh_event *e = &h->events[h->ev_head + i];
        n += e->len + e->n_in_flight * sizeof(tc_oh_inflight);
    }
    return n;
}

/* The core allocates with malloc, which the GC cannot see: tell it, so a
 * handle buffering many results counts towards GC pressure. */
static void sync_memory(oh_wrap *w)
{
    size_t now = core_memory(&w->core);
    if (now != w->reported_memory) {
        rb_gc_adjust_memory_usage((ssize_t)now - (ssize_t)w->reported_memory);
        w->reported_memory = now;
    }
}

static void oh_mark(void *p)
{
    oh_wrap *w = p;
    rb_gc_mark(w->owner);
    rb_gc_mark(w->logged_not_reading);
}

/* A loop inherited across fork is never freed in the child (its thread is
 * not there and its mutex may be held): it stays referenced here, so the
 * memory is kept on purpose rather than lost. */
static void **inherited_loops;
static size_t n_inherited_loops;

static void keep_inherited_loop(tc_loop *loop)
{
    void **grown = realloc(inherited_loops, (n_inherited_loops + 1) * sizeof(*grown));
    if (grown == NULL) return; /* out of memory: the loop is leaked instead */
    inherited_loops = grown;
    inherited_loops[n_inherited_loops++] = loop;
}

static void oh_free(void *p)
{
    oh_wrap *w = p;
    stop_loop_now(w);
    if (w->loop) {
        if (w->pid == getpid())
            tc_loop_free(w->loop);
        else
            keep_inherited_loop(w->loop);
    }
    /* In a forked child tc_oh_close only forgets the parent's sockets. */
    if (w->initialized && !w->closed) tc_oh_close(&w->core);
    if (w->reported_memory) rb_gc_adjust_memory_usage(-(ssize_t)w->reported_memory);
    xfree(w);
}

static size_t oh_size(const void *p)
{
    const oh_wrap *w = p;
    return sizeof(*w) + core_memory(&w->core);
}

/* Not FREE_IMMEDIATELY: freeing closes libzmq sockets. */
static const rb_data_type_t oh_type = {
    "TaskerCore::OrchestrationHandle",
    {oh_mark, oh_free, oh_size},
    0,
    0,
    0,
};

static VALUE oh_alloc(VALUE klass)
{
    oh_wrap *w;
    VALUE obj = TypedData_Make_Struct(klass, oh_wrap, &oh_type, w);
    w->owner = Qnil;
    w->logged_not_reading = Qnil;
    return obj;
}

static oh_wrap *oh_get_any(VALUE self)
{
    oh_wrap *w;
    TypedData_Get_Struct(self, oh_wrap, &oh_type, w);
    if (!w->initialized) rb_raise(tc_eConnectionError, "orchestration handle not initialized");
    return w;
}

/* The one checked accessor: closed, forked and foreign-thread handles raise. */
static oh_wrap *oh_get(VALUE self)
{
    oh_wrap *w = oh_get_any(self);
    if (w->closed) rb_raise(tc_eClosedError, "orchestration handle is closed");
    if (w->pid != getpid())
        rb_raise(tc_eForkSafetyError,
                 "orchestration handle was opened in process %ld and inherited across fork; make a new one "
                 "in this process (TaskerCore::Internal::OrchestrationManager.instance does)",
                 (long)w->pid);
    if (w->owner != rb_thread_current())
        rb_raise(tc_eThreadOwnershipError,
                 "orchestration handle used from a thread other than the one that made it "
                 "(libzmq sockets are not thread-safe)");
    return w;
}

static double now_mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static VALUE str_lit(const char *s)
{
    return rb_utf8_str_new_cstr(s);
}

/* ---- logging ------------------------------------------------------------ */

static VALUE call_logger(VALUE msg)
{
    VALUE logger = rb_funcall(tc_mTaskerCore, rb_intern("logger"), 0);
    if (!NIL_P(logger)) rb_funcall(logger, rb_intern("warn"), 1, msg);
    return Qnil;
}

/* Each kind of bad input is logged once per handle: a misbehaving peer
 * could otherwise flood the log; the counts stay in #stats. */
/* Distinct worker ids remembered for once-per-worker logging. */
#define NOT_READING_LOGGED_MAX 1024

static void log_line(VALUE msg)
{
    if (!rb_respond_to(tc_mTaskerCore, rb_intern("logger"))) return;
    int state = 0;
    rb_protect(call_logger, msg, &state);
    if (state) rb_set_errinfo(Qnil);
}

/* bad: the counts, details: the last detail of each reason (copies taken
 * under the loop's lock when it runs). */
static void log_bad_reasons(oh_wrap *w, const uint64_t *bad, const char (*details)[sizeof(w->core.bad_detail[0])])
{
    for (int r = 0; r < TC_OH_BAD_COUNT; r++) {
        if (!bad[r] || (w->logged & (1u << r))) continue;
        w->logged |= 1u << r;
        log_line(rb_sprintf("tasker_core orchestration handle: bad message on the result channel (%s): %s; "
                            "later ones of this kind are only counted in #stats",
                            tc_oh_bad_reason_name((tc_oh_bad_reason)r), details[r]));
    }
}

/* Workers dropped as not_reading, once per worker id. ids is a copy of the
 * core's list (taken under the loop's lock when the loop runs). */
static void log_not_reading(oh_wrap *w, char (*ids)[TC_OH_WORKER_ID_MAX + 1], size_t n)
{
    if (NIL_P(w->logged_not_reading)) w->logged_not_reading = rb_hash_new();
    for (size_t i = 0; i < n; i++) {
        VALUE id = str_lit(ids[i]);
        if (RTEST(rb_hash_lookup(w->logged_not_reading, id))) continue;
        if (RHASH_SIZE(w->logged_not_reading) < NOT_READING_LOGGED_MAX) rb_hash_aset(w->logged_not_reading, id, Qtrue);
        log_line(rb_sprintf("tasker_core orchestration handle: worker %s is not reading its batches (every send "
                            "refused at the high-water mark for %ld ms): dropped as not_reading, its steps are "
                            "dispatched again; it gets nothing until it subscribes again",
                            ids[i], w->core.heartbeat_timeout_ms));
    }
}

/* Takes the core's not_reading list (caller holds the loop's lock if it runs). */
static size_t take_not_reading(oh_wrap *w, char (*out)[TC_OH_WORKER_ID_MAX + 1])
{
    size_t n = w->core.n_not_reading_log;
    memcpy(out, w->core.not_reading_log, n * sizeof(*out));
    w->core.n_not_reading_log = 0;
    return n;
}

static void log_new_problems(oh_wrap *w)
{
    char ids[TC_OH_NOT_READING_LOG][TC_OH_WORKER_ID_MAX + 1];
    size_t n = take_not_reading(w, ids);
    log_not_reading(w, ids, n);
    log_bad_reasons(w, w->core.stats.bad, (const char(*)[sizeof(w->core.bad_detail[0])])w->core.bad_detail);
}

/* ---- polling and waiting ------------------------------------------------- */

static void poll_or_raise(oh_wrap *w)
{
    if (tc_oh_poll(&w->core) < 0) {
        int e = errno;
        sync_memory(w);
        rb_raise(tc_eConnectionError, "orchestration handle could not read its sockets (%s, %s): %s",
                 w->core.batch_endpoint, w->core.result_endpoint, zmq_strerror(e));
    }
    sync_memory(w);
    log_new_problems(w);
}

/* Waits for either socket, GVL-free and interruptibly; wait_ms < 0 forever. */
static void wait_sockets(oh_wrap *w, long wait_ms)
{
    tc_socket *socks[2] = {&w->core.batch, &w->core.result};
    tc_socket_wait_readable(socks, 2, wait_ms);
}

static long remaining_ms(double deadline)
{
    double left = deadline - now_mono_ms();
    return left <= 0 ? 0 : (long)(left + 0.999);
}

/* ---- initialize ---------------------------------------------------------- */

static long kw_long(VALUE v, const char *name, long dflt, long min)
{
    if (v == Qundef || NIL_P(v)) return dflt;
    if (!RB_INTEGER_TYPE_P(v)) rb_raise(rb_eArgError, "%s must be an Integer, got %" PRIsVALUE, name, rb_inspect(v));
    long n = NUM2LONG(v);
    if (n < min) rb_raise(rb_eArgError, "%s must be >= %ld, got %ld", name, min, n);
    return n;
}

static VALUE allow_keys_body(VALUE p)
{
    VALUE *a = (VALUE *)p;
    tc_curve_allow_from_ruby(RSTRING_PTR(a[0]), a[1]);
    return Qnil;
}

static VALUE oh_initialize(int argc, VALUE *argv, VALUE self)
{
    static ID ids[12];
    VALUE opts, vals[12];
    oh_wrap *w;
    TypedData_Get_Struct(self, oh_wrap, &oh_type, w);
    if (w->initialized) rb_raise(rb_eRuntimeError, "orchestration handle already initialized");

    rb_scan_args(argc, argv, ":", &opts);
    if (!ids[0]) {
        const char *names[12] = {"batch_endpoint", "result_endpoint",      "send_hwm", "recv_hwm",
                                 "linger_ms",      "heartbeat_timeout_ms", "enabled",  "curve_secret_key",
                                 "curve_allowed_client_keys", "max_message_bytes", "max_result_bytes",
                                 "max_payload_depth"};
        for (int i = 0; i < 12; i++) ids[i] = rb_intern(names[i]);
    }
    rb_get_kwargs(opts, ids, 0, 12, vals);

    int enabled = vals[6] == Qundef ? 1 : RTEST(vals[6]);
    VALUE be = vals[0] == Qundef ? Qnil : vals[0];
    VALUE re = vals[1] == Qundef ? Qnil : vals[1];
    if (enabled && (NIL_P(be) || NIL_P(re)))
        rb_raise(rb_eArgError, "batch_endpoint: and result_endpoint: are required when enabled");
    if (!NIL_P(be)) StringValueCStr(be);
    if (!NIL_P(re)) StringValueCStr(re);

    tc_oh_config cfg = {
        .batch_endpoint = NIL_P(be) ? "" : RSTRING_PTR(be),
        .result_endpoint = NIL_P(re) ? "" : RSTRING_PTR(re),
        .send_hwm = (int)kw_long(vals[2], "send_hwm", 1000, 0),
        .recv_hwm = (int)kw_long(vals[3], "recv_hwm", 1000, 0),
        .linger_ms = (int)kw_long(vals[4], "linger_ms", 0, -1),
        .heartbeat_timeout_ms = kw_long(vals[5], "heartbeat_timeout_ms", 5000, 1),
        .max_message_bytes = (int)kw_long(vals[9], "max_message_bytes", 0, 0),
        .max_result_bytes = (size_t)kw_long(vals[10], "max_result_bytes", 0, 0),
        /* config zeromq.max_payload_depth: the default there is 24 too */
        .max_payload_depth = (int)kw_long(vals[11], "max_payload_depth", 24, 1),
    };
    /* CURVE: the secret key is decoded onto the stack and wiped after the
     * sockets took it; the allow-list goes to the ZAP handler under a new
     * domain before anything binds. */
    tc_curve_server curve;
    memset(&curve, 0, sizeof(curve));
    VALUE secret = vals[7] == Qundef ? Qnil : vals[7];
    if (enabled && !NIL_P(secret)) {
        tc_curve_key_from_ruby(secret, curve.secret_key, "curve_secret_key");
        tc_curve_new_domain(curve.domain, sizeof(curve.domain));
        VALUE allow[2] = {rb_str_new_cstr(curve.domain), vals[8] == Qundef ? rb_ary_new() : vals[8]};
        int state = 0;
        rb_protect(allow_keys_body, (VALUE)allow, &state);
        if (state) {
            tc_curve_wipe(&curve, sizeof(curve));
            rb_jump_tag(state);
        }
        cfg.curve = &curve;
    }

    memset(&w->core, 0, sizeof(w->core));
    w->pid = getpid();
    w->owner = rb_thread_current();
    w->enabled = enabled;
    if (enabled) {
        char err[512] = "";
        double give_up = now_mono_ms() + BIND_RETRY_MS;
        while (tc_oh_open(&w->core, &cfg, err, sizeof(err)) < 0) {
            /* libzmq releases a closed socket's listener on its I/O thread,
             * a moment after zmq_close: a handle re-made on the same
             * endpoints (OrchestrationManager#reset!) would find the port
             * still taken. Wait a little for it, interruptibly. */
            if (errno != EADDRINUSE || now_mono_ms() >= give_up) {
                tc_curve_wipe(&curve, sizeof(curve));
                if (cfg.curve) tc_zap_forget(curve.domain);
                rb_raise(tc_eConnectionError, "orchestration handle could not start: %s", err);
            }
            memset(&w->core, 0, sizeof(w->core));
            rb_thread_wait_for((struct timeval){.tv_sec = 0, .tv_usec = 10000});
        }
    } else {
        /* Disabled: no sockets, but the configuration still reads back. */
        w->core.send_hwm = cfg.send_hwm;
        w->core.recv_hwm = cfg.recv_hwm;
        w->core.linger_ms = cfg.linger_ms;
        w->core.heartbeat_timeout_ms = cfg.heartbeat_timeout_ms;
        w->core.max_payload_depth = cfg.max_payload_depth;
        snprintf(w->core.batch_endpoint, sizeof(w->core.batch_endpoint), "%s", cfg.batch_endpoint);
        snprintf(w->core.result_endpoint, sizeof(w->core.result_endpoint), "%s", cfg.result_endpoint);
    }
    tc_curve_wipe(curve.secret_key, sizeof(curve.secret_key));
    /* receive_results hands completions over too; the loop never gets them. */
    tc_oh_set_queue_completions(&w->core, 1);
    w->initialized = 1;
    RB_GC_GUARD(be);
    RB_GC_GUARD(re);
    return self;
}

/* ---- simple readers ------------------------------------------------------ */

static VALUE oh_enabled_p(VALUE self)
{
    return oh_get_any(self)->enabled ? Qtrue : Qfalse;
}

static VALUE oh_curve_p(VALUE self)
{
    return oh_get_any(self)->core.curve ? Qtrue : Qfalse;
}

/* Swaps the allow-list (under the ZAP handler's mutex); takes effect for
 * the next handshake. Any thread may call it. */
static VALUE oh_set_allowed_client_keys(VALUE self, VALUE keys)
{
    oh_wrap *w = oh_get_any(self);
    if (!w->core.curve) rb_raise(tc_eConfigurationError, "this orchestration handle does not use CURVE");
    if (w->closed) rb_raise(tc_eClosedError, "orchestration handle is closed");
    tc_curve_allow_from_ruby(w->core.zap_domain, keys);
    return keys;
}

static VALUE oh_closed_p(VALUE self)
{
    return oh_get_any(self)->closed ? Qtrue : Qfalse;
}

static VALUE oh_zeromq_config(VALUE self)
{
    oh_wrap *w = oh_get_any(self);
    VALUE h = rb_hash_new();
    rb_hash_aset(h, str_lit("enabled"), w->enabled ? Qtrue : Qfalse);
    rb_hash_aset(h, str_lit("batch_endpoint"), str_lit(w->core.batch_endpoint));
    rb_hash_aset(h, str_lit("result_endpoint"), str_lit(w->core.result_endpoint));
    rb_hash_aset(h, str_lit("send_hwm"), INT2NUM(w->core.send_hwm));
    rb_hash_aset(h, str_lit("recv_hwm"), INT2NUM(w->core.recv_hwm));
    rb_hash_aset(h, str_lit("linger_ms"), INT2NUM(w->core.linger_ms));
    rb_hash_aset(h, str_lit("heartbeat_timeout_ms"), LONG2NUM(w->core.heartbeat_timeout_ms));
    rb_hash_aset(h, str_lit("xpub_nodrop"), Qtrue);
    rb_hash_aset(h, str_lit("xpub_manual"), Qtrue);
    rb_hash_aset(h, str_lit("curve"), w->core.curve ? Qtrue : Qfalse);
    rb_hash_aset(h, str_lit("max_message_bytes"), INT2NUM(w->core.max_message_bytes));
    rb_hash_aset(h, str_lit("max_result_bytes"), SIZET2NUM(w->core.max_result_bytes));
    rb_hash_aset(h, str_lit("max_payload_depth"), INT2NUM(w->core.max_payload_depth));
    return h;
}

static VALUE worker_hash(const tc_oh_worker *wk)
{
    VALUE h = rb_hash_new();
    double t = wk->last_heartbeat_at;
    time_t sec = (time_t)t;
    rb_hash_aset(h, str_lit("id"), str_lit(wk->id));
    rb_hash_aset(h, str_lit("capacity"), LL2NUM(wk->capacity));
    rb_hash_aset(h, str_lit("in_flight"), SIZET2NUM(wk->used));
    rb_hash_aset(h, str_lit("free"), LL2NUM(wk->capacity - (int64_t)wk->used));
    rb_hash_aset(h, str_lit("isolating"), wk->isolating == TC_OH_ISOLATE_RUN && wk->used > 0 ? Qtrue : Qfalse);
    rb_hash_aset(h, str_lit("draining_for_isolation"), wk->isolating == TC_OH_ISOLATE_DRAIN ? Qtrue : Qfalse);
    /* it refused steps as draining (sent nothing more on this connection) */
    rb_hash_aset(h, str_lit("drained"), wk->drained ? Qtrue : Qfalse);
    /* unsubscribed with steps in flight: heard until its goodbye, briefly */
    rb_hash_aset(h, str_lit("leaving"), wk->leaving_until_mono_ms ? Qtrue : Qfalse);
    rb_hash_aset(h, str_lit("pid"), LL2NUM(wk->pid));
    rb_hash_aset(h, str_lit("host"), str_lit(wk->host));
    rb_hash_aset(h, str_lit("last_heartbeat_at"), rb_time_nano_new(sec, (long)((t - (double)sec) * 1e9)));
    VALUE lim = rb_hash_new();
    rb_hash_aset(lim, str_lit("max_batch_steps"), LL2NUM(wk->max_batch_steps));
    rb_hash_aset(lim, str_lit("max_message_bytes"), LL2NUM(wk->max_message_bytes));
    rb_hash_aset(lim, str_lit("max_payload_depth"), LL2NUM(wk->max_payload_depth));
    rb_hash_aset(h, str_lit("limits"), lim);
    VALUE queues = rb_ary_new_capa((long)wk->nqueues);
    for (size_t i = 0; i < wk->nqueues; i++) rb_ary_push(queues, str_lit(wk->queues[i]));
    rb_hash_aset(h, str_lit("queues"), queues);
    rb_hash_aset(h, str_lit("connects"), LL2NUM(wk->connects));
    rb_hash_aset(h, str_lit("disconnects"), LL2NUM(wk->disconnects));
    rb_hash_aset(h, str_lit("last_connection_event"),
                 wk->last_connection_event[0] ? str_lit(wk->last_connection_event) : Qnil);
    double ct = wk->last_connection_event_at;
    time_t csec = (time_t)ct;
    rb_hash_aset(h, str_lit("last_connection_event_at"),
                 ct > 0 ? rb_time_nano_new(csec, (long)((ct - (double)csec) * 1e9)) : Qnil);
    return h;
}

/* ---- reading the loop's state ------------------------------------------- */

/* Readers of the loop's state copy it under the loop's lock with the GVL
 * released: waiting for the lock never stops other Ruby threads, and the
 * copy (plain C, no allocation that could leak on an interrupt) is turned
 * into Ruby objects afterwards. */
struct locked_read {
    tc_loop *loop;
    void (*copy)(void *);
    void *arg;
};

static void *locked_read_nogvl(void *p)
{
    struct locked_read *a = p;
    tc_loop_lock(a->loop);
    a->copy(a->arg);
    tc_loop_unlock(a->loop);
    return NULL;
}

/* The lock is held only around the loop's short table changes: a wait for
 * it is not interruptible, and need not be. */
static void read_loop_state(tc_loop *loop, void (*copy)(void *), void *arg)
{
    struct locked_read a = {loop, copy, arg};
    rb_thread_call_without_gvl(locked_read_nogvl, &a, RUBY_UBF_IO, NULL);
}

/* Live workers copied into buf (room for cap); n is how many there are. */
struct workers_copy {
    const tc_oh *core;
    tc_oh_worker *buf;
    size_t cap, n;
};

static void copy_workers(void *p)
{
    struct workers_copy *c = p;
    c->n = 0;
    for (size_t i = 0; i < c->core->nworkers; i++) {
        const tc_oh_worker *wk = &c->core->workers[i];
        if (!tc_oh_worker_live(wk)) continue;
        if (c->n < c->cap) {
            c->buf[c->n] = *wk;
            c->buf[c->n].slots = NULL;
        }
        c->n++;
    }
}

/* Polls first so the table is current without a receive_results call;
 * results read meanwhile stay queued for receive_results. */
static VALUE oh_workers(VALUE self)
{
    oh_wrap *w = oh_get_any(self);
    /* Any thread may read the table while the loop owns the sockets. */
    if (!orchestrating(w)) w = oh_get(self);
    VALUE ary = rb_ary_new();
    if (!w->enabled) return ary;
    if (orchestrating(w)) {
        /* The loop keeps the table current; copy it under its lock into
         * a GC-owned buffer, growing it while the table outgrew it. */
        struct workers_copy c = {.core = &w->core, .cap = 8};
        VALUE buf;
        for (;;) {
            buf = rb_str_buf_new((long)(c.cap * sizeof(tc_oh_worker)));
            c.buf = (tc_oh_worker *)RSTRING_PTR(buf);
            read_loop_state(w->loop, copy_workers, &c);
            if (c.n <= c.cap) break;
            c.cap = c.n + 8;
        }
        for (size_t i = 0; i < c.n; i++) rb_ary_push(ary, worker_hash(&c.buf[i]));
        RB_GC_GUARD(buf);
        return ary;
    }
    poll_or_raise(w);
    for (size_t i = 0; i < w->core.nworkers; i++)
        if (tc_oh_worker_live(&w->core.workers[i])) rb_ary_push(ary, worker_hash(&w->core.workers[i]));
    return ary;
}

static VALUE socket_counters(const tc_socket_counters *c)
{
    VALUE h = rb_hash_new();
    rb_hash_aset(h, ID2SYM(rb_intern("messages_sent")), ULL2NUM(c->messages_sent));
    rb_hash_aset(h, ID2SYM(rb_intern("bytes_sent")), ULL2NUM(c->bytes_sent));
    rb_hash_aset(h, ID2SYM(rb_intern("messages_received")), ULL2NUM(c->messages_received));
    rb_hash_aset(h, ID2SYM(rb_intern("bytes_received")), ULL2NUM(c->bytes_received));
    rb_hash_aset(h, ID2SYM(rb_intern("send_dropped")), ULL2NUM(c->send_dropped));
    return h;
}

#define SYM(s) ID2SYM(rb_intern(s))

static VALUE loop_stats_hash(tc_loop *l);

struct stats_copy {
    oh_wrap *w;
    tc_oh_stats stats;
    tc_socket_counters bc, rc;
    char ids[TC_OH_NOT_READING_LOG][TC_OH_WORKER_ID_MAX + 1];
    size_t nids;
    char details[TC_OH_BAD_COUNT][sizeof(((tc_oh *)0)->bad_detail[0])];
};

static void copy_stats(void *p)
{
    struct stats_copy *c = p;
    c->stats = c->w->core.stats;
    tc_loop_socket_counters(c->w->loop, &c->bc, &c->rc);
    c->nids = take_not_reading(c->w, c->ids);
    memcpy(c->details, c->w->core.bad_detail, sizeof(c->details));
}

static VALUE oh_stats(VALUE self)
{
    oh_wrap *w = oh_get_any(self);
    struct stats_copy c = {.w = w, .stats = w->core.stats, .bc = w->core.batch.counters,
                           .rc = w->core.result.counters};
    if (orchestrating(w)) {
        read_loop_state(w->loop, copy_stats, &c);
        /* While the loop runs, stats is where its problems get logged (a
         * poller calls it); each bad reason and not_reading worker once. */
        log_not_reading(w, c.ids, c.nids);
        log_bad_reasons(w, c.stats.bad, (const char(*)[sizeof(w->core.bad_detail[0])])c.details);
    }
    tc_oh_stats copy = c.stats;
    tc_socket_counters bc = c.bc, rc = c.rc;
    const tc_oh_stats *st = &copy;
    VALUE h = rb_hash_new(), results = rb_hash_new(), bad = rb_hash_new();
    rb_hash_aset(h, SYM("batches_published"), ULL2NUM(st->batches_published));
    rb_hash_aset(h, SYM("steps_published"), ULL2NUM(st->steps_published));
    rb_hash_aset(results, SYM("partial_result"), ULL2NUM(st->partial_results));
    rb_hash_aset(results, SYM("partial_results"), ULL2NUM(st->partial_results_messages));
    rb_hash_aset(results, SYM("batch_completion"), ULL2NUM(st->batch_completions));
    rb_hash_aset(h, SYM("results_received"), results);
    rb_hash_aset(h, SYM("heartbeats"), ULL2NUM(st->heartbeats));
    rb_hash_aset(h, SYM("goodbyes"), ULL2NUM(st->goodbyes));
    rb_hash_aset(h, SYM("subscriptions"), ULL2NUM(st->subscriptions));
    rb_hash_aset(h, SYM("unsubscriptions"), ULL2NUM(st->unsubscriptions));
    rb_hash_aset(h, SYM("workers_lost"), ULL2NUM(st->workers_lost));
    rb_hash_aset(h, SYM("send_refused"), ULL2NUM(st->send_refused));
    rb_hash_aset(h, SYM("steps_released_by_completion"), ULL2NUM(st->steps_released_by_completion));
    rb_hash_aset(h, SYM("worker_table_full"), ULL2NUM(st->worker_table_full));
    rb_hash_aset(h, SYM("subscriptions_refused"), ULL2NUM(st->subscriptions_refused));
    rb_hash_aset(h, SYM("workers_not_reading"), ULL2NUM(st->workers_not_reading));
    rb_hash_aset(h, SYM("refusals"), ULL2NUM(st->refusals));
    rb_hash_aset(h, SYM("steps_reconciled"), ULL2NUM(st->steps_reconciled));
    for (int r = 0; r < TC_OH_BAD_COUNT; r++)
        rb_hash_aset(bad, SYM(tc_oh_bad_reason_name((tc_oh_bad_reason)r)), ULL2NUM(st->bad[r]));
    rb_hash_aset(h, SYM("bad_messages"), bad);
    if (w->core.curve) {
        tc_zap_counts zc = tc_zap_domain_counts(w->core.zap_domain);
        VALUE zh = rb_hash_new();
        rb_hash_aset(zh, SYM("allowed"), ULL2NUM(zc.allowed));
        rb_hash_aset(zh, SYM("denied"), ULL2NUM(zc.denied));
        rb_hash_aset(h, SYM("handshakes"), zh);
    }
    rb_hash_aset(h, SYM("batch_socket"), socket_counters(&bc));
    rb_hash_aset(h, SYM("result_socket"), socket_counters(&rc));
    if (w->loop && w->pid == getpid()) {
        VALUE ls = loop_stats_hash(w->loop);
        rb_hash_aset(h, str_lit("loop"), ls);
        rb_hash_aset(h, SYM("loop"), ls);
    }
    return h;
}

/* ---- publish_batch ------------------------------------------------------- */

static int64_t step_int(VALUE step, const char *key, long index, int64_t min)
{
    VALUE v = rb_hash_aref(step, str_lit(key));
    if (!RB_INTEGER_TYPE_P(v))
        rb_raise(rb_eArgError, "batch step %ld: \"%s\" must be an Integer, got %" PRIsVALUE, index, key,
                 rb_inspect(v));
    int64_t n = NUM2LL(v);
    if (n < min) rb_raise(rb_eArgError, "batch step %ld: \"%s\" must be >= %lld", index, key, (long long)min);
    return n;
}

/* The caller's other batch keys; the envelope the builder writes (its
 * limits included) wins over anything the caller put there. */
static int copy_other_keys(VALUE key, VALUE val, VALUE arg)
{
    VALUE name = RB_SYMBOL_P(key) ? rb_sym2str(key) : key;
    if (!RB_TYPE_P(name, T_STRING) || !tc_oh_batch_key(RSTRING_PTR(name), (size_t)RSTRING_LEN(name)))
        rb_hash_aset(arg, key, val);
    return ST_CONTINUE;
}

/* Bytes of a packed map's or array's header. */
static long header_len(VALUE packed)
{
    unsigned char b = (unsigned char)RSTRING_PTR(packed)[0];
    return (b == 0xde || b == 0xdc) ? 3 : (b == 0xdf || b == 0xdd) ? 5 : 1;
}

static VALUE no_workers_error(oh_wrap *w, size_t nsteps)
{
    VALUE desc = rb_str_new_cstr("");
    long live = 0;
    for (size_t i = 0; i < w->core.nworkers; i++) {
        const tc_oh_worker *wk = &w->core.workers[i];
        if (!tc_oh_worker_live(wk)) continue;
        if (live < 10)
            rb_str_catf(desc, "%s%s=%lld/%lld", live ? ", " : "", wk->id,
                        (long long)(wk->capacity - (int64_t)wk->used), (long long)wk->capacity);
        live++;
    }
    if (live > 10) rb_str_catf(desc, ", and %ld more", live - 10);
    return rb_exc_new_str(tc_eNoWorkersError,
                          rb_sprintf("no live worker can take a batch of %zu step(s): %ld live worker(s)%s%" PRIsVALUE
                                     "%s",
                                     nsteps, live, live ? " (free/capacity: " : "", desc, live ? ")" : ""));
}

/* The optional timeout_ms: keyword (the only one these methods take), or dflt. */
static VALUE timeout_kwarg(VALUE opts, VALUE dflt)
{
    static ID id_timeout;
    VALUE v = Qundef;
    if (NIL_P(opts))
        return dflt;
    if (!id_timeout)
        id_timeout = rb_intern("timeout_ms");
    rb_get_kwargs(opts, &id_timeout, 0, 1, &v);
    return v == Qundef ? dflt : v;
}

/*
 * publish_batch(batch, timeout_ms: nil) -> worker id
 * Sends the batch to one worker's topic, built by the handle core's batch
 * builder, the one the loop uses: the envelope with this handle's limits,
 * then the caller's other keys, then batch["steps"] packed once. Without a worker that can take it,
 * raises NoWorkersError at once (timeout_ms nil or 0) or after waiting up
 * to timeout_ms, reading heartbeats, subscriptions and results meanwhile
 * (results stay queued for receive_results). A send refused at the
 * high-water mark is retried within timeout_ms and then raised as
 * ConnectionError; nothing is recorded in flight unless libzmq took it.
 */
static VALUE oh_publish_batch(int argc, VALUE *argv, VALUE self)
{
    VALUE batch, opts;
    rb_scan_args(argc, argv, "1:", &batch, &opts);
    VALUE tmo = timeout_kwarg(opts, Qnil);
    oh_wrap *w = oh_get_any(self);
    raise_if_orchestrating(w, "publish_batch");
    w = oh_get(self);
    if (!w->enabled)
        rb_raise(tc_eConfigurationError, "ZeroMQ is disabled (zeromq.enabled is false): no batch can be published");
    long timeout_ms = kw_long(tmo, "timeout_ms", 0, 0);

    Check_Type(batch, T_HASH);
    VALUE steps = rb_hash_aref(batch, str_lit("steps"));
    if (!RB_TYPE_P(steps, T_ARRAY) || RARRAY_LEN(steps) == 0)
        rb_raise(rb_eArgError, "batch[\"steps\"] must be a non-empty Array");
    long n = RARRAY_LEN(steps);

    VALUE steps_tmp;
    tc_oh_step *cs = ALLOCV_N(tc_oh_step, steps_tmp, n);
    for (long i = 0; i < n; i++) {
        VALUE st = RARRAY_AREF(steps, i);
        if (!RB_TYPE_P(st, T_HASH)) rb_raise(rb_eArgError, "batch step %ld must be a Hash", i);
        cs[i].step_id = step_int(st, "step_id", i, INT64_MIN);
        cs[i].task_id = step_int(st, "task_id", i, INT64_MIN);
        cs[i].attempt = step_int(st, "attempt", i, 1);
    }
    /* The step maps packed once, as one piece after the array header,
     * spliced by the one batch builder. */
    VALUE packed = tc_codec_pack(steps);
    long steps_skip = header_len(packed);
    tc_oh_entry piece = {RSTRING_PTR(packed) + steps_skip, (size_t)(RSTRING_LEN(packed) - steps_skip)};
    VALUE others = rb_hash_new();
    rb_hash_foreach(batch, copy_other_keys, others);
    size_t nextra = (size_t)RHASH_SIZE(others);
    VALUE extra = nextra ? tc_codec_pack(others) : Qnil;
    long extra_skip = nextra ? header_len(extra) : 0;

    VALUE batch_id = rb_hash_aref(batch, str_lit("batch_id"));
    if (NIL_P(batch_id)) {
        char buf[TC_OH_BATCH_ID_MAX + 1];
        tc_oh_next_batch_id(&w->core, buf, sizeof(buf));
        batch_id = str_lit(buf);
    } else {
        StringValueCStr(batch_id);
        if (RSTRING_LEN(batch_id) == 0 || RSTRING_LEN(batch_id) > TC_OH_BATCH_ID_MAX)
            rb_raise(rb_eArgError, "batch_id must be 1..%d bytes", TC_OH_BATCH_ID_MAX);
    }

    double deadline = now_mono_ms() + (double)timeout_ms;
    for (;;) {
        poll_or_raise(w);
        long idx = tc_oh_choose_worker(&w->core, (size_t)n, NULL);
        if (idx < 0) {
            long left = remaining_ms(deadline);
            if (left <= 0) rb_exc_raise(no_workers_error(w, (size_t)n));
            wait_sockets(w, left);
            continue;
        }
        VALUE worker_id = str_lit(w->core.workers[idx].id);
        /* Plain C from init to destroy: nothing raises in between. */
        tc_codec_writer body;
        int sent = -1, e = ENOMEM;
        if (tc_codec_writer_init(&body, 0) == 0) {
            if (tc_oh_build_batch(&body, &w->core, RSTRING_PTR(batch_id), w->core.workers[idx].id, (size_t)n, &piece, 1,
                                  nextra ? RSTRING_PTR(extra) + extra_skip : NULL,
                                  nextra ? (size_t)(RSTRING_LEN(extra) - extra_skip) : 0, nextra) == 0) {
                sent = tc_oh_send_batch(&w->core, (size_t)idx, RSTRING_PTR(batch_id), cs, (size_t)n, body.sbuf.data,
                                        body.sbuf.size);
                e = errno;
            }
            tc_codec_writer_destroy(&body);
        }
        if (sent == 0) {
            sync_memory(w);
            ALLOCV_END(steps_tmp);
            RB_GC_GUARD(packed);
            RB_GC_GUARD(extra);
            return worker_id;
        }
        if (e == EAGAIN) {
            long left = remaining_ms(deadline);
            if (left <= 0)
                rb_raise(tc_eConnectionError,
                         "batch %" PRIsVALUE " refused at the send high-water mark (%d) of %s for worker %" PRIsVALUE
                         " (worker not reading; counted in stats[:send_refused])",
                         batch_id, w->core.send_hwm, w->core.batch_endpoint, worker_id);
            /* The XPUB gives no writable signal per pipe: re-poll soon,
             * maybe choosing another worker. */
            wait_sockets(w, left < 10 ? left : 10);
            continue;
        }
        rb_raise(tc_eConnectionError, "could not send batch %" PRIsVALUE " on %s: %s", batch_id,
                 w->core.batch_endpoint, e == ENOMEM ? "out of memory tracking its steps" : zmq_strerror(e));
    }
}

/* ---- receive_results ------------------------------------------------------ */

struct unpack_arg {
    const char *buf;
    size_t len;
};

static VALUE unpack_body(VALUE p)
{
    const struct unpack_arg *a = (const struct unpack_arg *)p;
    return tc_codec_unpack(a->buf, a->len, 0);
}

/* worker_lost: the worker is gone (unsubscribed, heartbeat_timeout,
 * goodbye, not_reading) with its steps; steps_lost: steps taken back from a
 * worker that stays (reconciled, refused, unknown_handler, draining); steps_failed:
 * steps it refused for good (error_class, message). */
static VALUE lost_hash(const tc_oh_event *e)
{
    VALUE h = rb_hash_new(), list = rb_ary_new_capa((long)e->n_in_flight);
    int steps_only =
        !strcmp(e->reason, "reconciled") || !strcmp(e->reason, "refused") || !strcmp(e->reason, "unknown_handler") ||
        !strcmp(e->reason, "draining");
    rb_hash_aset(h, str_lit("type"), str_lit(e->kind == TC_OH_EV_FAIL ? "steps_failed"
                                             : steps_only           ? "steps_lost"
                                                                    : "worker_lost"));
    if (e->kind == TC_OH_EV_FAIL) {
        rb_hash_aset(h, str_lit("error_class"), str_lit(e->error_class));
        rb_hash_aset(h, str_lit("message"), rb_utf8_str_new_cstr(e->message));
    }
    rb_hash_aset(h, str_lit("worker_id"), str_lit(e->worker_id));
    rb_hash_aset(h, str_lit("reason"), str_lit(e->reason));
    for (size_t i = 0; i < e->n_in_flight; i++) {
        const tc_oh_inflight *f = &e->in_flight[i];
        VALUE s = rb_hash_new();
        rb_hash_aset(s, str_lit("batch_id"), str_lit(f->batch_id));
        rb_hash_aset(s, str_lit("step_id"), LL2NUM(f->step_id));
        rb_hash_aset(s, str_lit("task_id"), LL2NUM(f->task_id));
        rb_hash_aset(s, str_lit("attempt"), LL2NUM(f->attempt));
        rb_ary_push(list, s);
    }
    rb_hash_aset(h, str_lit("in_flight"), list);
    return h;
}

/* Each event leaves the core's queue only once its Ruby object exists, so
 * an exception here leaks nothing and loses nothing. */
static VALUE drain_events(oh_wrap *w)
{
    VALUE out = rb_ary_new();
    tc_oh_event *e;
    while ((e = tc_oh_event_peek(&w->core)) != NULL) {
        if (e->kind == TC_OH_EV_LOST || e->kind == TC_OH_EV_FAIL) {
            rb_ary_push(out, lost_hash(e));
        } else {
            struct unpack_arg a = {e->body, e->len};
            int state = 0;
            VALUE obj = rb_protect(unpack_body, (VALUE)&a, &state);
            if (state || !RB_TYPE_P(obj, T_HASH)) {
                /* msgpack-c took it, the codec did not (depth, extension types). */
                rb_set_errinfo(Qnil);
                tc_oh_count_bad(&w->core, TC_OH_BAD_UNDECODABLE, "a %zu-byte body the codec could not unpack",
                                e->len);
            } else {
                rb_ary_push(out, obj);
            }
        }
        tc_oh_event_pop(&w->core);
    }
    sync_memory(w);
    log_new_problems(w);
    return out;
}

/*
 * receive_results(timeout_ms: 0) -> [Hash, ...]
 * timeout_ms 0 returns what is ready; > 0 waits until at least one result
 * (or worker_lost) is available or the time passes; nil waits forever.
 */
static VALUE oh_receive_results(int argc, VALUE *argv, VALUE self)
{
    VALUE opts;
    rb_scan_args(argc, argv, ":", &opts);
    VALUE tmo = timeout_kwarg(opts, INT2FIX(0));
    oh_wrap *w = oh_get_any(self);
    raise_if_orchestrating(w, "receive_results");
    w = oh_get(self);
    if (!w->enabled) return rb_ary_new();
    int forever = NIL_P(tmo);
    long timeout_ms = kw_long(tmo, "timeout_ms", 0, 0);
    double deadline = now_mono_ms() + (double)timeout_ms;

    for (;;) {
        poll_or_raise(w);
        if (tc_oh_event_peek(&w->core)) break;
        long left = forever ? -1 : remaining_ms(deadline);
        if (left == 0) break;
        /* Wake for the next heartbeat expiry too: a lost worker is a result. */
        long exp = tc_oh_next_expiry_ms(&w->core);
        if (exp >= 0 && (left < 0 || exp + 1 < left)) left = exp + 1;
        wait_sockets(w, left);
    }
    return drain_events(w);
}

/* ---- close ------------------------------------------------------------------ */

/* Idempotent. In a forked child it only forgets the parent's sockets (no
 * raise: at_exit clean-up in a child must not fail). */
static VALUE oh_close(VALUE self)
{
    oh_wrap *w = oh_get_any(self);
    if (w->closed) return Qnil;
    if (w->pid == getpid() && w->owner != rb_thread_current() && !orchestrating(w))
        rb_raise(tc_eThreadOwnershipError, "orchestration handle closed from a thread other than its owner");
    if (orchestrating(w)) rb_funcall(self, rb_intern("stop_orchestration"), 0);
    w->closed = 1;
    if (w->enabled) tc_oh_close(&w->core);
    sync_memory(w);
    return Qnil;
}

/* ---- the native orchestration loop ------------------------------------------ */

struct loop_stats_arg {
    tc_loop *l;
    tc_loop_stats *st;
};

static void *loop_stats_nogvl(void *p)
{
    struct loop_stats_arg *a = p;
    tc_loop_stats_snapshot(a->l, a->st);
    return NULL;
}

static VALUE loop_stats_hash(tc_loop *l)
{
    tc_loop_stats st;
    struct loop_stats_arg a = {l, &st};
    rb_thread_call_without_gvl(loop_stats_nogvl, &a, RUBY_UBF_IO, NULL);
    VALUE h = rb_hash_new();
#define LS(name, v) rb_hash_aset(h, str_lit(name), ULL2NUM(v))
    LS("claimed", st.claimed);
    LS("dispatched", st.dispatched);
    LS("completed", st.completed);
    LS("failed", st.failed);
    LS("retried", st.retried);
    LS("redispatched", st.redispatched);
    LS("lost_failed", st.lost_failed);
    LS("failed_too_large", st.failed_too_large);
    LS("failed_too_deep", st.failed_too_deep);
    LS("failed_refused", st.failed_refused);
    LS("batches_split_by_bytes", st.batches_split_by_bytes);
    LS("isolated", st.isolated);
    LS("isolation_drains", st.isolation_drains);
    LS("handed_back_unknown_handler", st.handed_back_unknown_handler);
    LS("handed_back_draining", st.handed_back_draining);
    LS("deferred_no_handler", st.deferred_no_handler);
    LS("released", st.released);
    LS("timed_out", st.timed_out);
    LS("stale_results", st.stale_results);
    LS("applied_results", st.applied_results);
    LS("results_dropped", st.results_dropped);
    LS("pending_results", st.pending_results);
    LS("db_reconnects", st.db_reconnects);
    LS("db_errors", st.db_errors);
    LS("claim_calls", st.claim_calls);
    LS("apply_calls", st.apply_calls);
    LS("loop_iterations", st.iterations);
    LS("loop_latency_us_last", st.latency_last_us);
    LS("loop_latency_us_max", st.latency_max_us);
    LS("loop_latency_us_p50", st.latency_p50_us);
    LS("loop_latency_us_p99", st.latency_p99_us);
#undef LS
    rb_hash_aset(h, str_lit("loop_latency_us_avg"), DBL2NUM(st.latency_avg_us));
    rb_hash_aset(h, str_lit("db_connected"), st.db_connected ? Qtrue : Qfalse);
    rb_hash_aset(h, str_lit("running"), tc_loop_running(l) ? Qtrue : Qfalse);
    rb_hash_aset(h, str_lit("last_db_error"), st.last_db_error[0] ? str_lit(st.last_db_error) : Qnil);
    return h;
}

struct connect_arg {
    tc_loop *loop;
    int rc;
    char err[1024];
};

static void *connect_nogvl(void *p)
{
    struct connect_arg *a = p;
    a->rc = tc_loop_connect(a->loop, a->err, sizeof(a->err));
    return NULL;
}

/*
 * _start_orchestration(database_url, owner, batch_size, lease_ms, poll_interval_ms, max_lost_attempts,
 *                      limited_queues, queue_limits) -> self
 * (the last two: PostgreSQL array literals, text[] and int[], of the
 * queues with a concurrency limit and their limits)
 * (start_orchestration in lib/tasker_core/orchestration_loop.rb fills in
 * the defaults.) Connects first, so a bad URL raises StoreError here
 * rather than retrying forever in the thread.
 */
static VALUE oh_start_orchestration(VALUE self, VALUE url, VALUE owner, VALUE batch_size, VALUE lease_ms,
                                    VALUE poll_ms, VALUE max_lost, VALUE limited_queues, VALUE queue_limits)
{
    oh_wrap *w = oh_get(self);
    if (!w->enabled)
        rb_raise(tc_eConfigurationError, "ZeroMQ is disabled (zeromq.enabled is false): nothing to orchestrate");
    if (orchestrating(w)) rb_raise(tc_eError, "the orchestration loop is already running");
    StringValueCStr(url);
    StringValueCStr(owner);
    StringValueCStr(limited_queues);
    StringValueCStr(queue_limits);
    if (RSTRING_LEN(owner) == 0 || RSTRING_LEN(owner) > TC_LOOP_OWNER_MAX)
        rb_raise(rb_eArgError, "owner must be 1..%d bytes", TC_LOOP_OWNER_MAX);
    tc_loop_config cfg = {
        .conninfo = RSTRING_PTR(url),
        .owner = RSTRING_PTR(owner),
        .batch_size = (int)kw_long(batch_size, "batch_size", 100, 1),
        .lease_ms = (int)kw_long(lease_ms, "lease_ms", 10000, 0),
        .poll_interval_ms = (int)kw_long(poll_ms, "poll_interval_ms", 50, 1),
        .max_lost_attempts = NUM2INT(max_lost),
        .limited_queues = RSTRING_PTR(limited_queues),
        .queue_limits = RSTRING_PTR(queue_limits),
    };
    if (cfg.max_lost_attempts < 1) rb_raise(rb_eArgError, "max_lost_attempts must be at least 1");
    if (w->loop) {
        tc_loop_free(w->loop);
        w->loop = NULL;
    }
    char err[512];
    tc_oh_set_queue_completions(&w->core, 0);
    tc_loop *l = tc_loop_new(&w->core, &cfg, err, sizeof(err));
    if (!l) {
        tc_oh_set_queue_completions(&w->core, 1);
        rb_raise(tc_eError, "%s", err);
    }
    struct connect_arg a = {.loop = l};
    rb_thread_call_without_gvl(connect_nogvl, &a, RUBY_UBF_IO, NULL);
    if (a.rc != 0) {
        tc_loop_free(l);
        tc_oh_set_queue_completions(&w->core, 1);
        rb_raise(tc_eStoreError, "orchestration loop could not connect: %s", a.err);
    }
    if (tc_loop_start(l, err, sizeof(err)) != 0) {
        tc_loop_free(l);
        tc_oh_set_queue_completions(&w->core, 1);
        rb_raise(tc_eError, "%s", err);
    }
    w->loop = l;
    RB_GC_GUARD(url);
    RB_GC_GUARD(owner);
    return self;
}

struct join_arg {
    tc_loop *loop;
    long timeout_ms;
    volatile int interrupted;
    int rc;
};

static void *join_nogvl(void *p)
{
    struct join_arg *a = p;
    a->rc = tc_loop_join(a->loop, a->timeout_ms, &a->interrupted);
    return NULL;
}

/* Ctrl-C / Thread#kill: stop asking to wait; the loop was already told to stop. */
static void join_ubf(void *p)
{
    struct join_arg *a = p;
    a->interrupted = 1;
    tc_loop_request_stop(a->loop);
}

/*
 * stop_orchestration(timeout_ms: 10_000) -> true
 * Stops the loop (it writes back the results it has, and releases the steps
 * still out with workers) and joins it with the GVL released; the sockets
 * then belong to the calling thread. Raises TaskerCore::Error when the loop
 * did not stop in time (it keeps stopping; call again to wait more).
 */
static VALUE oh_stop_orchestration(int argc, VALUE *argv, VALUE self)
{
    VALUE opts, tmo = Qundef;
    rb_scan_args(argc, argv, ":", &opts);
    if (!NIL_P(opts)) {
        static ID id_timeout;
        if (!id_timeout) id_timeout = rb_intern("timeout_ms");
        rb_get_kwargs(opts, &id_timeout, 0, 1, &tmo);
    }
    oh_wrap *w = oh_get_any(self);
    if (w->pid != getpid())
        rb_raise(tc_eForkSafetyError, "the orchestration loop belongs to process %ld, not this forked child",
                 (long)w->pid);
    long timeout_ms = kw_long(tmo, "timeout_ms", 10000, 0);
    if (!orchestrating(w)) return Qtrue;
    struct join_arg a = {.loop = w->loop, .timeout_ms = timeout_ms};
    tc_loop_request_stop(w->loop);
    rb_thread_call_without_gvl(join_nogvl, &a, join_ubf, &a);
    if (a.rc != 0) {
        rb_thread_check_ints();
        rb_raise(tc_eError, "the orchestration loop did not stop within %ld ms", timeout_ms);
    }
    w->owner = rb_thread_current();
    tc_oh_set_queue_completions(&w->core, 1);
    return Qtrue;
}

static VALUE oh_orchestrating_p(VALUE self)
{
    return orchestrating(oh_get_any(self)) ? Qtrue : Qfalse;
}

void tc_init_orchestration_handle(void)
{
    cHandle = rb_define_class_under(tc_mTaskerCore, "OrchestrationHandle", rb_cObject);
    rb_define_alloc_func(cHandle, oh_alloc);
    rb_define_method(cHandle, "initialize", oh_initialize, -1);
    rb_define_method(cHandle, "zeromq_enabled?", oh_enabled_p, 0);
    rb_define_alias(cHandle, "is_zeromq_enabled", "zeromq_enabled?");
    rb_define_method(cHandle, "zeromq_config", oh_zeromq_config, 0);
    rb_define_method(cHandle, "publish_batch", oh_publish_batch, -1);
    rb_define_method(cHandle, "receive_results", oh_receive_results, -1);
    rb_define_method(cHandle, "workers", oh_workers, 0);
    rb_define_method(cHandle, "stats", oh_stats, 0);
    rb_define_method(cHandle, "close", oh_close, 0);
    rb_define_method(cHandle, "closed?", oh_closed_p, 0);
    rb_define_method(cHandle, "curve?", oh_curve_p, 0);
    rb_define_method(cHandle, "allowed_client_keys=", oh_set_allowed_client_keys, 1);
    rb_define_const(cHandle, "MAX_BATCH_ID_BYTES", INT2FIX(TC_OH_BATCH_ID_MAX));
    rb_define_private_method(cHandle, "_start_orchestration", oh_start_orchestration, 8);
    rb_define_method(cHandle, "stop_orchestration", oh_stop_orchestration, -1);
    rb_define_method(cHandle, "orchestrating?", oh_orchestrating_p, 0);
}
