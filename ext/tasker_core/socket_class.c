/*
 * socket_class.c: the Ruby binding of the socket layer,
 * TaskerCore::Socket::{Base,Publisher,Subscriber} and TaskerCore::Socket.select.
 *
 * Owns the TypedData wrapper (a tc_socket plus its owner thread), the one
 * checked accessor that turns closed / forked / wrong-thread use into
 * exceptions, conversion between Ruby strings and frames, and the
 * GVL-free, interruptible waits on ZMQ_FD. Keyword-argument constructors
 * live in lib/tasker_core/socket.rb.
 */
#include "tasker_core.h"
#include "socket.h"
#include "curve.h"

#include <ruby/io.h>
#include <time.h>

/* Each GVL-free wait is capped: ZMQ_FD is edge-triggered, and a missed
 * edge must not turn into a hang, only into a re-check. */
#define TC_WAIT_SLICE_MS 100

/* Frames accepted in one received message; the protocol uses two. */
#define TC_RECV_MAX_FRAMES 64

typedef struct tc_rsocket {
    tc_socket sock;
    VALUE owner; /* Thread that opened it; libzmq sockets are single-threaded */
} tc_rsocket;

static VALUE mSocket, cBase, cPublisher, cSubscriber;
static ID id_alive_p, id_subscribe, id_unsubscribe;
static VALUE sym_messages_sent, sym_bytes_sent, sym_messages_received, sym_bytes_received,
    sym_send_dropped, sym_events_dropped, sym_event, sym_endpoint, sym_value, sym_at;

static void rsocket_mark(void *p)
{
    rb_gc_mark(((tc_rsocket *)p)->owner);
}

static void rsocket_free(void *p)
{
    /* Closes (non-blocking, libzmq lingers in its I/O thread) or, in a
     * forked child, only forgets the parent's socket. */
    tc_socket_close(&((tc_rsocket *)p)->sock);
    xfree(p);
}

static size_t rsocket_size(const void *p)
{
    return sizeof(tc_rsocket);
}

/* Not RUBY_TYPED_FREE_IMMEDIATELY: dfree closes a libzmq socket. */
static const rb_data_type_t tc_rsocket_type = {
    "TaskerCore::Socket",
    { rsocket_mark, rsocket_free, rsocket_size },
    0, 0, 0,
};

static VALUE rsocket_alloc(VALUE klass)
{
    tc_rsocket *r;
    VALUE obj = TypedData_Make_Struct(klass, tc_rsocket, &tc_rsocket_type, r);
    r->sock.fd = -1;
    r->owner = Qnil;
    return obj;
}

NORETURN(static void tc_socket_raise(int e, const char *msg));
static void tc_socket_raise(int e, const char *msg)
{
    VALUE klass = tc_eConnectionError;

    if (e == TC_SOCKET_EFORKED)
        klass = tc_eForkSafetyError;
    else if (e == ENOTSOCK || e == ETERM)
        klass = tc_eClosedError;
    rb_raise(klass, "%s", msg);
}

NORETURN(static void tc_socket_raise_errno(int e, const char *what));
static void tc_socket_raise_errno(int e, const char *what)
{
    char msg[256];
    snprintf(msg, sizeof(msg), "could not %s: %s", what, zmq_strerror(e));
    tc_socket_raise(e, msg);
}

static tc_rsocket *rsocket_unchecked(VALUE self)
{
    return rb_check_typeddata(self, &tc_rsocket_type);
}

/* The one checked accessor: every use of the socket goes through it. */
static tc_rsocket *rsocket_get(VALUE self)
{
    tc_rsocket *r = rsocket_unchecked(self);
    VALUE current;

    if (r->sock.zsock == NULL)
        rb_raise(tc_eClosedError, "%" PRIsVALUE " is closed", rb_obj_class(self));
    if (tc_socket_forked(&r->sock))
        rb_raise(tc_eForkSafetyError,
                 "%" PRIsVALUE " was opened in process %ld and cannot be used in process %ld "
                 "after fork; make a new socket in this process",
                 rb_obj_class(self), (long)r->sock.pid, (long)getpid());
    current = rb_thread_current();
    if (r->owner != current) {
        /* A socket whose thread has ended may be taken over: nobody else
         * can be using it, and the GVL hand-over is the memory barrier
         * libzmq asks for when a socket moves between threads. */
        if (RTEST(rb_funcall(r->owner, id_alive_p, 0)))
            rb_raise(tc_eThreadOwnershipError,
                     "%" PRIsVALUE " belongs to %" PRIsVALUE
                     " and cannot be used from %" PRIsVALUE " (libzmq sockets are not thread-safe)",
                     rb_obj_class(self), r->owner, current);
        r->owner = current;
    }
    return r;
}

