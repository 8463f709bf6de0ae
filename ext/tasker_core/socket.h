/*
 * socket.h: the ZeroMQ socket layer.
 *
 * The C core (socket.c) owns the process-wide libzmq context and the
 * tc_socket struct: open, options, bind/connect, non-blocking multipart
 * send and receive with counters, and an opt-in connection-event monitor.
 * It is plain C, never raises and never touches a Ruby object, so the
 * orchestration handle's native thread can use it without the GVL.
 *
 * The Ruby binding (socket_class.c) wraps it as TaskerCore::Socket::*
 * and defines tc_socket_wait_readable, which needs the GVL.
 *
 * A tc_socket belongs to one thread at a time (libzmq sockets are not
 * thread-safe) and to the process that opened it: in a forked child every
 * call on an inherited socket fails with errno TC_SOCKET_EFORKED, and
 * tc_socket_close only forgets it.
 */
#ifndef TASKER_CORE_SOCKET_H
#define TASKER_CORE_SOCKET_H

#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <zmq.h>

/* errno set by the core when a socket is used in a process it was not opened in. */
#define TC_SOCKET_EFORKED ECHILD

/* Longest endpoint string the core copies (events, last_endpoint). */
#define TC_SOCKET_ENDPOINT_MAX 256

typedef struct tc_socket_counters {
    uint64_t messages_sent;
    uint64_t bytes_sent; /* all frames, topic included */
    uint64_t messages_received;
    uint64_t bytes_received;
    uint64_t send_dropped; /* sends refused at the high-water mark */
    uint64_t events_dropped; /* monitor events overwritten before anyone read them */
} tc_socket_counters;

/*
 * The events a monitor reports (tc_socket_monitor): a connection coming up
 * or going away and the outcome of its handshake. Listening, accepted,
 * bind/connect retries and monitor_stopped are left out: they say nothing a
 * worker acts on, and a listener's accepted events grow with every peer.
 */
#define TC_SOCKET_CONNECTION_EVENTS                                                                \
    (ZMQ_EVENT_CONNECTED | ZMQ_EVENT_DISCONNECTED | ZMQ_EVENT_CLOSED |                             \
     ZMQ_EVENT_HANDSHAKE_SUCCEEDED | ZMQ_EVENT_HANDSHAKE_FAILED_NO_DETAIL |                        \
     ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL | ZMQ_EVENT_HANDSHAKE_FAILED_AUTH)

/* Events kept between two reads; older ones are overwritten and counted in
 * counters.events_dropped. */
#define TC_SOCKET_EVENT_RING 64

/* One connection event from zmq_socket_monitor. */
typedef struct tc_socket_event {
    int event;         /* ZMQ_EVENT_* */
    uint32_t value;    /* fd, errno or interval, depending on the event */
    double at;         /* when it was read from the monitor (epoch seconds) */
    char endpoint[TC_SOCKET_ENDPOINT_MAX];
} tc_socket_event;

/* Zero the struct before tc_socket_open; a zeroed struct is a closed socket. */
typedef struct tc_socket {
    void *zsock;   /* NULL when closed */
    void *monitor; /* PAIR connected to zsock's monitor over inproc, or NULL (the default) */
    int type;      /* ZMQ_XPUB, ZMQ_SUB, ... */
    int fd;        /* ZMQ_FD: edge-triggered, owned by libzmq; never read or close it */
    pid_t pid;     /* process that opened it */
    tc_socket_counters counters;
    /* Monitor events moved out of libzmq's pipe and not yet handed out by
     * tc_socket_next_event: TC_SOCKET_EVENT_RING entries (allocated with the
     * monitor), oldest at ring_head. */
    tc_socket_event *ring;
    size_t ring_head, ring_len;
} tc_socket;

/* The process's libzmq context, made on first use and again in a forked
 * child (the parent's is abandoned, never terminated). NULL if libzmq
 * could not make one. Thread-safe. */
void *tc_context(void);

/* All return 0 on success, -1 on failure with errno set and, where err is
 * given, a sentence in err naming the endpoint or option. */

