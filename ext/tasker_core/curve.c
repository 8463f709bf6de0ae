/*
 * curve.c: CURVE socket options and the ZAP handler thread (see curve.h).
 * Plain C: never raises, never touches a Ruby object.
 */
#include "curve.h"

#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef struct tc_zap_domain {
    char name[TC_CURVE_DOMAIN_MAX + 1];
    uint8_t *keys; /* n * 32 bytes, sorted for bsearch */
    size_t n;
    tc_zap_counts counts;
} tc_zap_domain;

static pthread_mutex_t zap_lock = PTHREAD_MUTEX_INITIALIZER;
static tc_zap_domain *zap_domains;
static size_t zap_ndomains, zap_cap;
static void *zap_ctx;        /* the context the running handler serves */
static pid_t zap_pid;
static unsigned long domain_seq;
static pthread_once_t zap_once = PTHREAD_ONCE_INIT;
/* Under zap_lock: refused handshakes not yet taken (curve.h). */
static tc_zap_refusal zap_refusals[TC_ZAP_REFUSALS_MAX];
static size_t zap_nrefusals;
static uint64_t zap_refusals_overflow;

static void zap_after_fork_child(void)
{
    /* The handler thread did not survive the fork; the allow-lists did
     * (plain memory), and a new handler serves them on the new context. */
    pthread_mutex_init(&zap_lock, NULL);
    zap_ctx = NULL;
    /* The parent's refusals are the parent's to report. */
    zap_nrefusals = 0;
    zap_refusals_overflow = 0;
}

static void zap_init_once(void)
{
    pthread_atfork(NULL, NULL, zap_after_fork_child);
}