/* Timeouts in milliseconds; nil waits forever (-1). */
static long timeout_arg(VALUE v)
{
    double ms;

    if (NIL_P(v))
        return -1;
    ms = NUM2DBL(v);
    if (ms < 0)
        rb_raise(rb_eArgError, "timeout_ms must be >= 0 or nil, got %" PRIsVALUE, v);
    if (ms > (double)LONG_MAX / 2)
        return -1;
    return (long)ms;
}

static long monotonic_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Milliseconds for the next wait: capped, and 0 once the deadline passed. */
static long next_slice(long timeout_ms, long deadline)
{
    long left;

    if (timeout_ms < 0)
        return TC_WAIT_SLICE_MS;
    left = deadline - monotonic_ms();
    if (left <= 0)
        return 0;
    return left < TC_WAIT_SLICE_MS ? left : TC_WAIT_SLICE_MS;
}

static int fd_select(rb_fdset_t *set, int maxfd, long ms)
{
    struct timeval tv;
    int rc;

    tv.tv_sec = ms / 1000;
    tv.tv_usec = (ms % 1000) * 1000;
    /* Releases the GVL and checks interrupts (Thread#raise, #kill,
     * Timeout, Ctrl-C) on the way in and out. */
    rc = rb_thread_fd_select(maxfd + 1, set, NULL, NULL, &tv);
    if (rc < 0)
        rb_sys_fail("select");
    return rc;
}

struct wait_args {
    tc_socket *const *socks;
    int n;
    long timeout_ms;
    rb_fdset_t set;
};

static VALUE wait_readable_body(VALUE p)
{
    struct wait_args *w = (struct wait_args *)p;
    long deadline = w->timeout_ms < 0 ? 0 : monotonic_ms() + w->timeout_ms;
    int i, maxfd;

    for (;;) {
        /* Checking ZMQ_EVENTS before every wait is what makes an
         * edge-triggered ZMQ_FD safe to wait on. */
        for (i = 0; i < w->n; i++) {
            int r = tc_socket_readable(w->socks[i]);
            if (r < 0)
                tc_socket_raise_errno(errno, "poll the socket");
            if (r > 0)
                return INT2NUM(i);
        }
        if (w->timeout_ms >= 0 && monotonic_ms() >= deadline)
            return INT2NUM(-1);
        rb_fd_zero(&w->set);
        maxfd = -1;
        for (i = 0; i < w->n; i++) {
            rb_fd_set(w->socks[i]->fd, &w->set);
            if (w->socks[i]->fd > maxfd)
                maxfd = w->socks[i]->fd;
        }
        fd_select(&w->set, maxfd, next_slice(w->timeout_ms, deadline));
    }
}

static VALUE wait_term(VALUE p)
{
    rb_fd_term(&((struct wait_args *)p)->set);
    return Qnil;
}

int tc_socket_wait_readable(tc_socket *const *socks, int n, long timeout_ms)
{
    struct wait_args w;

    w.socks = socks;
    w.n = n;
    w.timeout_ms = timeout_ms;
    rb_fd_init(&w.set);
    return NUM2INT(rb_ensure(wait_readable_body, (VALUE)&w, wait_term, (VALUE)&w));
}

/* ---- frames ---------------------------------------------------------- */

struct frames_args {
    zmq_msg_t *frames;
    int n;
};

static VALUE frames_to_ary(VALUE p)
{
    struct frames_args *f = (struct frames_args *)p;
    VALUE ary = rb_ary_new_capa(f->n);
    int i;

    for (i = 0; i < f->n; i++)
        rb_ary_push(ary, rb_str_new(zmq_msg_data(&f->frames[i]), (long)zmq_msg_size(&f->frames[i])));
    return ary;
}

