/*
 * store_class.c: TaskerCore::Store::Connection, the Ruby binding of
 * store.c. Queries are sent with PQsendQueryParams and their results
 * awaited on the libpq socket with rb_wait_for_single_fd, so the wait
 * releases the GVL and Thread#raise, Timeout and Ctrl-C interrupt it; an
 * interrupted query is cancelled on the server. Results come back as an
 * Array of Hashes with values decoded by column type.
 */
#include "tasker_core.h"
#include "store.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <ruby/io.h>

/* type OIDs (server/catalog/pg_type_d.h is not in libpq-dev) */
#define OID_BOOL 16
#define OID_BYTEA 17
#define OID_INT8 20
#define OID_INT2 21
#define OID_INT4 23
#define OID_OID 26
#define OID_FLOAT4 700
#define OID_FLOAT8 701

typedef struct {
    tc_store store;
    int busy;    /* a query is running (guards use from two threads at once) */
    int pending; /* sent and its results not yet collected */
} tc_conn;

static VALUE cConnection;
static ID id_sqlstate;

static void conn_free(void *ptr)
{
    tc_conn *c = ptr;
    tc_store_close(&c->store); /* discards instead of closing in a forked child */
    xfree(c);
}

static size_t conn_size(const void *ptr)
{
    return sizeof(tc_conn);
}

/* Not FREE_IMMEDIATELY: PQfinish writes to a socket. */
static const rb_data_type_t conn_type = {
    "TaskerCore::Store::Connection",
    { NULL, conn_free, conn_size },
    NULL, NULL, 0
};

static VALUE conn_alloc(VALUE klass)
{
    tc_conn *c;
    VALUE obj = TypedData_Make_Struct(klass, tc_conn, &conn_type, c);
    c->store.conn = NULL;
    return obj;
}

static void raise_store_error(tc_store *s)
{
    VALUE msg = rb_sprintf("%s%s%s%s", s->err, s->sqlstate[0] ? " (SQLSTATE " : "", s->sqlstate,
                           s->sqlstate[0] ? ")" : "");
    VALUE exc = rb_exc_new_str(tc_eStoreError, msg);
    rb_ivar_set(exc, id_sqlstate, s->sqlstate[0] ? rb_str_new_cstr(s->sqlstate) : Qnil);
    rb_exc_raise(exc);
}

/* The checked accessor: open, in the process that opened it, not busy. */
static tc_conn *get_conn(VALUE self)
{
    tc_conn *c = rb_check_typeddata(self, &conn_type);
    if (c->store.conn && c->store.pid != getpid())
        rb_raise(tc_eForkSafetyError,
                 "this TaskerCore::Store::Connection was opened in process %ld and inherited across fork; "
                 "open a new one in this process",
                 (long)c->store.pid);
    if (!c->store.conn)
        rb_raise(tc_eClosedError, "TaskerCore::Store::Connection is closed");
    return c;
}

static double monotonic_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* Waits (GVL released, interruptible) until fd is ready; at most max_s
 * seconds when max_s >= 0. Returns 0 on timeout. */
static int wait_fd(int fd, int events, double max_s)
{
    struct timeval tv, *tvp = NULL;
    if (max_s >= 0) {
        tv.tv_sec = (time_t)max_s;
        tv.tv_usec = (suseconds_t)((max_s - (double)tv.tv_sec) * 1e6);
        tvp = &tv;
    }
    int r = rb_wait_for_single_fd(fd, events, tvp);
    if (r < 0 && errno != EINTR)
        rb_sys_fail("waiting on the PostgreSQL socket");
    return r > 0;
}

