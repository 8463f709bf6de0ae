/*
 * socket.c: the plain C core of the socket layer. Owns the process-wide
 * libzmq context, opening and closing sockets together with their opt-in
 * monitor PAIR, non-blocking multipart send/receive and the per-socket counters.
 *
 * Never raises and never touches a Ruby object: the orchestration
 * handle's native thread calls it without the GVL. Errors come back as
 * -1 with errno, plus a sentence in the caller's buffer where one is given.
 */
#include "socket.h"

#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/*
 * The pid is cached and refreshed by a pthread_atfork child handler:
 * getpid() is a real system call and the fork check sits on every send
 * and receive.
 */
static pthread_once_t tc_once = PTHREAD_ONCE_INIT;
static pthread_mutex_t tc_ctx_lock = PTHREAD_MUTEX_INITIALIZER;
static volatile pid_t tc_pid_now;
static void *tc_ctx;
static pid_t tc_ctx_pid;
static unsigned long tc_monitor_seq;

static void tc_after_fork_child(void)
{
    tc_pid_now = getpid();
    /* Another thread may have held the lock at fork; it does not exist here. */
    pthread_mutex_init(&tc_ctx_lock, NULL);
}

static void tc_socket_once(void)
{
    tc_pid_now = getpid();
    pthread_atfork(NULL, NULL, tc_after_fork_child);
}

static pid_t tc_pid(void)
{
    pthread_once(&tc_once, tc_socket_once);
    return tc_pid_now;
}

void *tc_context(void)
{
    /* The real pid here and in close, not the cache: these are the calls
     * that must never act on a parent's objects, and they are rare. */
    pid_t pid = getpid();
    void *ctx;

    pthread_mutex_lock(&tc_ctx_lock);
    if (tc_ctx == NULL || tc_ctx_pid != pid) {
        /* In a forked child the parent's context is abandoned, never
         * terminated: zmq_ctx_term would wait on sockets this process
         * does not own, and its I/O thread did not survive the fork. */
        tc_ctx = zmq_ctx_new();
        tc_ctx_pid = pid;
    }
    ctx = tc_ctx;
    pthread_mutex_unlock(&tc_ctx_lock);
    return ctx;
}