static VALUE frames_close(VALUE p)
{
    struct frames_args *f = (struct frames_args *)p;
    int i;

    for (i = 0; i < f->n; i++)
        zmq_msg_close(&f->frames[i]);
    return Qnil;
}

/* One message without waiting: an Array of binary Strings, or nil. */
static VALUE recv_one(tc_rsocket *r)
{
    zmq_msg_t frames[TC_RECV_MAX_FRAMES];
    struct frames_args f;
    int n = tc_socket_recv_parts(&r->sock, frames, TC_RECV_MAX_FRAMES);

    if (n == 0)
        return Qnil;
    if (n < 0) {
        int e = errno;
        if (e == EMSGSIZE)
            rb_raise(tc_eProtocolError, "discarded a message of more than %d frames",
                     TC_RECV_MAX_FRAMES);
        tc_socket_raise_errno(e, "receive");
    }
    f.frames = frames;
    f.n = n;
    /* rb_str_new may raise NoMemoryError: the frames must be closed anyway. */
    return rb_ensure(frames_to_ary, (VALUE)&f, frames_close, (VALUE)&f);
}

/* Waits (GVL-free) up to timeout_ms for one message; nil on timeout. */
static VALUE recv_wait(VALUE self, long timeout_ms)
{
    long deadline = timeout_ms < 0 ? 0 : monotonic_ms() + timeout_ms;

    for (;;) {
        tc_rsocket *r = rsocket_get(self);
        tc_socket *sp = &r->sock;
        long left = -1;
        VALUE msg = recv_one(r);

        if (!NIL_P(msg))
            return msg;
        if (timeout_ms >= 0) {
            left = deadline - monotonic_ms();
            if (left < 0)
                left = 0;
        }
        if (tc_socket_wait_readable(&sp, 1, left) < 0)
            return Qnil;
        RB_GC_GUARD(self);
    }
}

static VALUE send_strings(VALUE self, const VALUE *strs, long n)
{
    const void *bufs_stack[8];
    size_t lens_stack[8];
    const void **bufs = bufs_stack;
    size_t *lens = lens_stack;
    VALUE tmp_b = 0, tmp_l = 0;
    tc_rsocket *r = rsocket_get(self);
    long i;
    int rc, e = 0;

    if (n > 8) {
        bufs = ALLOCV_N(const void *, tmp_b, n);
        lens = ALLOCV_N(size_t, tmp_l, n);
    }
    /* Pointers are taken after the last allocation so that nothing can
     * move the strings between here and zmq_send, which copies them. */
    for (i = 0; i < n; i++) {
        bufs[i] = RSTRING_PTR(strs[i]);
        lens[i] = (size_t)RSTRING_LEN(strs[i]);
    }
    rc = tc_socket_send_parts(&r->sock, bufs, lens, (size_t)n);
    if (rc != 0)
        e = errno;
    if (tmp_b)
        ALLOCV_END(tmp_b);
    if (tmp_l)
        ALLOCV_END(tmp_l);
    if (rc == 0)
        return Qtrue;
    if (e == EAGAIN)
        return Qfalse;
    tc_socket_raise_errno(e, "send");
}

/* ---- TaskerCore::Socket::Base --------------------------------------- */