/* Connection.new(url = nil, connect_timeout: nil, options: nil) */
static VALUE conn_initialize(int argc, VALUE *argv, VALUE self)
{
    VALUE url, opts, kw[2];
    static ID kw_ids[2];
    tc_conn *c = rb_check_typeddata(self, &conn_type);

    if (!kw_ids[0]) {
        kw_ids[0] = rb_intern("connect_timeout");
        kw_ids[1] = rb_intern("options");
    }
    rb_scan_args(argc, argv, "01:", &url, &opts);
    kw[0] = kw[1] = Qundef;
    if (!NIL_P(opts))
        rb_get_kwargs(opts, kw_ids, 0, 2, kw);
    int timeout = (kw[0] == Qundef || NIL_P(kw[0])) ? -1 : NUM2INT(kw[0]);
    VALUE options = (kw[1] == Qundef) ? Qnil : kw[1];
    if (!NIL_P(url))
        StringValueCStr(url);
    if (!NIL_P(options))
        StringValueCStr(options);
    if (c->store.conn)
        rb_raise(rb_eRuntimeError, "connection already initialized");

    if (tc_store_connect_start(&c->store, NIL_P(url) ? "" : RSTRING_PTR(url), timeout,
                               NIL_P(options) ? NULL : RSTRING_PTR(options)) != 0)
        raise_store_error(&c->store);

    /* PQconnectPoll ignores connect_timeout: enforce it here */
    double deadline = timeout > 0 ? monotonic_now() + timeout : -1;
    PostgresPollingStatusType st = PGRES_POLLING_WRITING;
    for (;;) {
        if (st == PGRES_POLLING_OK)
            break;
        if (st == PGRES_POLLING_FAILED) {
            tc_store_connect_failed(&c->store);
            raise_store_error(&c->store);
        }
        double left = deadline < 0 ? 1.0 : deadline - monotonic_now();
        if (left <= 0) {
            tc_store_connect_failed(&c->store);
            strncat(c->store.err, " (connect_timeout expired)", sizeof(c->store.err) - strlen(c->store.err) - 1);
            raise_store_error(&c->store);
        }
        wait_fd(tc_store_socket(&c->store), st == PGRES_POLLING_READING ? RB_WAITFD_IN : RB_WAITFD_OUT,
                left > 1.0 ? 1.0 : left);
        st = tc_store_connect_poll(&c->store);
    }
    return self;
}

/* ---- decoding ---- */

static VALUE decode_bytea(const char *v, size_t len)
{
    if (len >= 2 && v[0] == '\\' && v[1] == 'x') {
        size_t n = (len - 2) / 2;
        VALUE str = rb_str_new(NULL, (long)n);
        unsigned char *out = (unsigned char *)RSTRING_PTR(str);
        for (size_t i = 0; i < n; i++) {
            unsigned int hi = (unsigned char)v[2 + 2 * i], lo = (unsigned char)v[3 + 2 * i];
            hi = hi <= '9' ? hi - '0' : (hi | 0x20) - 'a' + 10;
            lo = lo <= '9' ? lo - '0' : (lo | 0x20) - 'a' + 10;
            out[i] = (unsigned char)((hi << 4) | lo);
        }
        return str;
    }
    /* bytea_output = escape: let libpq undo it (no Ruby call between malloc and free) */
    size_t n = 0;
    unsigned char *raw = PQunescapeBytea((const unsigned char *)v, &n);
    if (!raw)
        rb_raise(tc_eStoreError, "could not decode a bytea value");
    VALUE str = rb_str_buf_new((long)n);
    memcpy(RSTRING_PTR(str), raw, n);
    PQfreemem(raw);
    rb_str_set_len(str, (long)n);
    return str;
}

static VALUE decode_scalar(const char *v, size_t len, Oid type)
{
    switch (type) {
    case OID_INT2:
    case OID_INT4:
    case OID_INT8:
    case OID_OID:
        return rb_cstr2inum(v, 10);
    case OID_BOOL:
        return v[0] == 't' ? Qtrue : Qfalse;
    case OID_FLOAT4:
    case OID_FLOAT8:
        return rb_float_new(strtod(v, NULL));
    case OID_BYTEA:
        return decode_bytea(v, len);
    default:
        return rb_utf8_str_new(v, (long)len);
    }
}

static Oid array_element_type(Oid type)
{
    switch (type) {
    case 1000: return OID_BOOL;
    case 1001: return OID_BYTEA;
    case 1005: return OID_INT2;
    case 1007: return OID_INT4;
    case 1016: return OID_INT8;
    case 1021: return OID_FLOAT4;
    case 1022: return OID_FLOAT8;
    case 1028: return OID_OID;
    case 1009: /* text[] */
    case 1015: /* varchar[] */
    case 1014: /* bpchar[] */
        return 25;
    default: return 0;
    }
}

