/*
 * curve.h: CurveZMQ for the batch and result channels.
 *
 * The orchestrator's sockets are CURVE servers, workers are CURVE clients.
 * Which client keys may connect is decided by a ZAP handler (RFC 27): a
 * plain-C thread that serves inproc://zeromq.zap.01 on the process's
 * libzmq context, started once per context (again in a forked child, which
 * gets a fresh context), never touching Ruby. Each server socket names a
 * ZAP domain; each domain has its own allow-list of client public keys,
 * swappable at any time under a mutex. A domain with no list denies every
 * client; a handshake from an unknown domain is denied too.
 *
 * Keys are 32 bytes; on the Ruby side they travel as Z85 text (40 chars).
 * Secret keys are wiped from the stack buffers that held them.
 */
#ifndef TASKER_CORE_CURVE_H
#define TASKER_CORE_CURVE_H

#include <stddef.h>
#include <stdint.h>

#include "socket.h"

#define TC_CURVE_KEY_BYTES 32
#define TC_CURVE_Z85_LEN 40
#define TC_CURVE_DOMAIN_MAX 63
#define TC_CURVE_ZAP_ENDPOINT "inproc://zeromq.zap.01"

/* Server side of one socket. secret_key is 32 binary bytes. */
typedef struct tc_curve_server {
    uint8_t secret_key[TC_CURVE_KEY_BYTES];
    char domain[TC_CURVE_DOMAIN_MAX + 1];
} tc_curve_server;

typedef struct tc_curve_client {
    uint8_t server_key[TC_CURVE_KEY_BYTES];
    uint8_t public_key[TC_CURVE_KEY_BYTES];
    uint8_t secret_key[TC_CURVE_KEY_BYTES];
} tc_curve_client;

typedef struct tc_zap_counts {
    uint64_t allowed;
    uint64_t denied;
} tc_zap_counts;

/* 1 when libzmq was built with CURVE (zmq_has("curve")). */
int tc_curve_available(void);

/* Starts the ZAP handler on this process's context if it is not running.
 * 0 ok; -1 with a sentence in err. Thread-safe. */
int tc_zap_ensure_started(char *err, size_t errlen);

/* Replaces the allow-list of a domain with n keys of 32 bytes each
 * (copied). n == 0 denies everyone. 0 ok; -1 ENOMEM. Thread-safe. */
int tc_zap_set_allowed(const char *domain, const uint8_t *keys, size_t n);

/* Forgets a domain (its handshakes are denied from now on). */
void tc_zap_forget(const char *domain);

/* Handshakes allowed and denied in a domain so far (zeros if unknown). */
tc_zap_counts tc_zap_domain_counts(const char *domain);

/*
 * Refused handshakes, for logging: the ZAP handler keeps one entry per
 * (client public key, domain) it denied, with a count, in a table of
 * TC_ZAP_REFUSALS_MAX; refusals that find it full are only counted
 * (overflow). Taking empties it. A forked child starts with an empty one.
 */
#define TC_ZAP_REFUSALS_MAX 64

typedef struct tc_zap_refusal {
    uint8_t key[TC_CURVE_KEY_BYTES];
    int has_key; /* 0 when the request carried no 32-byte CURVE key */
    char domain[TC_CURVE_DOMAIN_MAX + 1];
    uint64_t count;
} tc_zap_refusal;

/* Copies up to max entries into out (those not copied are kept), sets
 * *overflow to the refusals counted without an entry (and zeroes that
 * count); returns the number copied. Thread-safe. */
size_t tc_zap_take_refusals(tc_zap_refusal *out, size_t max, uint64_t *overflow);

/* Applies the server options (ZMQ_CURVE_SERVER, ZMQ_CURVE_SECRETKEY,
 * ZMQ_ZAP_DOMAIN) to an open, not yet bound socket and makes sure the ZAP
 * handler runs. 0 ok; -1 with err. */
int tc_curve_apply_server(tc_socket *s, const tc_curve_server *c, char *err, size_t errlen);

/* Applies the client options; before connect. 0 ok; -1 with err. */
int tc_curve_apply_client(tc_socket *s, const tc_curve_client *c, char *err, size_t errlen);

/* Writes a unique domain name for a new server ("tasker.<pid>.<n>"). */
void tc_curve_new_domain(char *buf, size_t len);

/* ---- Ruby-facing helpers (curve_class.c; GVL held, they raise) ---------- */
#ifdef RUBY_RUBY_H
/* Decodes a 40-character Z85 key into out; ConfigurationError naming
 * `what` otherwise (the key itself is never put in the message). */
void tc_curve_key_from_ruby(VALUE z85, uint8_t out[TC_CURVE_KEY_BYTES], const char *what);
/* Replaces a domain's allow-list with an Array of Z85 public keys. */
void tc_curve_allow_from_ruby(const char *domain, VALUE keys);
#endif

/* Overwrites memory that held a secret, in a way the compiler keeps. */
void tc_curve_wipe(void *p, size_t n);

#endif
