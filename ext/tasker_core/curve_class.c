/*
 * curve_class.c: TaskerCore::Curve, the Ruby side of curve.c: key pairs
 * (zmq_curve_keypair, Z85), public keys from secret keys, ZAP allow-lists
 * and their counters. Reading key files and configuration is Ruby
 * (lib/tasker_core/curve.rb).
 */
#include "tasker_core.h"

#include <string.h>

#include "curve.h"

static VALUE mCurve;

void tc_curve_key_from_ruby(VALUE z85, uint8_t out[TC_CURVE_KEY_BYTES], const char *what)
{
    char text[TC_CURVE_Z85_LEN + 1];
    if (!RB_TYPE_P(z85, T_STRING))
        rb_raise(tc_eConfigurationError, "%s must be a String of %d Z85 characters, got %s", what, TC_CURVE_Z85_LEN,
                 rb_obj_classname(z85));
    if (RSTRING_LEN(z85) != TC_CURVE_Z85_LEN)
        rb_raise(tc_eConfigurationError, "%s must be %d Z85 characters, got %ld", what, TC_CURVE_Z85_LEN,
                 (long)RSTRING_LEN(z85));
    memcpy(text, RSTRING_PTR(z85), TC_CURVE_Z85_LEN);
    text[TC_CURVE_Z85_LEN] = '\0';
    uint8_t *ok = zmq_z85_decode(out, text);
    tc_curve_wipe(text, sizeof(text));
    if (ok == NULL) rb_raise(tc_eConfigurationError, "%s is not valid Z85 text", what);
}

void tc_curve_allow_from_ruby(const char *domain, VALUE keys)
{
    keys = rb_Array(keys);
    long n = RARRAY_LEN(keys);
    /* A String holds the binary keys, so a raise below leaks nothing. */
    VALUE buf = rb_str_new(NULL, n * TC_CURVE_KEY_BYTES);
    for (long i = 0; i < n; i++)
        tc_curve_key_from_ruby(RARRAY_AREF(keys, i), (uint8_t *)RSTRING_PTR(buf) + i * TC_CURVE_KEY_BYTES,
                               "an allowed client key");
    if (tc_zap_set_allowed(domain, (const uint8_t *)RSTRING_PTR(buf), (size_t)n) < 0) rb_memerror();
    RB_GC_GUARD(buf);
}

/* TaskerCore::Curve.available? */
static VALUE curve_s_available(VALUE mod)
{
    return tc_curve_available() ? Qtrue : Qfalse;
}

/* TaskerCore::Curve.keypair -> [public_z85, secret_z85] */
static VALUE curve_s_keypair(VALUE mod)
{
    char pub[TC_CURVE_Z85_LEN + 1], sec[TC_CURVE_Z85_LEN + 1];
    if (zmq_curve_keypair(pub, sec) != 0) {
        int e = zmq_errno();
        rb_raise(tc_eConfigurationError, "could not make a CURVE key pair: %s", zmq_strerror(e));
    }
    VALUE pair = rb_assoc_new(rb_usascii_str_new(pub, TC_CURVE_Z85_LEN), rb_usascii_str_new(sec, TC_CURVE_Z85_LEN));
    tc_curve_wipe(sec, sizeof(sec));
    return pair;
}

/* TaskerCore::Curve.public_key(secret_z85) -> public_z85 */
static VALUE curve_s_public_key(VALUE mod, VALUE secret)
{
    uint8_t raw[TC_CURVE_KEY_BYTES];
    char sec[TC_CURVE_Z85_LEN + 1], pub[TC_CURVE_Z85_LEN + 1];
    tc_curve_key_from_ruby(secret, raw, "the secret key");
    tc_curve_wipe(raw, sizeof(raw));
    memcpy(sec, RSTRING_PTR(secret), TC_CURVE_Z85_LEN);
    sec[TC_CURVE_Z85_LEN] = '\0';
    int rc = zmq_curve_public(pub, sec);
    tc_curve_wipe(sec, sizeof(sec));
    if (rc != 0) rb_raise(tc_eConfigurationError, "could not derive the public key: %s", zmq_strerror(zmq_errno()));
    return rb_usascii_str_new(pub, TC_CURVE_Z85_LEN);
}

/* TaskerCore::Curve.valid_key?(str) */
static VALUE curve_s_valid_key_p(VALUE mod, VALUE str)
{
    uint8_t raw[TC_CURVE_KEY_BYTES];
    char text[TC_CURVE_Z85_LEN + 1];
    if (!RB_TYPE_P(str, T_STRING) || RSTRING_LEN(str) != TC_CURVE_Z85_LEN) return Qfalse;
    memcpy(text, RSTRING_PTR(str), TC_CURVE_Z85_LEN);
    text[TC_CURVE_Z85_LEN] = '\0';
    int ok = zmq_z85_decode(raw, text) != NULL;
    tc_curve_wipe(raw, sizeof(raw));
    tc_curve_wipe(text, sizeof(text));
    return ok ? Qtrue : Qfalse;
}