/* Opens a socket without a monitor. */
int tc_socket_open(tc_socket *s, int zmq_type, char *err, size_t errlen);

/*
 * Attaches a monitor for the given ZMQ_EVENT_* mask (usually
 * TC_SOCKET_CONNECTION_EVENTS); call it before bind/connect, and at most
 * once. Only for a socket whose events someone reads.
 *
 * libzmq 4.3.4 sends each event from its I/O thread with a blocking
 * zmq_msg_send on an inproc PAIR: a full pipe would stop that thread, and
 * every socket of the context with it. Our PAIR gets ZMQ_RCVHWM 0 before
 * it connects, which makes the inproc pipe's limit 0 (unlimited: libzmq
 * adds the two ends' limits only when both are set), so a send never
 * waits. What bounds the memory instead: every tc_socket_readable and
 * tc_socket_next_event moves pending events into a ring of
 * TC_SOCKET_EVENT_RING, overwriting (and counting) the oldest.
 */
int tc_socket_monitor(tc_socket *s, int events, char *err, size_t errlen);
int tc_socket_set_int(tc_socket *s, int option, int value, char *err, size_t errlen);
int tc_socket_get_int(tc_socket *s, int option, int *value);
int tc_socket_set_bytes(tc_socket *s, int option, const void *buf, size_t len, char *err,
                        size_t errlen);
int tc_socket_bind(tc_socket *s, const char *endpoint, char *err, size_t errlen);
int tc_socket_connect(tc_socket *s, const char *endpoint, char *err, size_t errlen);
int tc_socket_unbind(tc_socket *s, const char *endpoint, char *err, size_t errlen);
int tc_socket_disconnect(tc_socket *s, const char *endpoint, char *err, size_t errlen);
/* Copies ZMQ_LAST_ENDPOINT ("" before any bind/connect). */
int tc_socket_last_endpoint(tc_socket *s, char *buf, size_t len);

/* Non-blocking; 0 ok; -1 with errno (EAGAIN = refused at the high-water
 * mark, counted in send_dropped). */
int tc_socket_send_parts(tc_socket *s, const void *const *bufs, const size_t *lens, size_t n);

/* Non-blocking; returns the frame count, 0 when nothing is ready, -1 on
 * error. On success frames[0..count-1] are initialised and the caller
 * closes them with zmq_msg_close. A message with more than max_frames
 * frames is received whole, discarded and reported as -1/EMSGSIZE. */
int tc_socket_recv_parts(tc_socket *s, zmq_msg_t *frames, size_t max_frames);

/* 1 when ZMQ_EVENTS has ZMQ_POLLIN, 0 when not, -1 on error. Checking
 * also lets libzmq process pending commands, which the edge-triggered
 * ZMQ_FD needs before every wait, and drains the monitor into its ring. */
int tc_socket_readable(tc_socket *s);

/* Hands out the oldest monitor event without waiting: 1 with *ev filled,
 * 0 when none is pending (or there is no monitor), -1 on error. */
int tc_socket_next_event(tc_socket *s, tc_socket_event *ev);

/* Name of a ZMQ_EVENT_* ("connected", "disconnected", ...), "unknown" else. */
const char *tc_socket_event_name(int event);

/* Idempotent. Closes with the socket's ZMQ_LINGER (libzmq's I/O thread
 * keeps delivering queued messages after this returns); in a forked child
 * only forgets the parent's socket. */
void tc_socket_close(tc_socket *s);

/* Non-zero when s was opened by another process (inherited across fork). */
int tc_socket_forked(const tc_socket *s);

/*
 * Binding helper, defined in socket_class.c. GVL held on entry; may raise
 * (Thread#raise, Thread#kill, Timeout and Ctrl-C interrupt it).
 * Waits GVL-free with rb_thread_fd_select on the sockets' ZMQ_FDs,
 * re-checking ZMQ_EVENTS after every wake, each wait capped at 100 ms.
 * Returns the index of a readable socket, or -1 on timeout; timeout_ms < 0
 * waits forever. Raises ConnectionError if a socket cannot be polled.
 */
int tc_socket_wait_readable(tc_socket *const *socks, int n, long timeout_ms);

#endif