/* private: opens the libzmq socket the class stands for. */
static VALUE rsocket_open(VALUE self)
{
    tc_rsocket *r = rsocket_unchecked(self);
    char err[256];
    int type, e;

    if (r->sock.zsock != NULL && !tc_socket_forked(&r->sock))
        rb_raise(tc_eConnectionError, "%" PRIsVALUE " is already open", rb_obj_class(self));
    if (rb_obj_is_kind_of(self, cPublisher))
        type = ZMQ_XPUB;
    else if (rb_obj_is_kind_of(self, cSubscriber))
        type = ZMQ_SUB;
    else
        rb_raise(rb_eNotImpError, "%" PRIsVALUE " has no socket type", rb_obj_class(self));

    tc_socket_close(&r->sock);
    if (tc_socket_open(&r->sock, type, err, sizeof(err)) != 0) {
        e = errno;
        tc_socket_raise(e, err);
    }
    r->owner = rb_thread_current();
    if (type == ZMQ_XPUB) {
        /* NODROP: a full subscriber pipe makes send fail with EAGAIN,
         * which we count, instead of a silent drop. VERBOSER: every
         * (un)subscription reaches #subscriptions, not only the first
         * per topic, so the publisher can count its subscribers. */
        if (tc_socket_set_int(&r->sock, ZMQ_XPUB_NODROP, 1, err, sizeof(err)) != 0 ||
            tc_socket_set_int(&r->sock, ZMQ_XPUB_VERBOSER, 1, err, sizeof(err)) != 0) {
            e = errno;
            tc_socket_close(&r->sock);
            tc_socket_raise(e, err);
        }
    }
    return self;
}

typedef int (*endpoint_fn)(tc_socket *, const char *, char *, size_t);

static VALUE endpoint_op(VALUE self, VALUE endpoint, endpoint_fn fn)
{
    const char *ep = StringValueCStr(endpoint);
    tc_rsocket *r = rsocket_get(self);
    char err[512];

    if (fn(&r->sock, ep, err, sizeof(err)) != 0)
        tc_socket_raise(errno, err);
    RB_GC_GUARD(endpoint);
    return self;
}

static VALUE rsocket_bind(VALUE self, VALUE ep) { return endpoint_op(self, ep, tc_socket_bind); }
static VALUE rsocket_connect(VALUE self, VALUE ep) { return endpoint_op(self, ep, tc_socket_connect); }
static VALUE rsocket_unbind(VALUE self, VALUE ep) { return endpoint_op(self, ep, tc_socket_unbind); }
static VALUE rsocket_disconnect(VALUE self, VALUE ep)
{
    return endpoint_op(self, ep, tc_socket_disconnect);
}

static VALUE rsocket_last_endpoint(VALUE self)
{
    tc_rsocket *r = rsocket_get(self);
    char buf[TC_SOCKET_ENDPOINT_MAX];

    if (tc_socket_last_endpoint(&r->sock, buf, sizeof(buf)) != 0)
        tc_socket_raise_errno(errno, "read the last endpoint");
    return buf[0] ? rb_str_new_cstr(buf) : Qnil;
}

static VALUE get_int_opt(VALUE self, int option)
{
    tc_rsocket *r = rsocket_get(self);
    int v;

    if (tc_socket_get_int(&r->sock, option, &v) != 0)
        tc_socket_raise_errno(errno, "read a socket option");
    return INT2NUM(v);
}

static VALUE set_int_opt(VALUE self, int option, VALUE value)
{
    int v = NUM2INT(value);
    tc_rsocket *r = rsocket_get(self);
    char err[256];

    if (tc_socket_set_int(&r->sock, option, v, err, sizeof(err)) != 0)
        tc_socket_raise(errno, err);
    return value;
}

static VALUE rsocket_send_hwm(VALUE self) { return get_int_opt(self, ZMQ_SNDHWM); }
static VALUE rsocket_set_send_hwm(VALUE self, VALUE v) { return set_int_opt(self, ZMQ_SNDHWM, v); }
static VALUE rsocket_recv_hwm(VALUE self) { return get_int_opt(self, ZMQ_RCVHWM); }
static VALUE rsocket_set_recv_hwm(VALUE self, VALUE v) { return set_int_opt(self, ZMQ_RCVHWM, v); }
static VALUE rsocket_immediate(VALUE self) { return NUM2INT(get_int_opt(self, ZMQ_IMMEDIATE)) ? Qtrue : Qfalse; }
static VALUE rsocket_set_immediate(VALUE self, VALUE v)
{
    set_int_opt(self, ZMQ_IMMEDIATE, INT2FIX(RTEST(v) ? 1 : 0));
    return v;
}
static VALUE rsocket_linger(VALUE self) { return get_int_opt(self, ZMQ_LINGER); }
static VALUE rsocket_set_linger(VALUE self, VALUE v) { return set_int_opt(self, ZMQ_LINGER, v); }

