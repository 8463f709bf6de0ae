/*
 * store.c: one libpq connection, used without Ruby. Only unnamed
 * statements and text-format parameters (binary where the caller asks),
 * so a connection can sit behind PgBouncer in transaction mode. Errors
 * are copied into the struct with their SQLSTATE; nothing raises.
 */
#include "store.h"

#include <poll.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static void set_error(tc_store *s, const char *sqlstate, const char *fmt, const char *detail)
{
    snprintf(s->sqlstate, sizeof(s->sqlstate), "%s", sqlstate ? sqlstate : "");
    snprintf(s->err, sizeof(s->err), fmt, detail ? detail : "");
    /* libpq messages end with a newline */
    size_t n = strlen(s->err);
    while (n > 0 && (s->err[n - 1] == '\n' || s->err[n - 1] == ' '))
        s->err[--n] = '\0';
}

static void clear_error(tc_store *s)
{
    s->sqlstate[0] = '\0';
    s->err[0] = '\0';
}

/* Server notices (e.g. "already exists, skipping") are not errors; libpq
 * would print them on stderr. A FATAL one is the server ending the session
 * while no query runs (shutdown, pg_terminate_backend): libpq hands it here,
 * and the end of the connection may only be read later. */
static void receive_notice(void *arg, const PGresult *res)
{
    tc_store *s = arg;
    const char *sev = PQresultErrorField(res, PG_DIAG_SEVERITY_NONLOCALIZED);
    if (!sev)
        sev = PQresultErrorField(res, PG_DIAG_SEVERITY);
    if (sev && (strcmp(sev, "FATAL") == 0 || strcmp(sev, "PANIC") == 0))
        s->ended = 1;
}

static int start(tc_store *s, const char *conninfo, int connect_timeout_s, const char *options, int blocking)
{
    const char *keys[6];
    const char *vals[6];
    char timeout[16];
    int n = 0;

    clear_error(s);
    keys[n] = "dbname";
    vals[n++] = conninfo ? conninfo : "";
    keys[n] = "fallback_application_name";
    vals[n++] = "tasker_core";
    if (connect_timeout_s >= 0) {
        snprintf(timeout, sizeof(timeout), "%d", connect_timeout_s);
        keys[n] = "connect_timeout";
        vals[n++] = timeout;
    }
    if (options && *options) {
        keys[n] = "options";
        vals[n++] = options;
    }
    keys[n] = NULL;
    vals[n] = NULL;

    s->pid = getpid();
    s->ended = 0;
    s->conn = blocking ? PQconnectdbParams(keys, vals, 1) : PQconnectStartParams(keys, vals, 1);
    if (!s->conn) {
        set_error(s, "08001", "could not connect to PostgreSQL: out of memory%s", "");
        return -1;
    }
    if (PQstatus(s->conn) == CONNECTION_BAD) {
        tc_store_connect_failed(s);
        return -1;
    }
    PQsetNoticeReceiver(s->conn, receive_notice, s);
    return 0;
}

void tc_store_connect_failed(tc_store *s)
{
    char buf[sizeof(s->err)];
    const char *host = s->conn ? PQhost(s->conn) : NULL;
    const char *port = s->conn ? PQport(s->conn) : NULL;
    const char *msg = s->conn ? PQerrorMessage(s->conn) : "no connection";

    if (!host || !*host)
        host = "(default socket)";
    if (!port || !*port)
        port = "5432";
    /* host and port are what libpq tried; the password is never part of them */
    snprintf(buf, sizeof(buf), "could not connect to PostgreSQL at %s:%s: %s", host, port, msg);
    set_error(s, "08001", "%s", buf);
    if (s->conn) {
        PQfinish(s->conn);
        s->conn = NULL;
    }
}

int tc_store_connect(tc_store *s, const char *conninfo, int connect_timeout_s, const char *options)
{
    return start(s, conninfo, connect_timeout_s, options, 1);
}

int tc_store_connect_start(tc_store *s, const char *conninfo, int connect_timeout_s, const char *options)
{
    return start(s, conninfo, connect_timeout_s, options, 0);
}

PostgresPollingStatusType tc_store_connect_poll(tc_store *s)
{
    PostgresPollingStatusType st = PQconnectPoll(s->conn);
    if (st == PGRES_POLLING_OK && PQsetnonblocking(s->conn, 1) != 0)
        return PGRES_POLLING_FAILED;
    return st;
}

static void result_error(tc_store *s, const PGresult *res)
{
    const char *state = res ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL;
    const char *primary = res ? PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY) : NULL;
    const char *detail = res ? PQresultErrorField(res, PG_DIAG_MESSAGE_DETAIL) : NULL;
    char buf[sizeof(s->err)];

    if (primary && detail)
        snprintf(buf, sizeof(buf), "%s (%s)", primary, detail);
    else if (primary)
        snprintf(buf, sizeof(buf), "%s", primary);
    else
        snprintf(buf, sizeof(buf), "%s", s->conn ? PQerrorMessage(s->conn) : "no connection");
    /* no SQLSTATE: the connection itself failed */
    if (!state && (!s->conn || PQstatus(s->conn) != CONNECTION_OK))
        state = "08006";
    set_error(s, state, "%s", buf);
}