/* One-dimensional array literal -> Array; anything else stays a String. */
static VALUE decode_array(const char *v, size_t len, Oid elem)
{
    if (len < 2 || v[0] != '{' || v[1] == '{')
        return rb_utf8_str_new(v, (long)len);
    VALUE ary = rb_ary_new();
    VALUE buf = rb_str_buf_new(64);
    const char *p = v + 1, *end = v + len;
    if (*p == '}')
        return ary;
    while (p < end) {
        rb_str_set_len(buf, 0);
        int quoted = 0;
        if (*p == '"') {
            quoted = 1;
            p++;
            while (p < end && *p != '"') {
                if (*p == '\\' && p + 1 < end)
                    p++;
                rb_str_cat(buf, p, 1);
                p++;
            }
            p++; /* closing quote */
        } else {
            const char *s = p;
            while (p < end && *p != ',' && *p != '}')
                p++;
            rb_str_cat(buf, s, p - s);
        }
        if (!quoted && RSTRING_LEN(buf) == 4 && strncasecmp(RSTRING_PTR(buf), "NULL", 4) == 0)
            rb_ary_push(ary, Qnil);
        else
            rb_ary_push(ary, decode_scalar(StringValueCStr(buf), (size_t)RSTRING_LEN(buf), elem));
        if (p >= end || *p == '}')
            break;
        p++; /* comma */
    }
    RB_GC_GUARD(buf);
    return ary;
}

static VALUE decode_value(const PGresult *res, int row, int col, Oid type)
{
    if (PQgetisnull(res, row, col))
        return Qnil;
    const char *v = PQgetvalue(res, row, col);
    size_t len = (size_t)PQgetlength(res, row, col);
    Oid elem = array_element_type(type);
    return elem ? decode_array(v, len, elem) : decode_scalar(v, len, type);
}

typedef struct {
    PGresult *res;
} result_holder;

static VALUE result_to_rows(VALUE arg)
{
    PGresult *res = ((result_holder *)arg)->res;
    int nrows = PQntuples(res), ncols = PQnfields(res);
    VALUE keys = rb_ary_new_capa(ncols);
    Oid *types = ALLOCA_N(Oid, ncols > 0 ? ncols : 1);
    for (int j = 0; j < ncols; j++) {
        rb_ary_push(keys, rb_obj_freeze(rb_utf8_str_new_cstr(PQfname(res, j))));
        types[j] = PQftype(res, j);
    }
    VALUE rows = rb_ary_new_capa(nrows);
    for (int i = 0; i < nrows; i++) {
        VALUE h = rb_hash_new();
        for (int j = 0; j < ncols; j++)
            rb_hash_aset(h, RARRAY_AREF(keys, j), decode_value(res, i, j, types[j]));
        rb_ary_push(rows, h);
    }
    return rows;
}

static VALUE clear_result(VALUE arg)
{
    result_holder *h = (result_holder *)arg;
    PQclear(h->res);
    h->res = NULL;
    return Qnil;
}

/* ---- exec ---- */

typedef struct {
    VALUE self;
    tc_conn *c;
} exec_args;

static VALUE exec_wait(VALUE arg)
{
    exec_args *a = (exec_args *)arg;
    tc_store *s = &a->c->store;
    int fd = tc_store_socket(s);
    int r;

    while ((r = tc_store_flush(s)) == 1)
        wait_fd(fd, RB_WAITFD_IN | RB_WAITFD_OUT, -1), tc_store_consume(s);
    if (r < 0)
        raise_store_error(s);
    while ((r = tc_store_consume(s)) == 0)
        wait_fd(fd, RB_WAITFD_IN, -1);
    if (r < 0) {
        a->c->pending = 0;
        raise_store_error(s);
    }
    PGresult *res = tc_store_take_result(s);
    a->c->pending = 0;
    if (!res)
        raise_store_error(s);
    result_holder h = { res };
    return rb_ensure(result_to_rows, (VALUE)&h, clear_result, (VALUE)&h);
}

/* Runs on every exit from exec_wait: an interrupted query is cancelled and
 * its results drained so the connection stays usable. */
static VALUE exec_done(VALUE arg)
{
    exec_args *a = (exec_args *)arg;
    tc_conn *c = a->c;
    if (c->pending && c->store.conn) {
        tc_store_cancel(&c->store);
        PGresult *res;
        while ((res = PQgetResult(c->store.conn)) != NULL) {
            PQclear(res);
            if (PQstatus(c->store.conn) != CONNECTION_OK)
                break;
        }
        c->pending = 0;
    }
    c->busy = 0;
    RB_GC_GUARD(a->self);
    return Qnil;
}