/* Counters stay readable after close: they describe what happened. */
static VALUE rsocket_set_max_message_bytes(VALUE self, VALUE v)
{
    int64_t n = NUM2LL(v);
    char err[256];
    if (tc_socket_set_bytes(&rsocket_get(self)->sock, ZMQ_MAXMSGSIZE, &n, sizeof(n), err, sizeof(err)) < 0)
        rb_raise(tc_eConnectionError, "%s", err);
    return v;
}

/* CURVE server (before bind): secret key in Z85, ZAP domain whose
 * allow-list (TaskerCore::Curve.allow) decides who may connect. */
static VALUE rsocket_curve_server(VALUE self, VALUE secret, VALUE domain)
{
    tc_rsocket *r = rsocket_get(self);
    tc_curve_server c;
    char err[256];
    const char *d = StringValueCStr(domain);
    if (strlen(d) > TC_CURVE_DOMAIN_MAX) rb_raise(rb_eArgError, "ZAP domain longer than %d bytes", TC_CURVE_DOMAIN_MAX);
    memset(&c, 0, sizeof(c));
    tc_curve_key_from_ruby(secret, c.secret_key, "the server secret key");
    snprintf(c.domain, sizeof(c.domain), "%s", d);
    int rc = tc_curve_apply_server(&r->sock, &c, err, sizeof(err));
    tc_curve_wipe(&c, sizeof(c));
    if (rc < 0) rb_raise(tc_eConfigurationError, "could not make the socket a CURVE server: %s", err);
    RB_GC_GUARD(domain);
    return Qnil;
}

/* CURVE client (before connect): all three keys in Z85. */
static VALUE rsocket_curve_client(VALUE self, VALUE server_key, VALUE public_key, VALUE secret_key)
{
    tc_rsocket *r = rsocket_get(self);
    tc_curve_client c;
    char err[256];
    memset(&c, 0, sizeof(c));
    tc_curve_key_from_ruby(server_key, c.server_key, "the server public key");
    tc_curve_key_from_ruby(public_key, c.public_key, "the client public key");
    tc_curve_key_from_ruby(secret_key, c.secret_key, "the client secret key");
    int rc = tc_curve_apply_client(&r->sock, &c, err, sizeof(err));
    tc_curve_wipe(&c, sizeof(c));
    if (rc < 0) rb_raise(tc_eConfigurationError, "could not make the socket a CURVE client: %s", err);
    return Qnil;
}

static VALUE rsocket_stats(VALUE self)
{
    tc_socket_counters c = rsocket_unchecked(self)->sock.counters;
    VALUE h = rb_hash_new();

    rb_hash_aset(h, sym_messages_sent, ULL2NUM(c.messages_sent));
    rb_hash_aset(h, sym_bytes_sent, ULL2NUM(c.bytes_sent));
    rb_hash_aset(h, sym_messages_received, ULL2NUM(c.messages_received));
    rb_hash_aset(h, sym_bytes_received, ULL2NUM(c.bytes_received));
    rb_hash_aset(h, sym_send_dropped, ULL2NUM(c.send_dropped));
    rb_hash_aset(h, sym_events_dropped, ULL2NUM(c.events_dropped));
    return h;
}

/* private: attaches the connection-event monitor (before bind/connect). */
static VALUE rsocket_monitor(VALUE self)
{
    tc_rsocket *r = rsocket_get(self);
    char err[256];

    if (tc_socket_monitor(&r->sock, TC_SOCKET_CONNECTION_EVENTS, err, sizeof(err)) != 0)
        tc_socket_raise(errno, err);
    return Qnil;
}

static VALUE rsocket_monitored_p(VALUE self)
{
    return rsocket_unchecked(self)->sock.monitor != NULL ? Qtrue : Qfalse;
}