/* TaskerCore::Curve.new_domain -> "tasker.<pid>.<n>" */
static VALUE curve_s_new_domain(VALUE mod)
{
    char buf[TC_CURVE_DOMAIN_MAX + 1];
    tc_curve_new_domain(buf, sizeof(buf));
    return rb_usascii_str_new_cstr(buf);
}

/* TaskerCore::Curve.allow(domain, [public_z85, ...]) -> nil; swaps the list. */
static VALUE curve_s_allow(VALUE mod, VALUE domain, VALUE keys)
{
    const char *d = StringValueCStr(domain);
    if (strlen(d) > TC_CURVE_DOMAIN_MAX) rb_raise(rb_eArgError, "ZAP domain longer than %d bytes", TC_CURVE_DOMAIN_MAX);
    tc_curve_allow_from_ruby(d, keys);
    RB_GC_GUARD(domain);
    return Qnil;
}

static VALUE curve_s_forget(VALUE mod, VALUE domain)
{
    tc_zap_forget(StringValueCStr(domain));
    return Qnil;
}

/* TaskerCore::Curve.zap_counts(domain) -> {allowed:, denied:} */
static VALUE curve_s_zap_counts(VALUE mod, VALUE domain)
{
    tc_zap_counts c = tc_zap_domain_counts(StringValueCStr(domain));
    VALUE h = rb_hash_new();
    rb_hash_aset(h, ID2SYM(rb_intern("allowed")), ULL2NUM(c.allowed));
    rb_hash_aset(h, ID2SYM(rb_intern("denied")), ULL2NUM(c.denied));
    return h;
}

/* TaskerCore::Curve.take_refusals -> [{public_key:, domain:, count:}, ...]:
 * the handshakes the ZAP handler refused since the last call, one entry
 * per key and domain (public_key nil when the client sent no CURVE key);
 * refusals beyond the table come last as {public_key: nil, domain: nil,
 * count: n}. */
static VALUE curve_s_take_refusals(VALUE mod)
{
    tc_zap_refusal r[TC_ZAP_REFUSALS_MAX];
    uint64_t overflow = 0;
    size_t n = tc_zap_take_refusals(r, TC_ZAP_REFUSALS_MAX, &overflow);
    VALUE out = rb_ary_new_capa((long)n + 1);
    VALUE k_key = ID2SYM(rb_intern("public_key")), k_domain = ID2SYM(rb_intern("domain")),
          k_count = ID2SYM(rb_intern("count"));

    for (size_t i = 0; i < n; i++) {
        char z85[TC_CURVE_Z85_LEN + 1];
        VALUE h = rb_hash_new();
        rb_hash_aset(h, k_key,
                     r[i].has_key && zmq_z85_encode(z85, r[i].key, TC_CURVE_KEY_BYTES) != NULL
                         ? rb_usascii_str_new(z85, TC_CURVE_Z85_LEN)
                         : Qnil);
        rb_hash_aset(h, k_domain, rb_str_new_cstr(r[i].domain));
        rb_hash_aset(h, k_count, ULL2NUM(r[i].count));
        rb_ary_push(out, h);
    }
    if (overflow > 0) {
        VALUE h = rb_hash_new();
        rb_hash_aset(h, k_key, Qnil);
        rb_hash_aset(h, k_domain, Qnil);
        rb_hash_aset(h, k_count, ULL2NUM(overflow));
        rb_ary_push(out, h);
    }
    return out;
}

void tc_init_curve(void)
{
    mCurve = rb_define_module_under(tc_mTaskerCore, "Curve");
    rb_define_singleton_method(mCurve, "available?", curve_s_available, 0);
    rb_define_singleton_method(mCurve, "keypair", curve_s_keypair, 0);
    rb_define_singleton_method(mCurve, "public_key", curve_s_public_key, 1);
    rb_define_singleton_method(mCurve, "valid_key?", curve_s_valid_key_p, 1);
    rb_define_singleton_method(mCurve, "new_domain", curve_s_new_domain, 0);
    rb_define_singleton_method(mCurve, "allow", curve_s_allow, 2);
    rb_define_singleton_method(mCurve, "forget", curve_s_forget, 1);
    rb_define_singleton_method(mCurve, "zap_counts", curve_s_zap_counts, 1);
    rb_define_singleton_method(mCurve, "take_refusals", curve_s_take_refusals, 0);
    rb_define_const(mCurve, "ZAP_ENDPOINT", rb_str_freeze(rb_usascii_str_new_cstr(TC_CURVE_ZAP_ENDPOINT)));
}