/* #_exec(sql, params): params already encoded (String or nil); binary
 * (ASCII-8BIT) Strings travel in binary format, others as text. */
static VALUE conn_exec(VALUE self, VALUE sql, VALUE params)
{
    tc_conn *c = get_conn(self);
    StringValueCStr(sql);
    Check_Type(params, T_ARRAY);
    if (c->busy)
        rb_raise(tc_eStoreError, "TaskerCore::Store::Connection is running a query for another thread; "
                                 "use one connection per thread (TaskerCore::Store.with_connection)");

    long n = RARRAY_LEN(params);
    if (n > 65535)
        rb_raise(rb_eArgError, "too many parameters (%ld, PostgreSQL allows 65535)", n);
    params = rb_ary_dup(params); /* our own copy: the strings stay referenced */
    VALUE tmp1, tmp2, tmp3;
    const char **values = ALLOCV_N(const char *, tmp1, n > 0 ? n : 1);
    int *lengths = ALLOCV_N(int, tmp2, n > 0 ? n : 1);
    int *formats = ALLOCV_N(int, tmp3, n > 0 ? n : 1);
    rb_encoding *binary = rb_ascii8bit_encoding();
    for (long i = 0; i < n; i++) {
        VALUE v = RARRAY_AREF(params, i);
        if (NIL_P(v)) {
            values[i] = NULL;
            lengths[i] = 0;
            formats[i] = 0;
            continue;
        }
        if (!RB_TYPE_P(v, T_STRING))
            rb_raise(rb_eTypeError, "parameter %ld: expected a String or nil, got %" PRIsVALUE, i + 1,
                     rb_obj_class(v));
        if (rb_enc_get(v) == binary) {
            v = rb_str_new_frozen(v);
            formats[i] = 1;
        } else {
            v = rb_str_new_frozen(v);
            StringValueCStr(v); /* text parameters are NUL-terminated, no NUL inside */
            formats[i] = 0;
        }
        rb_ary_store(params, i, v);
        values[i] = RSTRING_PTR(v);
        lengths[i] = (int)RSTRING_LEN(v);
    }

    if (tc_store_send(&c->store, RSTRING_PTR(sql), (int)n, values, lengths, formats) != 0)
        raise_store_error(&c->store);
    c->busy = 1;
    c->pending = 1;
    ALLOCV_END(tmp1);
    ALLOCV_END(tmp2);
    ALLOCV_END(tmp3);
    RB_GC_GUARD(params);
    RB_GC_GUARD(sql);
    exec_args a = { self, c };
    return rb_ensure(exec_wait, (VALUE)&a, exec_done, (VALUE)&a);
}

/* #exec_script(sql): several statements, no parameters (migrations). */
static VALUE conn_exec_script(VALUE self, VALUE sql)
{
    tc_conn *c = get_conn(self);
    StringValueCStr(sql);
    if (c->busy)
        rb_raise(tc_eStoreError, "TaskerCore::Store::Connection is running a query for another thread");
    if (tc_store_send_script(&c->store, RSTRING_PTR(sql)) != 0)
        raise_store_error(&c->store);
    c->busy = 1;
    c->pending = 1;
    RB_GC_GUARD(sql);
    exec_args a = { self, c };
    rb_ensure(exec_wait, (VALUE)&a, exec_done, (VALUE)&a);
    return Qnil;
}

static VALUE conn_close(VALUE self)
{
    tc_conn *c = rb_check_typeddata(self, &conn_type);
    if (c->busy)
        rb_raise(tc_eStoreError, "cannot close a connection while another thread runs a query on it");
    tc_store_close(&c->store);
    return Qnil;
}

static VALUE conn_closed_p(VALUE self)
{
    tc_conn *c = rb_check_typeddata(self, &conn_type);
    return c->store.conn ? Qfalse : Qtrue;
}

static VALUE conn_in_transaction_p(VALUE self)
{
    return tc_store_in_transaction(&get_conn(self)->store) ? Qtrue : Qfalse;
}

static VALUE conn_usable_p(VALUE self)
{
    tc_conn *c = rb_check_typeddata(self, &conn_type);
    return (c->store.conn && c->store.pid == getpid() && tc_store_ok(&c->store)) ? Qtrue : Qfalse;
}