static VALUE rsocket_events(VALUE self)
{
    VALUE ary = rb_ary_new();
    tc_socket_event ev;

    for (;;) {
        tc_rsocket *r = rsocket_get(self);
        int rc = tc_socket_next_event(&r->sock, &ev);
        VALUE h;

        if (rc == 0)
            break;
        if (rc < 0)
            tc_socket_raise_errno(errno, "read socket events");
        h = rb_hash_new();
        rb_hash_aset(h, sym_event, ID2SYM(rb_intern(tc_socket_event_name(ev.event))));
        rb_hash_aset(h, sym_endpoint, rb_str_new_cstr(ev.endpoint));
        rb_hash_aset(h, sym_value, UINT2NUM(ev.value));
        rb_hash_aset(h, sym_at,
                     rb_time_nano_new((time_t)ev.at, (long)((ev.at - (double)(time_t)ev.at) * 1e9)));
        rb_ary_push(ary, h);
    }
    return ary;
}

static VALUE rsocket_close(VALUE self)
{
    tc_rsocket *r = rsocket_unchecked(self);

    if (r->sock.zsock == NULL)
        return Qnil;
    /* In a forked child closing only forgets the parent's socket, which is
     * always safe; otherwise only the owner may close. */
    if (!tc_socket_forked(&r->sock))
        rsocket_get(self);
    tc_socket_close(&r->sock);
    return Qnil;
}

/* A copy would be a second owner of one libzmq socket. */
static VALUE rsocket_init_copy(VALUE self, VALUE orig)
{
    rb_raise(rb_eTypeError, "can't copy %" PRIsVALUE, rb_obj_class(orig));
}

static VALUE rsocket_closed_p(VALUE self)
{
    return rsocket_unchecked(self)->sock.zsock == NULL ? Qtrue : Qfalse;
}

static VALUE rsocket_fd(VALUE self)
{
    return INT2NUM(rsocket_get(self)->sock.fd);
}

/* ---- Publisher ------------------------------------------------------- */

static VALUE publisher_send_message(VALUE self, VALUE topic, VALUE body)
{
    VALUE strs[2];

    strs[0] = rb_str_to_str(topic);
    strs[1] = rb_str_to_str(body);
    return send_strings(self, strs, 2);
}

static VALUE publisher_send_parts(VALUE self, VALUE parts)
{
    VALUE strs, result;
    long i, n;

    parts = rb_Array(parts);
    n = RARRAY_LEN(parts);
    if (n == 0)
        rb_raise(rb_eArgError, "a message needs at least one frame");
    strs = rb_ary_new_capa(n);
    for (i = 0; i < n; i++)
        rb_ary_push(strs, rb_str_to_str(RARRAY_AREF(parts, i)));
    /* strs is our own copy: nothing else can change it while we send. */
    result = send_strings(self, RARRAY_CONST_PTR(strs), n);
    RB_GC_GUARD(strs);
    return result;
}

/* private: waits up to timeout for one (un)subscription, then drains. */
static VALUE publisher_subscriptions(VALUE self, VALUE timeout)
{
    VALUE out = rb_ary_new();
    VALUE msg = recv_wait(self, timeout_arg(timeout));

    while (!NIL_P(msg)) {
        VALUE frame = RARRAY_AREF(msg, 0);
        const char *p = RSTRING_PTR(frame);
        long len = RSTRING_LEN(frame);

        /* XPUB hands up one frame per (un)subscription: a 1 or 0 byte,
         * then the topic prefix. Anything else is a user message sent
         * upstream by a peer, which a publisher ignores. */
        if (len >= 1 && (p[0] == 1 || p[0] == 0)) {
            VALUE kind = ID2SYM(p[0] == 1 ? id_subscribe : id_unsubscribe);
            rb_ary_push(out, rb_assoc_new(kind, rb_str_new(p + 1, len - 1)));
        }
        msg = recv_one(rsocket_get(self));
    }
    return out;
}

/* ---- Subscriber ------------------------------------------------------ */

static VALUE subscriber_set_topic(VALUE self, VALUE prefix, int option)
{
    tc_rsocket *r;
    char err[256];

    StringValue(prefix);
    r = rsocket_get(self);
    if (tc_socket_set_bytes(&r->sock, option, RSTRING_PTR(prefix), (size_t)RSTRING_LEN(prefix), err,
                            sizeof(err)) != 0)
        tc_socket_raise(errno, err);
    RB_GC_GUARD(prefix);
    return self;
}