static void tc_errf(char *err, size_t errlen, const char *fmt, ...)
{
    va_list ap;

    if (err == NULL || errlen == 0)
        return;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

int tc_socket_forked(const tc_socket *s)
{
    return s->zsock != NULL && s->pid != tc_pid();
}

/* Common guard: a closed or inherited socket must not reach libzmq. */
static int tc_usable(tc_socket *s, char *err, size_t errlen)
{
    if (s->zsock == NULL) {
        tc_errf(err, errlen, "socket is closed");
        errno = ENOTSOCK;
        return -1;
    }
    if (s->pid != tc_pid()) {
        tc_errf(err, errlen, "socket was opened in process %ld and cannot be used after fork",
                (long)s->pid);
        errno = TC_SOCKET_EFORKED;
        return -1;
    }
    return 0;
}

int tc_socket_monitor(tc_socket *s, int events, char *err, size_t errlen)
{
    char endpoint[64];
    unsigned long seq = __atomic_add_fetch(&tc_monitor_seq, 1, __ATOMIC_RELAXED);
    int zero = 0;
    int e;

    if (tc_usable(s, err, errlen) != 0)
        return -1;
    if (s->monitor != NULL) {
        tc_errf(err, errlen, "the socket already has a monitor");
        errno = EINVAL;
        return -1;
    }
    s->ring = calloc(TC_SOCKET_EVENT_RING, sizeof(*s->ring));
    if (s->ring == NULL) {
        tc_errf(err, errlen, "could not monitor the socket: out of memory");
        errno = ENOMEM;
        return -1;
    }
    s->ring_head = s->ring_len = 0;
    snprintf(endpoint, sizeof(endpoint), "inproc://tasker-core.monitor.%ld.%lu", (long)s->pid,
             seq);
    if (zmq_socket_monitor(s->zsock, endpoint, events) != 0)
        goto fail;
    s->monitor = zmq_socket(tc_context(), ZMQ_PAIR);
    if (s->monitor == NULL)
        goto fail;
    /* Pending events are worthless once the socket is gone. RCVHWM 0
     * before connect: the pipe the I/O thread sends into has no limit, so
     * it never blocks there (socket.h). */
    if (zmq_setsockopt(s->monitor, ZMQ_LINGER, &zero, sizeof(zero)) != 0 ||
        zmq_setsockopt(s->monitor, ZMQ_RCVHWM, &zero, sizeof(zero)) != 0 ||
        zmq_connect(s->monitor, endpoint) != 0)
        goto fail;
    return 0;

fail:
    e = zmq_errno();
    tc_errf(err, errlen, "could not monitor the socket: %s", zmq_strerror(e));
    zmq_socket_monitor(s->zsock, NULL, 0);
    if (s->monitor != NULL)
        zmq_close(s->monitor);
    s->monitor = NULL;
    free(s->ring);
    s->ring = NULL;
    errno = e;
    return -1;
}

int tc_socket_open(tc_socket *s, int zmq_type, char *err, size_t errlen)
{
    void *ctx = tc_context();
    size_t fdlen = sizeof(s->fd);
    int e;

    memset(s, 0, sizeof(*s));
    if (ctx == NULL) {
        e = zmq_errno();
        tc_errf(err, errlen, "could not create the ZeroMQ context: %s", zmq_strerror(e));
        errno = e;
        return -1;
    }
    s->zsock = zmq_socket(ctx, zmq_type);
    if (s->zsock == NULL) {
        e = zmq_errno();
        tc_errf(err, errlen, "could not create a ZeroMQ socket: %s", zmq_strerror(e));
        errno = e;
        return -1;
    }
    s->type = zmq_type;
    s->pid = getpid();
    tc_pid_now = s->pid; /* in case a fork went by without our atfork handler */
    s->fd = -1;
    if (zmq_getsockopt(s->zsock, ZMQ_FD, &s->fd, &fdlen) != 0) {
        e = zmq_errno();
        tc_errf(err, errlen, "could not read the socket's ZMQ_FD: %s", zmq_strerror(e));
        tc_socket_close(s);
        errno = e;
        return -1;
    }
    return 0;
}

int tc_socket_set_int(tc_socket *s, int option, int value, char *err, size_t errlen)
{
    return tc_socket_set_bytes(s, option, &value, sizeof(value), err, errlen);
}

int tc_socket_get_int(tc_socket *s, int option, int *value)
{
    size_t len = sizeof(*value);

    if (tc_usable(s, NULL, 0) != 0)
        return -1;
    if (zmq_getsockopt(s->zsock, option, value, &len) != 0) {
        errno = zmq_errno();
        return -1;
    }
    return 0;
}

int tc_socket_set_bytes(tc_socket *s, int option, const void *buf, size_t len, char *err,
                        size_t errlen)
{
    int e;

    if (tc_usable(s, err, errlen) != 0)
        return -1;
    if (zmq_setsockopt(s->zsock, option, buf, len) != 0) {
        e = zmq_errno();
        tc_errf(err, errlen, "could not set socket option %d: %s", option, zmq_strerror(e));
        errno = e;
        return -1;
    }
    return 0;
}

static int tc_read_event(tc_socket *s, tc_socket_event *ev);
static void tc_drain_monitor(tc_socket *s);

typedef int (*tc_endpoint_fn)(void *, const char *);

static int tc_socket_endpoint_op(tc_socket *s, tc_endpoint_fn fn, const char *verb,
                                 const char *endpoint, char *err, size_t errlen)
{
    int e;

    if (tc_usable(s, err, errlen) != 0)
        return -1;
    if (fn(s->zsock, endpoint) != 0) {
        /* Capture before formatting: snprintf may touch errno. (A monitor
         * sending bind_failed would leave EAGAIN here; the connection
         * events a monitor reports leave it out.) */
        e = zmq_errno();
        tc_errf(err, errlen, "could not %s %s: %s", verb, endpoint, zmq_strerror(e));
        errno = e;
        return -1;
    }
    return 0;
}

int tc_socket_bind(tc_socket *s, const char *endpoint, char *err, size_t errlen)
{
    return tc_socket_endpoint_op(s, zmq_bind, "bind", endpoint, err, errlen);
}

int tc_socket_connect(tc_socket *s, const char *endpoint, char *err, size_t errlen)
{
    return tc_socket_endpoint_op(s, zmq_connect, "connect to", endpoint, err, errlen);
}

int tc_socket_unbind(tc_socket *s, const char *endpoint, char *err, size_t errlen)
{
    return tc_socket_endpoint_op(s, zmq_unbind, "unbind", endpoint, err, errlen);
}

int tc_socket_disconnect(tc_socket *s, const char *endpoint, char *err, size_t errlen)
{
    return tc_socket_endpoint_op(s, zmq_disconnect, "disconnect from", endpoint, err, errlen);
}

int tc_socket_last_endpoint(tc_socket *s, char *buf, size_t len)
{
    size_t n = len;

    if (len == 0) {
        errno = EINVAL;
        return -1;
    }
    buf[0] = '\0';
    if (tc_usable(s, NULL, 0) != 0)
        return -1;
    if (zmq_getsockopt(s->zsock, ZMQ_LAST_ENDPOINT, buf, &n) != 0) {
        errno = zmq_errno();
        buf[0] = '\0';
        return -1;
    }
    buf[len - 1] = '\0';
    return 0;
}

int tc_socket_send_parts(tc_socket *s, const void *const *bufs, const size_t *lens, size_t n)
{
    uint64_t bytes = 0;
    size_t i;

    if (tc_usable(s, NULL, 0) != 0)
        return -1;
    if (n == 0) {
        errno = EINVAL;
        return -1;
    }
    for (i = 0; i < n; i++) {
        int flags = ZMQ_DONTWAIT | (i + 1 < n ? ZMQ_SNDMORE : 0);
        if (zmq_send(s->zsock, bufs[i], lens[i], flags) < 0) {
            int e = zmq_errno();
            /* libzmq checks the high-water mark per whole message, so only
             * the first frame can be refused; later frames cannot be. */
            if (e == EAGAIN && i == 0)
                s->counters.send_dropped++;
            errno = e;
            return -1;
        }
        bytes += lens[i];
    }
    s->counters.messages_sent++;
    s->counters.bytes_sent += bytes;
    return 0;
}

int tc_socket_recv_parts(tc_socket *s, zmq_msg_t *frames, size_t max_frames)
{
    zmq_msg_t spill;
    uint64_t bytes = 0;
    size_t n = 0, kept;
    int more, e;

    if (tc_usable(s, NULL, 0) != 0)
        return -1;
    do {
        zmq_msg_t *m = n < max_frames ? &frames[n] : &spill;
        zmq_msg_init(m);
        if (zmq_msg_recv(m, s->zsock, ZMQ_DONTWAIT) < 0) {
            e = zmq_errno();
            zmq_msg_close(m);
            if (n == 0 && (e == EAGAIN || e == EINTR))
                return 0;
            goto fail;
        }
        more = zmq_msg_more(m);
        bytes += zmq_msg_size(m);
        if (m == &spill)
            zmq_msg_close(m);
        n++;
    } while (more);

    s->counters.messages_received++;
    s->counters.bytes_received += bytes;
    if (n > max_frames) {
        e = EMSGSIZE;
        goto fail;
    }
    return (int)n;

fail:
    kept = n < max_frames ? n : max_frames;
    while (kept > 0)
        zmq_msg_close(&frames[--kept]);
    errno = e;
    return -1;
}

int tc_socket_readable(tc_socket *s)
{
    int events = 0;
    size_t len = sizeof(events);

    if (tc_usable(s, NULL, 0) != 0)
        return -1;
    if (zmq_getsockopt(s->zsock, ZMQ_EVENTS, &events, &len) != 0) {
        int e = zmq_errno();
        /* A signal cut short command processing: report not ready, the
         * caller's capped wait comes back and asks again. */
        if (e == EINTR)
            return 0;
        errno = e;
        return -1;
    }
    tc_drain_monitor(s);
    return (events & ZMQ_POLLIN) ? 1 : 0;
}

static void tc_drain_rest(void *sock, zmq_msg_t *m)
{
    while (zmq_msg_more(m)) {
        zmq_msg_close(m);
        zmq_msg_init(m);
        if (zmq_msg_recv(m, sock, ZMQ_DONTWAIT) < 0)
            break;
    }
}

/* Moves what libzmq's monitor pipe holds into the ring, overwriting the
 * oldest entry when it is full. Errors are left for next_event to see. */
static void tc_drain_monitor(tc_socket *s)
{
    tc_socket_event ev;

    if (s->monitor == NULL || s->ring == NULL)
        return;
    while (tc_read_event(s, &ev) == 1) {
        if (s->ring_len == TC_SOCKET_EVENT_RING) {
            s->ring_head = (s->ring_head + 1) % TC_SOCKET_EVENT_RING;
            s->ring_len--;
            s->counters.events_dropped++;
        }
        s->ring[(s->ring_head + s->ring_len) % TC_SOCKET_EVENT_RING] = ev;
        s->ring_len++;
    }
}

int tc_socket_next_event(tc_socket *s, tc_socket_event *ev)
{
    if (tc_usable(s, NULL, 0) != 0)
        return -1;
    if (s->monitor == NULL)
        return 0;
    tc_drain_monitor(s);
    if (s->ring_len == 0)
        return 0;
    *ev = s->ring[s->ring_head];
    s->ring_head = (s->ring_head + 1) % TC_SOCKET_EVENT_RING;
    s->ring_len--;
    return 1;
}

static int tc_read_event(tc_socket *s, tc_socket_event *ev)
{
    zmq_msg_t head, addr;
    uint16_t event;
    uint32_t value;
    size_t len;
    struct timespec ts;
    int e;

    if (s->monitor == NULL)
        return 0;
    zmq_msg_init(&head);
    if (zmq_msg_recv(&head, s->monitor, ZMQ_DONTWAIT) < 0) {
        e = zmq_errno();
        zmq_msg_close(&head);
        if (e == EAGAIN || e == EINTR)
            return 0;
        errno = e;
        return -1;
    }
    /* zmq_socket_monitor(3): frame 1 is a 16-bit event and a 32-bit
     * value in native byte order, frame 2 the endpoint. */
    if (zmq_msg_size(&head) < 6 || !zmq_msg_more(&head)) {
        tc_drain_rest(s->monitor, &head);
        zmq_msg_close(&head);
        errno = EPROTO;
        return -1;
    }
    memcpy(&event, zmq_msg_data(&head), sizeof(event));
    memcpy(&value, (char *)zmq_msg_data(&head) + sizeof(event), sizeof(value));
    zmq_msg_close(&head);

    zmq_msg_init(&addr);
    if (zmq_msg_recv(&addr, s->monitor, ZMQ_DONTWAIT) < 0) {
        e = zmq_errno();
        zmq_msg_close(&addr);
        errno = e;
        return -1;
    }
    len = zmq_msg_size(&addr);
    if (len >= sizeof(ev->endpoint))
        len = sizeof(ev->endpoint) - 1;
    memcpy(ev->endpoint, zmq_msg_data(&addr), len);
    ev->endpoint[len] = '\0';
    tc_drain_rest(s->monitor, &addr);
    zmq_msg_close(&addr);

    clock_gettime(CLOCK_REALTIME, &ts);
    ev->event = event;
    ev->value = value;
    ev->at = (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
    return 1;
}

const char *tc_socket_event_name(int event)
{
    switch (event) {
    case ZMQ_EVENT_CONNECTED: return "connected";
    case ZMQ_EVENT_CONNECT_DELAYED: return "connect_delayed";
    case ZMQ_EVENT_CONNECT_RETRIED: return "connect_retried";
    case ZMQ_EVENT_LISTENING: return "listening";
    case ZMQ_EVENT_BIND_FAILED: return "bind_failed";
    case ZMQ_EVENT_ACCEPTED: return "accepted";
    case ZMQ_EVENT_ACCEPT_FAILED: return "accept_failed";
    case ZMQ_EVENT_CLOSED: return "closed";
    case ZMQ_EVENT_CLOSE_FAILED: return "close_failed";
    case ZMQ_EVENT_DISCONNECTED: return "disconnected";
    case ZMQ_EVENT_MONITOR_STOPPED: return "monitor_stopped";
    case ZMQ_EVENT_HANDSHAKE_FAILED_NO_DETAIL: return "handshake_failed_no_detail";
    case ZMQ_EVENT_HANDSHAKE_SUCCEEDED: return "handshake_succeeded";
    case ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL: return "handshake_failed_protocol";
    case ZMQ_EVENT_HANDSHAKE_FAILED_AUTH: return "handshake_failed_auth";
    default: return "unknown";
    }
}

void tc_socket_close(tc_socket *s)
{
    if (s->zsock == NULL && s->monitor == NULL && s->ring == NULL)
        return;
    if (s->pid == getpid()) {
        /* Stop the monitor here, in the owner thread, before either close:
         * with libzmq 4.3.4, leaving it to zmq_close while our PAIR goes
         * away wedges the context's I/O thread, and no later socket in the
         * process connects. zmq_close only hands the socket to the I/O
         * thread, which keeps sending for ZMQ_LINGER, so nothing blocks. */
        if (s->zsock != NULL && s->monitor != NULL)
            zmq_socket_monitor(s->zsock, NULL, 0);
        if (s->monitor != NULL)
            zmq_close(s->monitor);
        if (s->zsock != NULL)
            zmq_close(s->zsock);
    }
    /* Inherited across fork: forget the parent's sockets without telling
     * libzmq, whose I/O thread lives only in the parent. */
    s->zsock = NULL;
    s->monitor = NULL;
    s->fd = -1;
    /* Plain heap memory: ours to free in the parent and the child alike. */
    free(s->ring);
    s->ring = NULL;
    s->ring_head = s->ring_len = 0;
}