static int check_conn(tc_store *s)
{
    clear_error(s);
    if (!s->conn) {
        set_error(s, "08003", "%s", "connection is closed");
        return -1;
    }
    if (PQstatus(s->conn) != CONNECTION_OK) {
        set_error(s, "08006", "connection to PostgreSQL lost: %s", PQerrorMessage(s->conn));
        return -1;
    }
    return 0;
}

PGresult *tc_store_exec(tc_store *s, const char *sql, int nparams, const char *const *values,
                        const int *lengths, const int *formats)
{
    if (check_conn(s) != 0)
        return NULL;
    /* a connection used through the non-blocking API is in non-blocking
     * mode; PQexecParams needs it blocking */
    if (PQisnonblocking(s->conn))
        PQsetnonblocking(s->conn, 0);
    PGresult *res = PQexecParams(s->conn, sql, nparams, NULL, values, lengths, formats, 0);
    ExecStatusType st = res ? PQresultStatus(res) : PGRES_FATAL_ERROR;
    if (st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK)
        return res;
    result_error(s, res);
    PQclear(res);
    return NULL;
}

int tc_store_send(tc_store *s, const char *sql, int nparams, const char *const *values,
                  const int *lengths, const int *formats)
{
    if (check_conn(s) != 0)
        return -1;
    if (!PQisnonblocking(s->conn))
        PQsetnonblocking(s->conn, 1);
    if (!PQsendQueryParams(s->conn, sql, nparams, NULL, values, lengths, formats, 0)) {
        result_error(s, NULL);
        return -1;
    }
    return 0;
}

int tc_store_send_script(tc_store *s, const char *sql)
{
    if (check_conn(s) != 0)
        return -1;
    if (!PQisnonblocking(s->conn))
        PQsetnonblocking(s->conn, 1);
    if (!PQsendQuery(s->conn, sql)) {
        result_error(s, NULL);
        return -1;
    }
    return 0;
}

int tc_store_flush(tc_store *s)
{
    int r = PQflush(s->conn);
    if (r < 0)
        result_error(s, NULL);
    return r;
}

int tc_store_consume(tc_store *s)
{
    if (!PQconsumeInput(s->conn)) {
        result_error(s, NULL);
        return -1;
    }
    return PQisBusy(s->conn) ? 0 : 1;
}

PGresult *tc_store_take_result(tc_store *s)
{
    PGresult *keep = NULL;
    PGresult *res;
    int failed = 0;

    /* the first error wins; otherwise the last result */
    while ((res = PQgetResult(s->conn)) != NULL) {
        ExecStatusType st = PQresultStatus(res);
        int bad = !(st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK || st == PGRES_EMPTY_QUERY);
        if (failed) {
            PQclear(res);
        } else {
            if (keep)
                PQclear(keep);
            keep = res;
            failed = bad;
        }
        /* a lost connection would loop on PQgetResult otherwise */
        if (PQstatus(s->conn) != CONNECTION_OK)
            break;
    }
    if (!keep) {
        result_error(s, NULL);
        return NULL;
    }
    if (failed) {
        result_error(s, keep);
        PQclear(keep);
        return NULL;
    }
    clear_error(s);
    return keep;
}

void tc_store_cancel(tc_store *s)
{
    char buf[256];
    if (!s->conn)
        return;
    PGcancel *c = PQgetCancel(s->conn);
    if (c) {
        PQcancel(c, buf, sizeof(buf));
        PQfreeCancel(c);
    }
}

int tc_store_socket(const tc_store *s)
{
    return s->conn ? PQsocket(s->conn) : -1;
}

int tc_store_ok(const tc_store *s)
{
    return s->conn && PQstatus(s->conn) == CONNECTION_OK;
}

int tc_store_in_transaction(const tc_store *s)
{
    if (!s->conn)
        return 0;
    PGTransactionStatusType t = PQtransactionStatus(s->conn);
    return t == PQTRANS_INTRANS || t == PQTRANS_INERROR;
}

int tc_store_check_idle(tc_store *s)
{
    if (!s->conn || s->pid != getpid() || PQstatus(s->conn) != CONNECTION_OK)
        return 0;
    /* The server's termination message and its end of file may come in two
     * reads; libpq's socket is non-blocking, so a read with nothing there
     * returns at once. A few reads at most: a live idle session has little
     * to say (notifications). */
    for (int i = 0; i < 4; i++) {
        struct pollfd p = { PQsocket(s->conn), POLLIN, 0 };
        if (poll(&p, 1, 0) <= 0)
            break;
        if (!PQconsumeInput(s->conn))
            return 0;
    }
    return !s->ended && PQstatus(s->conn) == CONNECTION_OK;
}

void tc_store_close(tc_store *s)
{
    if (!s->conn)
        return;
    if (s->pid == getpid())
        PQfinish(s->conn);
    /* else: inherited across fork. PQfinish would send Terminate on the
     * parent's session; leave the parent's connection alone (the small
     * PGconn is leaked in the child on purpose). */
    s->conn = NULL;
}