static VALUE subscriber_subscribe(VALUE self, VALUE prefix)
{
    return subscriber_set_topic(self, prefix, ZMQ_SUBSCRIBE);
}

static VALUE subscriber_unsubscribe(VALUE self, VALUE prefix)
{
    return subscriber_set_topic(self, prefix, ZMQ_UNSUBSCRIBE);
}

/* private */
static VALUE subscriber_receive(VALUE self, VALUE timeout)
{
    return recv_wait(self, timeout_arg(timeout));
}

/* private: waits for the first message, then drains what is ready, so
 * one wake-up (and one trip back for the GVL) serves many messages. */
static VALUE subscriber_receive_many(VALUE self, VALUE vmax, VALUE timeout)
{
    long max = NUM2LONG(vmax);
    VALUE out, msg;

    if (max < 1)
        rb_raise(rb_eArgError, "max must be >= 1, got %ld", max);
    out = rb_ary_new();
    msg = recv_wait(self, timeout_arg(timeout));
    while (!NIL_P(msg)) {
        rb_ary_push(out, msg);
        if (RARRAY_LEN(out) >= max)
            break;
        msg = recv_one(rsocket_get(self));
    }
    return out;
}

/* ---- TaskerCore::Socket.select -------------------------------------- */

struct select_args {
    VALUE readers; /* private copy: the caller may change theirs meanwhile */
    long timeout_ms;
    rb_fdset_t set;
};

/* fd of a reader; *sock set for sockets, *pending for IOs with buffered input. */
static int reader_fd(VALUE reader, tc_socket **sock, int *pending)
{
    rb_io_t *fptr;
    VALUE io;

    *sock = NULL;
    *pending = 0;
    if (rb_typeddata_is_kind_of(reader, &tc_rsocket_type)) {
        *sock = &rsocket_get(reader)->sock;
        return (*sock)->fd;
    }
    io = rb_io_get_io(reader);
    GetOpenFile(io, fptr);
    rb_io_check_readable(fptr);
    *pending = rb_io_read_pending(fptr);
    return fptr->fd;
}

static VALUE select_body(VALUE p)
{
    struct select_args *a = (struct select_args *)p;
    long deadline = a->timeout_ms < 0 ? 0 : monotonic_ms() + a->timeout_ms;
    long i, n = RARRAY_LEN(a->readers);

    for (;;) {
        VALUE ready;
        int maxfd = -1, immediate = 0, pending, fd;
        tc_socket *sock;

        rb_fd_zero(&a->set);
        for (i = 0; i < n; i++) {
            fd = reader_fd(RARRAY_AREF(a->readers, i), &sock, &pending);
            if (sock != NULL) {
                int r = tc_socket_readable(sock);
                if (r < 0)
                    tc_socket_raise_errno(errno, "poll the socket");
                immediate |= r;
            }
            immediate |= pending;
            rb_fd_set(fd, &a->set);
            if (fd > maxfd)
                maxfd = fd;
        }
        fd_select(&a->set, maxfd, immediate ? 0 : next_slice(a->timeout_ms, deadline));

        ready = rb_ary_new();
        for (i = 0; i < n; i++) {
            VALUE reader = RARRAY_AREF(a->readers, i);
            fd = reader_fd(reader, &sock, &pending);
            if (sock != NULL ? tc_socket_readable(sock) > 0 : (pending || rb_fd_isset(fd, &a->set)))
                rb_ary_push(ready, reader);
        }
        if (RARRAY_LEN(ready) > 0)
            return ready;
        if (a->timeout_ms >= 0 && monotonic_ms() >= deadline)
            return ready;
    }
}

static VALUE select_term(VALUE p)
{
    rb_fd_term(&((struct select_args *)p)->set);
    return Qnil;
}

static VALUE socket_s_select(VALUE mod, VALUE readers, VALUE timeout)
{
    struct select_args a;
    VALUE result;

    a.readers = rb_ary_dup(rb_Array(readers));
    a.timeout_ms = timeout_arg(timeout);
    rb_fd_init(&a.set);
    result = rb_ensure(select_body, (VALUE)&a, select_term, (VALUE)&a);
    RB_GC_GUARD(a.readers);
    return result;
}