static void errf(char *err, size_t errlen, const char *fmt, ...)
{
    va_list ap;
    if (err == NULL || errlen == 0) return;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

void tc_curve_wipe(void *p, size_t n)
{
    volatile unsigned char *v = p;
    while (n--) *v++ = 0;
}

int tc_curve_available(void)
{
    return zmq_has("curve") ? 1 : 0;
}

static int key_cmp(const void *a, const void *b)
{
    return memcmp(a, b, TC_CURVE_KEY_BYTES);
}

/* Under zap_lock. */
static tc_zap_domain *find_domain(const char *name, size_t len)
{
    for (size_t i = 0; i < zap_ndomains; i++)
        if (strlen(zap_domains[i].name) == len && memcmp(zap_domains[i].name, name, len) == 0)
            return &zap_domains[i];
    return NULL;
}

int tc_zap_set_allowed(const char *domain, const uint8_t *keys, size_t n)
{
    uint8_t *copy = NULL;
    if (n > 0) {
        copy = malloc(n * TC_CURVE_KEY_BYTES);
        if (copy == NULL) {
            errno = ENOMEM;
            return -1;
        }
        memcpy(copy, keys, n * TC_CURVE_KEY_BYTES);
        qsort(copy, n, TC_CURVE_KEY_BYTES, key_cmp);
    }
    pthread_once(&zap_once, zap_init_once);
    pthread_mutex_lock(&zap_lock);
    tc_zap_domain *d = find_domain(domain, strlen(domain));
    if (d == NULL) {
        if (zap_ndomains == zap_cap) {
            size_t cap = zap_cap ? zap_cap * 2 : 8;
            tc_zap_domain *p = realloc(zap_domains, cap * sizeof(*p));
            if (p == NULL) {
                pthread_mutex_unlock(&zap_lock);
                free(copy);
                errno = ENOMEM;
                return -1;
            }
            zap_domains = p;
            zap_cap = cap;
        }
        d = &zap_domains[zap_ndomains++];
        memset(d, 0, sizeof(*d));
        snprintf(d->name, sizeof(d->name), "%s", domain);
    }
    free(d->keys);
    d->keys = copy;
    d->n = n;
    pthread_mutex_unlock(&zap_lock);
    return 0;
}

void tc_zap_forget(const char *domain)
{
    pthread_once(&zap_once, zap_init_once);
    pthread_mutex_lock(&zap_lock);
    tc_zap_domain *d = find_domain(domain, strlen(domain));
    if (d != NULL) {
        free(d->keys);
        *d = zap_domains[--zap_ndomains];
    }
    pthread_mutex_unlock(&zap_lock);
}

tc_zap_counts tc_zap_domain_counts(const char *domain)
{
    tc_zap_counts c = {0, 0};
    pthread_once(&zap_once, zap_init_once);
    pthread_mutex_lock(&zap_lock);
    tc_zap_domain *d = find_domain(domain, strlen(domain));
    if (d != NULL) c = d->counts;
    pthread_mutex_unlock(&zap_lock);
    return c;
}

/* Under zap_lock: counts a denied handshake under its key and domain. */
static void record_refusal(zmq_msg_t *domain, zmq_msg_t *cred)
{
    int has_key = cred != NULL && zmq_msg_size(cred) == TC_CURVE_KEY_BYTES;
    size_t dlen = zmq_msg_size(domain);
    tc_zap_refusal *r;

    if (dlen > TC_CURVE_DOMAIN_MAX) dlen = TC_CURVE_DOMAIN_MAX;
    for (size_t i = 0; i < zap_nrefusals; i++) {
        r = &zap_refusals[i];
        if (r->has_key == has_key && (!has_key || memcmp(r->key, zmq_msg_data(cred), TC_CURVE_KEY_BYTES) == 0) &&
            strlen(r->domain) == dlen && memcmp(r->domain, zmq_msg_data(domain), dlen) == 0) {
            r->count++;
            return;
        }
    }
    if (zap_nrefusals == TC_ZAP_REFUSALS_MAX) {
        zap_refusals_overflow++;
        return;
    }
    r = &zap_refusals[zap_nrefusals++];
    memset(r, 0, sizeof(*r));
    r->has_key = has_key;
    if (has_key) memcpy(r->key, zmq_msg_data(cred), TC_CURVE_KEY_BYTES);
    memcpy(r->domain, zmq_msg_data(domain), dlen);
    r->domain[dlen] = '\0';
    r->count = 1;
}

size_t tc_zap_take_refusals(tc_zap_refusal *out, size_t max, uint64_t *overflow)
{
    size_t n;

    pthread_once(&zap_once, zap_init_once);
    pthread_mutex_lock(&zap_lock);
    n = zap_nrefusals < max ? zap_nrefusals : max;
    memcpy(out, zap_refusals, n * sizeof(*out));
    memmove(zap_refusals, zap_refusals + n, (zap_nrefusals - n) * sizeof(*out));
    zap_nrefusals -= n;
    *overflow = zap_refusals_overflow;
    zap_refusals_overflow = 0;
    pthread_mutex_unlock(&zap_lock);
    return n;
}

/* Decides one handshake: CURVE, a known domain, and a key on its list. */
static int zap_decide(zmq_msg_t *domain, zmq_msg_t *mechanism, zmq_msg_t *cred)
{
    int ok = 0;
    pthread_mutex_lock(&zap_lock);
    tc_zap_domain *d = find_domain(zmq_msg_data(domain), zmq_msg_size(domain));
    if (d != NULL) {
        if (zmq_msg_size(mechanism) == 5 && memcmp(zmq_msg_data(mechanism), "CURVE", 5) == 0 &&
            cred != NULL && zmq_msg_size(cred) == TC_CURVE_KEY_BYTES && d->n > 0 &&
            bsearch(zmq_msg_data(cred), d->keys, d->n, TC_CURVE_KEY_BYTES, key_cmp) != NULL)
            ok = 1;
        if (ok)
            d->counts.allowed++;
        else
            d->counts.denied++;
    }
    if (!ok) record_refusal(domain, cred);
    pthread_mutex_unlock(&zap_lock);
    return ok;
}

#define ZAP_MAX_FRAMES 8

static void *zap_main(void *arg)
{
    void *rep = arg;
    for (;;) {
        zmq_msg_t f[ZAP_MAX_FRAMES], spill;
        size_t n = 0;
        int more, failed = 0;
        do {
            zmq_msg_t *m = n < ZAP_MAX_FRAMES ? &f[n] : &spill;
            zmq_msg_init(m);
            if (zmq_msg_recv(m, rep, 0) < 0) {
                int e = zmq_errno();
                zmq_msg_close(m);
                if (e == ETERM || e == ENOTSOCK) {
                    while (n > 0 && n <= ZAP_MAX_FRAMES) zmq_msg_close(&f[--n]);
                    zmq_close(rep);
                    return NULL;
                }
                failed = 1;
                break;
            }
            more = zmq_msg_more(m);
            if (m == &spill) zmq_msg_close(m);
            n++;
        } while (more);
        size_t kept = n < ZAP_MAX_FRAMES ? n : ZAP_MAX_FRAMES;
        if (failed) {
            /* An interrupted receive leaves no partial message to answer. */
            while (kept > 0) zmq_msg_close(&f[--kept]);
            continue;
        }
        /* RFC 27: version, request id, domain, address, routing id,
         * mechanism, credentials... */
        int ok = kept >= 6 && zap_decide(&f[2], &f[5], kept >= 7 ? &f[6] : NULL);
        const char *status = ok ? "200" : "400";
        const char *text = ok ? "OK" : "client key not allowed";
        const void *reqid = kept >= 2 ? zmq_msg_data(&f[1]) : "";
        size_t reqid_len = kept >= 2 ? zmq_msg_size(&f[1]) : 0;
        zmq_send(rep, "1.0", 3, ZMQ_SNDMORE);
        zmq_send(rep, reqid, reqid_len, ZMQ_SNDMORE);
        zmq_send(rep, status, 3, ZMQ_SNDMORE);
        zmq_send(rep, text, strlen(text), ZMQ_SNDMORE);
        zmq_send(rep, "", 0, ZMQ_SNDMORE); /* user id */
        zmq_send(rep, "", 0, 0);           /* metadata */
        while (kept > 0) zmq_msg_close(&f[--kept]);
    }
}

int tc_zap_ensure_started(char *err, size_t errlen)
{
    void *ctx = tc_context();
    if (ctx == NULL) {
        errf(err, errlen, "could not create the ZeroMQ context");
        return -1;
    }
    pthread_once(&zap_once, zap_init_once);
    pthread_mutex_lock(&zap_lock);
    if (zap_ctx == ctx && zap_pid == getpid()) {
        pthread_mutex_unlock(&zap_lock);
        return 0;
    }
    int rc = -1, e;
    void *rep = zmq_socket(ctx, ZMQ_REP);
    if (rep == NULL) goto fail;
    int zero = 0;
    zmq_setsockopt(rep, ZMQ_LINGER, &zero, sizeof(zero));
    if (zmq_bind(rep, TC_CURVE_ZAP_ENDPOINT) != 0) goto fail;
    pthread_t th;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    int prc = pthread_create(&th, &attr, zap_main, rep);
    pthread_attr_destroy(&attr);
    if (prc != 0) {
        errno = prc;
        errf(err, errlen, "could not start the ZAP handler thread: %s", strerror(prc));
        zmq_close(rep);
        pthread_mutex_unlock(&zap_lock);
        return -1;
    }
    zap_ctx = ctx;
    zap_pid = getpid();
    pthread_mutex_unlock(&zap_lock);
    return 0;
fail:
    e = zmq_errno();
    errf(err, errlen, "could not start the ZAP handler on %s: %s", TC_CURVE_ZAP_ENDPOINT, zmq_strerror(e));
    if (rep != NULL) zmq_close(rep);
    pthread_mutex_unlock(&zap_lock);
    errno = e;
    return rc;
}

void tc_curve_new_domain(char *buf, size_t len)
{
    unsigned long n = __atomic_add_fetch(&domain_seq, 1, __ATOMIC_RELAXED);
    snprintf(buf, len, "tasker.%ld.%lu", (long)getpid(), n);
}

int tc_curve_apply_server(tc_socket *s, const tc_curve_server *c, char *err, size_t errlen)
{
    if (!tc_curve_available()) {
        errf(err, errlen, "this libzmq was built without CURVE (zmq_has(\"curve\") is false)");
        errno = ENOTSUP;
        return -1;
    }
    if (tc_zap_ensure_started(err, errlen) < 0) return -1;
    if (tc_socket_set_int(s, ZMQ_CURVE_SERVER, 1, err, errlen) < 0 ||
        tc_socket_set_bytes(s, ZMQ_CURVE_SECRETKEY, c->secret_key, TC_CURVE_KEY_BYTES, err, errlen) < 0 ||
        tc_socket_set_bytes(s, ZMQ_ZAP_DOMAIN, c->domain, strlen(c->domain), err, errlen) < 0)
        return -1;
#ifdef ZMQ_ZAP_ENFORCE_DOMAIN
    /* Draft option in 4.3: when present, a missing handler denies rather than allows. */
    tc_socket_set_int(s, ZMQ_ZAP_ENFORCE_DOMAIN, 1, NULL, 0);
#endif
    return 0;
}

int tc_curve_apply_client(tc_socket *s, const tc_curve_client *c, char *err, size_t errlen)
{
    if (!tc_curve_available()) {
        errf(err, errlen, "this libzmq was built without CURVE (zmq_has(\"curve\") is false)");
        errno = ENOTSUP;
        return -1;
    }
    if (tc_socket_set_bytes(s, ZMQ_CURVE_SERVERKEY, c->server_key, TC_CURVE_KEY_BYTES, err, errlen) < 0 ||
        tc_socket_set_bytes(s, ZMQ_CURVE_PUBLICKEY, c->public_key, TC_CURVE_KEY_BYTES, err, errlen) < 0 ||
        tc_socket_set_bytes(s, ZMQ_CURVE_SECRETKEY, c->secret_key, TC_CURVE_KEY_BYTES, err, errlen) < 0)
        return -1;
    return 0;
}