/* #alive?: usable? after reading what the server sent while the connection
 * sat idle (a server restart shows up here); true while a query runs. */
static VALUE conn_alive_p(VALUE self)
{
    tc_conn *c = rb_check_typeddata(self, &conn_type);
    if (c->busy)
        return Qtrue;
    return tc_store_check_idle(&c->store) ? Qtrue : Qfalse;
}

static VALUE conn_owner_pid(VALUE self)
{
    tc_conn *c = rb_check_typeddata(self, &conn_type);
    return c->store.conn ? LONG2NUM((long)c->store.pid) : Qnil;
}

static VALUE conn_server_version(VALUE self)
{
    return INT2NUM(PQserverVersion(get_conn(self)->store.conn));
}


/* ---- LISTEN/NOTIFY ---- */

/* Turns one PGnotify into [channel, payload, backend_pid] and frees it. */
static VALUE notify_to_ary(PGnotify *n)
{
    VALUE channel = rb_utf8_str_new_cstr(n->relname);
    VALUE payload = rb_utf8_str_new_cstr(n->extra ? n->extra : "");
    int pid = n->be_pid;
    PQfreemem(n);
    return rb_ary_new_from_args(3, channel, payload, INT2NUM(pid));
}

/* #wait_for_notify(timeout = nil) -> [channel, payload, backend_pid] or nil
 * after timeout seconds (nil waits forever). Returns a notification that
 * an earlier query already read at once. The wait is on the libpq socket
 * with the GVL released and is interruptible; the connection must have run
 * LISTEN itself (a session connection, not PgBouncer in transaction mode). */
static VALUE conn_wait_for_notify(int argc, VALUE *argv, VALUE self)
{
    VALUE timeout;
    rb_scan_args(argc, argv, "01", &timeout);
    double max_s = NIL_P(timeout) ? -1.0 : NUM2DBL(timeout);
    if (max_s < 0 && !NIL_P(timeout))
        rb_raise(rb_eArgError, "timeout must be nil or >= 0");
    tc_conn *c = get_conn(self);
    if (c->busy)
        rb_raise(tc_eStoreError, "TaskerCore::Store::Connection is running a query for another thread");
    double deadline = max_s >= 0 ? monotonic_now() + max_s : 0;

    for (;;) {
        PGnotify *n = PQnotifies(c->store.conn);
        if (n)
            return notify_to_ary(n);
        double left = -1.0;
        if (max_s >= 0) {
            left = deadline - monotonic_now();
            if (left <= 0)
                return Qnil;
        }
        /* the connection may be checked again after the wait (Thread#kill
         * ends the wait by raising, which leaves nothing half-read) */
        wait_fd(tc_store_socket(&c->store), RB_WAITFD_IN, left);
        c = get_conn(self);
        if (!PQconsumeInput(c->store.conn)) {
            snprintf(c->store.err, sizeof(c->store.err), "waiting for a notification: %s",
                     PQerrorMessage(c->store.conn));
            c->store.sqlstate[0] = '\0';
            raise_store_error(&c->store);
        }
    }
}

void tc_init_store(void)
{
    VALUE mStore = rb_define_module_under(tc_mTaskerCore, "Store");
    cConnection = rb_define_class_under(mStore, "Connection", rb_cObject);
    id_sqlstate = rb_intern("@sqlstate");
    rb_define_alloc_func(cConnection, conn_alloc);
    rb_define_method(cConnection, "initialize", conn_initialize, -1);
    rb_define_private_method(cConnection, "_exec", conn_exec, 2);
    rb_define_method(cConnection, "exec_script", conn_exec_script, 1);
    rb_define_method(cConnection, "close", conn_close, 0);
    rb_define_method(cConnection, "closed?", conn_closed_p, 0);
    rb_define_method(cConnection, "in_transaction?", conn_in_transaction_p, 0);
    rb_define_method(cConnection, "usable?", conn_usable_p, 0);
    rb_define_method(cConnection, "alive?", conn_alive_p, 0);
    rb_define_method(cConnection, "owner_pid", conn_owner_pid, 0);
    rb_define_method(cConnection, "server_version", conn_server_version, 0);
    rb_define_method(cConnection, "wait_for_notify", conn_wait_for_notify, -1);
}