void tc_init_socket(void)
{
    id_alive_p = rb_intern("alive?");
    id_subscribe = rb_intern("subscribe");
    id_unsubscribe = rb_intern("unsubscribe");
#define SYM(v, name) (v = ID2SYM(rb_intern(name)))
    SYM(sym_messages_sent, "messages_sent");
    SYM(sym_bytes_sent, "bytes_sent");
    SYM(sym_messages_received, "messages_received");
    SYM(sym_bytes_received, "bytes_received");
    SYM(sym_send_dropped, "send_dropped");
    SYM(sym_events_dropped, "events_dropped");
    SYM(sym_event, "event");
    SYM(sym_endpoint, "endpoint");
    SYM(sym_value, "value");
    SYM(sym_at, "at");
#undef SYM

    mSocket = rb_define_module_under(tc_mTaskerCore, "Socket");
    rb_define_singleton_method(mSocket, "select", socket_s_select, 2);

    cBase = rb_define_class_under(mSocket, "Base", rb_cObject);
    rb_define_alloc_func(cBase, rsocket_alloc);
    rb_define_private_method(cBase, "_open", rsocket_open, 0);
    rb_define_method(cBase, "initialize_copy", rsocket_init_copy, 1);
    rb_define_method(cBase, "bind", rsocket_bind, 1);
    rb_define_method(cBase, "connect", rsocket_connect, 1);
    rb_define_method(cBase, "unbind", rsocket_unbind, 1);
    rb_define_method(cBase, "disconnect", rsocket_disconnect, 1);
    rb_define_method(cBase, "last_endpoint", rsocket_last_endpoint, 0);
    rb_define_method(cBase, "send_hwm", rsocket_send_hwm, 0);
    rb_define_method(cBase, "send_hwm=", rsocket_set_send_hwm, 1);
    rb_define_method(cBase, "recv_hwm", rsocket_recv_hwm, 0);
    rb_define_method(cBase, "recv_hwm=", rsocket_set_recv_hwm, 1);
    rb_define_method(cBase, "immediate?", rsocket_immediate, 0);
    rb_define_method(cBase, "immediate=", rsocket_set_immediate, 1);
    rb_define_method(cBase, "linger", rsocket_linger, 0);
    rb_define_method(cBase, "linger=", rsocket_set_linger, 1);
    rb_define_method(cBase, "max_message_bytes=", rsocket_set_max_message_bytes, 1);
    rb_define_private_method(cBase, "_curve_server", rsocket_curve_server, 2);
    rb_define_private_method(cBase, "_curve_client", rsocket_curve_client, 3);
    rb_define_method(cBase, "stats", rsocket_stats, 0);
    rb_define_private_method(cBase, "_monitor", rsocket_monitor, 0);
    rb_define_method(cBase, "monitored?", rsocket_monitored_p, 0);
    rb_define_method(cBase, "events", rsocket_events, 0);
    rb_define_method(cBase, "close", rsocket_close, 0);
    rb_define_method(cBase, "closed?", rsocket_closed_p, 0);
    rb_define_method(cBase, "fd", rsocket_fd, 0);

    cPublisher = rb_define_class_under(mSocket, "Publisher", cBase);
    rb_define_method(cPublisher, "send_message", publisher_send_message, 2);
    rb_define_method(cPublisher, "send_parts", publisher_send_parts, 1);
    rb_define_private_method(cPublisher, "_subscriptions", publisher_subscriptions, 1);

    cSubscriber = rb_define_class_under(mSocket, "Subscriber", cBase);
    rb_define_method(cSubscriber, "subscribe", subscriber_subscribe, 1);
    rb_define_method(cSubscriber, "unsubscribe", subscriber_unsubscribe, 1);
    rb_define_private_method(cSubscriber, "_receive", subscriber_receive, 1);
    rb_define_private_method(cSubscriber, "_receive_many", subscriber_receive_many, 2);

    /* Keyword-argument constructors and wrappers (lib/tasker_core/socket.rb)
     * load with the extension, so the classes are never half-defined. */
    rb_require("tasker_core/socket");
}
