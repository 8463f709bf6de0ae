/*
 * store.h: the plain C core of the PostgreSQL store. Wraps one libpq
 * connection: connect with a conninfo string or URL, run parameterised
 * statements (text format, unnamed statements only, so it works behind
 * PgBouncer in transaction mode), and report errors with their SQLSTATE.
 *
 * Nothing here touches Ruby or raises: the orchestration loop calls it from
 * a native thread without the GVL. store_class.c is the Ruby binding.
 */
#ifndef TC_STORE_H
#define TC_STORE_H

#include <stddef.h>
#include <sys/types.h>
#include <libpq-fe.h>

typedef struct tc_store {
    PGconn *conn;
    pid_t pid;            /* process that opened conn; a child discards instead of closing */
    char sqlstate[6];     /* SQLSTATE of the last error, "" when none */
    char err[1024];       /* message of the last error */
    int ended;            /* the server said FATAL while no query ran: the session is ending */
} tc_store;

/* A connected tc_store must stay at its address: libpq's notice receiver
 * points at it. */

/* Blocking connect (for native threads). connect_timeout_s < 0 keeps
 * libpq's/the URL's own setting. options may be NULL (server "-c" options).
 * Returns 0, or -1 with s->err naming host and port (never the password). */
int tc_store_connect(tc_store *s, const char *conninfo, int connect_timeout_s, const char *options);

/* Non-blocking connect: start, then call tc_store_connect_poll until it
 * returns PGRES_POLLING_OK or PGRES_POLLING_FAILED, waiting on the socket
 * for reading or writing as it asks. */
int tc_store_connect_start(tc_store *s, const char *conninfo, int connect_timeout_s, const char *options);
PostgresPollingStatusType tc_store_connect_poll(tc_store *s);
/* Fills s->err after a failed connect. */
void tc_store_connect_failed(tc_store *s);

/* Blocking statement (for native threads). Parameters in text format
 * (values[i] == NULL is SQL NULL); formats may be NULL (all text) or say 1
 * for a raw binary value with its length in lengths[i]. Returns a result
 * the caller PQclear()s, or NULL with s->err / s->sqlstate set. */
PGresult *tc_store_exec(tc_store *s, const char *sql, int nparams, const char *const *values,
                        const int *lengths, const int *formats);

/* Non-blocking pieces for callers that wait on the socket themselves. */
int tc_store_send(tc_store *s, const char *sql, int nparams, const char *const *values,
                  const int *lengths, const int *formats);
/* Sends several ';'-separated statements without parameters (simple query
 * protocol: migrations). */
int tc_store_send_script(tc_store *s, const char *sql);
/* Flushes pending output: 0 done, 1 wait writable and call again, -1 error. */
int tc_store_flush(tc_store *s);
/* Reads what has arrived: 1 a result is ready (tc_store_take_result will
 * not block), 0 wait readable and call again, -1 error. */
int tc_store_consume(tc_store *s);
/* Collects the query's results (the last one wins; an error result wins
 * over others). Returns NULL with s->err set on error. */
PGresult *tc_store_take_result(tc_store *s);
/* Asks the server to cancel the running query (best effort). */
void tc_store_cancel(tc_store *s);

int tc_store_socket(const tc_store *s);
int tc_store_ok(const tc_store *s);            /* connected and CONNECTION_OK */
int tc_store_in_transaction(const tc_store *s); /* inside BEGIN ... (or failed transaction) */
/* For a connection with no query running: reads what the server has sent
 * meanwhile without waiting (a restarted or terminated server's goodbye,
 * then end of file) and says whether the connection is still good: 1 yes,
 * 0 lost, closed, or opened in another process. Queued notifications stay
 * queued. */
int tc_store_check_idle(tc_store *s);
/* Closes the connection; in a forked child only forgets it (no PQfinish on
 * the parent's socket). Idempotent. */
void tc_store_close(tc_store *s);

#endif
