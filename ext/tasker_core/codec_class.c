/*
 * codec_class.c: the Ruby binding of the msgpack codec, TaskerCore::Codec.
 * Owns the walk from Ruby objects into msgpack-c's packer, the building of
 * Ruby objects for the decoder in codec.c, the exceptions, and the C API
 * (tc_codec_pack / tc_codec_unpack) that other files use.
 *
 * Type mapping and the choices made:
 *  - nil, true, false, Float (always float 64), Array, Hash as usual.
 *  - Integer: the whole int64 and uint64 range; anything outside raises
 *    RangeError.
 *  - String: UTF-8 and US-ASCII strings pack as str, ASCII-8BIT (binary)
 *    strings as bin. A string in any other encoding is packed as str after
 *    transcoding to UTF-8 (as-is when it is ASCII-only), so a receiver
 *    always gets UTF-8 text; a string that cannot be transcoded raises the
 *    Encoding error that String#encode raises. Bytes are not validated:
 *    invalid UTF-8 in a UTF-8 string goes out as it is. Unpacking gives
 *    UTF-8 strings for str and ASCII-8BIT strings for bin.
 *  - Symbol packs as str (unpacks as String, or as a Symbol for hash keys
 *    with symbolize_keys: true).
 *  - Time packs as the msgpack timestamp extension (type -1, the smallest of
 *    the 32/64/96-bit forms) with whole nanoseconds (a finer fraction is
 *    truncated) and unpacks as a UTC Time with the nanoseconds preserved.
 *  - Hash keys: String, Symbol and Integer only on pack (TypeError
 *    otherwise); str, bin and int keys only on unpack (ProtocolError
 *    otherwise), so whatever we pack we can read back. Keys unpack as
 *    frozen, deduplicated strings.
 *  - Anything else raises TypeError naming its class.
 *  - Nesting: at most TaskerCore::Codec::MAX_DEPTH (32) arrays/maps deep,
 *    both ways. On pack, deeper nesting and cyclic structures (an array or
 *    hash that contains itself) raise ArgumentError: they are a mistake of
 *    the caller, not of the wire. On unpack, everything wrong with the
 *    bytes raises TaskerCore::ProtocolError saying what and where.
 *
 * Memory: the pack buffer is released by rb_ensure whatever is raised in
 * the walk (a reused scratch buffer is marked free again; a fresh one is
 * freed); unpacking allocates no C memory at all (the decoder's state is on
 * the C stack and strings point into the input until they become Ruby
 * objects), so an exception halfway through leaks nothing.
 */
#include "tasker_core.h"
#include "codec.h"
#include <limits.h>
#include <string.h>
#include <time.h>

static VALUE tc_mCodec;
static int tc_enc_utf8;
static int tc_enc_usascii;
static int tc_enc_binary;

/* ---- pack -------------------------------------------------------------- */

/* Packing goes into one reusable scratch buffer (kept between calls, so the
 * common case neither mallocs nor reallocs), or, when that is busy (a pack
 * inside a pack, which nothing does today), into a fresh one. */
#define TC_SCRATCH_INITIAL (64 * 1024)
#define TC_SCRATCH_KEEP (1024 * 1024)   /* larger scratch buffers are given back */
static tc_codec_writer tc_scratch;
static int tc_scratch_ready;
static int tc_scratch_busy;

typedef struct tc_pack_state {
    tc_codec_writer *w;
    tc_codec_writer own;
    int depth;                                /* open containers */
    VALUE open[TC_CODEC_MAX_DEPTH];           /* the containers being packed */
    VALUE root;
    VALUE result;
} tc_pack_state;

static void tc_pack_value(tc_pack_state *st, VALUE obj);

static void tc_pack_check_len(long len, const char *what)
{
    if ((unsigned long)len > UINT32_MAX)
        rb_raise(rb_eArgError, "%s of %ld elements/bytes is too large for msgpack (4 GiB limit)", what, len);
}

static inline void tc_pack_raw_str(tc_pack_state *st, VALUE s, int bin)
{
    long len = RSTRING_LEN(s);
    tc_pack_check_len(len, "String");
    if (bin) {
        msgpack_pack_bin(&st->w->pk, (size_t)len);
        msgpack_pack_bin_body(&st->w->pk, RSTRING_PTR(s), (size_t)len);
    } else {
        tc_codec_put_str(st->w, RSTRING_PTR(s), (size_t)len);
    }
}

static void tc_pack_string(tc_pack_state *st, VALUE s)
{
    int idx = ENCODING_GET_INLINED(s);
    VALUE utf8;

    if (idx == tc_enc_utf8 || idx == tc_enc_usascii) {
        tc_pack_raw_str(st, s, 0);
        return;
    }
    if (idx == tc_enc_binary) {
        tc_pack_raw_str(st, s, 1);
        return;
    }
    if (rb_enc_asciicompat(rb_enc_from_index(idx)) && rb_enc_str_coderange(s) == ENC_CODERANGE_7BIT) {
        tc_pack_raw_str(st, s, 0);
        return;
    }
    utf8 = rb_str_encode(s, rb_enc_from_encoding(rb_utf8_encoding()), 0, Qnil);
    tc_pack_raw_str(st, utf8, 0);
    RB_GC_GUARD(utf8);
}

static void tc_pack_integer(tc_pack_state *st, VALUE obj)
{
    uint64_t mag;
    int sign;

    if (RB_FIXNUM_P(obj)) {
        tc_codec_put_int(st->w, (int64_t)FIX2LONG(obj));
        return;
    }
    /* Bignum: the magnitude must fit 64 bits, and a negative one 2**63. */
    sign = rb_integer_pack(obj, &mag, 1, sizeof(mag), 0, INTEGER_PACK_MSWORD_FIRST | INTEGER_PACK_NATIVE_BYTE_ORDER);
    if (sign == 1) {
        msgpack_pack_uint64(&st->w->pk, mag);
        return;
    }
    if (sign == -1 && mag <= (uint64_t)1 << 63) {
        msgpack_pack_int64(&st->w->pk, mag == (uint64_t)1 << 63 ? INT64_MIN : -(int64_t)mag);
        return;
    }
    rb_raise(rb_eRangeError, "Integer %" PRIsVALUE " is outside msgpack's range (-2**63 .. 2**64-1)", obj);
}

static void tc_pack_enter(tc_pack_state *st, VALUE obj)
{
    int i;
    for (i = 0; i < st->depth; i++) {
        if (st->open[i] == obj)
            rb_raise(rb_eArgError, "cannot pack a cyclic structure: this %" PRIsVALUE " contains itself",
                     rb_obj_class(obj));
    }
    if (st->depth >= TC_CODEC_MAX_DEPTH)
        rb_raise(rb_eArgError, "cannot pack nesting deeper than %d arrays/hashes (TaskerCore::Codec::MAX_DEPTH)",
                 TC_CODEC_MAX_DEPTH);
    st->open[st->depth++] = obj;
}

static int tc_pack_pair(VALUE key, VALUE value, VALUE arg)
{
    tc_pack_state *st = (tc_pack_state *)arg;

    if (RB_TYPE_P(key, T_STRING))
        tc_pack_string(st, key);
    else if (RB_SYMBOL_P(key))
        tc_pack_string(st, rb_sym2str(key));
    else if (RB_INTEGER_TYPE_P(key))
        tc_pack_integer(st, key);
    else
        rb_raise(rb_eTypeError, "cannot pack a Hash key of class %" PRIsVALUE
                 " (String, Symbol and Integer keys only)", rb_obj_class(key));
    tc_pack_value(st, value);
    return ST_CONTINUE;
}

static void tc_pack_value(tc_pack_state *st, VALUE obj)
{
    msgpack_packer *pk = &st->w->pk;

    if (RB_SPECIAL_CONST_P(obj)) {
        if (RB_FIXNUM_P(obj))
            tc_codec_put_int(st->w, (int64_t)FIX2LONG(obj));
        else if (NIL_P(obj))
            msgpack_pack_nil(pk);
        else if (obj == Qtrue)
            msgpack_pack_true(pk);
        else if (obj == Qfalse)
            msgpack_pack_false(pk);
        else if (RB_FLONUM_P(obj))
            msgpack_pack_double(pk, RFLOAT_VALUE(obj));
        else if (RB_STATIC_SYM_P(obj))
            tc_pack_string(st, rb_sym2str(obj));
        else
            goto unsupported;
        return;
    }

    switch (RB_BUILTIN_TYPE(obj)) {
    case T_STRING:
        tc_pack_string(st, obj);
        return;
    case T_HASH: {
        long n = (long)RHASH_SIZE(obj);
        tc_pack_check_len(n, "Hash");
        tc_pack_enter(st, obj);
        tc_codec_put_map(st->w, (size_t)n);
        rb_hash_foreach(obj, tc_pack_pair, (VALUE)st);
        st->depth--;
        return;
    }
    case T_ARRAY: {
        long i, n = RARRAY_LEN(obj);
        tc_pack_check_len(n, "Array");
        tc_pack_enter(st, obj);
        tc_codec_put_array(st->w, (size_t)n);
        for (i = 0; i < n; i++)
            tc_pack_value(st, RARRAY_AREF(obj, i));
        st->depth--;
        return;
    }
    case T_FLOAT:
        msgpack_pack_double(pk, RFLOAT_VALUE(obj));
        return;
    case T_BIGNUM:
        tc_pack_integer(st, obj);
        return;
    case T_SYMBOL:
        tc_pack_string(st, rb_sym2str(obj));
        return;
    case T_DATA:
        if (rb_obj_is_kind_of(obj, rb_cTime)) {
            struct timespec ts = rb_time_timespec(obj);
            msgpack_timestamp t;
            t.tv_sec = (int64_t)ts.tv_sec;
            t.tv_nsec = (uint32_t)ts.tv_nsec;
            msgpack_pack_timestamp(pk, &t);
            return;
        }
        break;
    default:
        break;
    }
unsupported:
    rb_raise(rb_eTypeError, "cannot pack an object of class %" PRIsVALUE
             " (nil, true, false, Integer, Float, String, Symbol, Array, Hash and Time only)",
             rb_obj_class(obj));
}

static VALUE tc_pack_body(VALUE arg)
{
    tc_pack_state *st = (tc_pack_state *)arg;
    tc_pack_value(st, st->root);
    if (st->w->failed)
        rb_memerror();
    st->result = rb_str_new(st->w->sbuf.data, (long)st->w->sbuf.size);
    return Qnil;
}

static VALUE tc_pack_cleanup(VALUE arg)
{
    tc_pack_state *st = (tc_pack_state *)arg;
    if (st->w == &tc_scratch) {
        if (tc_scratch.sbuf.alloc > TC_SCRATCH_KEEP) {
            tc_codec_writer_destroy(&tc_scratch);
            tc_scratch_ready = 0;
        }
        tc_scratch_busy = 0;
    } else {
        tc_codec_writer_destroy(st->w);
    }
    return Qnil;
}

VALUE tc_codec_pack(VALUE obj)
{
    tc_pack_state st;

    st.depth = 0;
    st.result = Qnil;
    st.root = obj;
    if (!tc_scratch_busy) {
        if (!tc_scratch_ready) {
            if (tc_codec_writer_init(&tc_scratch, TC_SCRATCH_INITIAL) != 0) {
                tc_codec_writer_destroy(&tc_scratch);
                rb_memerror();
            }
            tc_scratch_ready = 1;
        }
        tc_codec_writer_reset(&tc_scratch);
        tc_scratch_busy = 1;
        st.w = &tc_scratch;
    } else {
        if (tc_codec_writer_init(&st.own, 4096) != 0) {
            tc_codec_writer_destroy(&st.own);
            rb_memerror();
        }
        st.w = &st.own;
    }
    rb_ensure(tc_pack_body, (VALUE)&st, tc_pack_cleanup, (VALUE)&st);
    RB_GC_GUARD(obj);
    return st.result;
}

/* ---- unpack ------------------------------------------------------------ */

typedef struct tc_unpack_state {
    int symbolize_keys;
} tc_unpack_state;

static inline VALUE tc_interned(const char *ptr, uint32_t len, rb_encoding *enc)
{
    if (len == 0)
        ptr = "";
#ifdef HAVE_RB_ENC_INTERNED_STR
    return rb_enc_interned_str(ptr, (long)len, enc);
#else
    return rb_obj_freeze(rb_enc_str_new(ptr, (long)len, enc));
#endif
}

/* UTF-8 hash keys repeat from message to message ("step_id", "task_id",
 * ...). A small direct-mapped cache of the interned strings answers most
 * of them with one memcmp instead of a lookup in Ruby's fstring table. The
 * entries are marked (and so pinned) through a TypedData object that is
 * never collected; at most TC_KEY_CACHE_SIZE short strings stay alive. */
#define TC_KEY_CACHE_SIZE 512
#define TC_KEY_CACHE_MAXLEN 48
static VALUE tc_key_cache[TC_KEY_CACHE_SIZE];

static void tc_key_cache_mark(void *p)
{
    int i;
    (void)p;
    for (i = 0; i < TC_KEY_CACHE_SIZE; i++) {
        if (tc_key_cache[i])
            rb_gc_mark(tc_key_cache[i]);
    }
}

static const rb_data_type_t tc_key_cache_type = {
    "TaskerCore::Codec key cache",
    { tc_key_cache_mark, NULL, NULL, },
    0, 0, 0
};

static inline VALUE tc_utf8_key(const char *ptr, uint32_t len)
{
    uint32_t h = 2166136261u, i, slot;
    VALUE c;

    /* msgpack-c hands over an empty string as (NULL, 0); memcmp must not see NULL. */
    if (len == 0 || len > TC_KEY_CACHE_MAXLEN)
        return tc_interned(ptr, len, rb_utf8_encoding());
    for (i = 0; i < len; i++)
        h = (h ^ (unsigned char)ptr[i]) * 16777619u;
    slot = h & (TC_KEY_CACHE_SIZE - 1);
    c = tc_key_cache[slot];
    if (c && RSTRING_LEN(c) == (long)len && memcmp(RSTRING_PTR(c), ptr, len) == 0)
        return c;
    c = tc_interned(ptr, len, rb_utf8_encoding());
    tc_key_cache[slot] = c;
    return c;
}

static VALUE tc_val_to_ruby(const tc_codec_val *v)
{
    switch (v->type) {
    case TC_CODEC_T_NIL: return Qnil;
    case TC_CODEC_T_TRUE: return Qtrue;
    case TC_CODEC_T_FALSE: return Qfalse;
    case TC_CODEC_T_UINT: return ULL2NUM(v->v.u);
    case TC_CODEC_T_INT: return LL2NUM(v->v.i);
    case TC_CODEC_T_FLOAT: return DBL2NUM(v->v.f);
    case TC_CODEC_T_STR: return rb_utf8_str_new(v->len ? v->v.ptr : "", (long)v->len);
    case TC_CODEC_T_BIN: return rb_str_new(v->len ? v->v.ptr : "", (long)v->len);
    case TC_CODEC_T_TIME: {
        struct timespec ts;
        ts.tv_sec = (time_t)v->v.i;
        ts.tv_nsec = (long)v->len;
        return rb_time_timespec_new(&ts, INT_MAX - 1);   /* INT_MAX - 1: UTC */
    }
    case TC_CODEC_T_ARRAY:
    case TC_CODEC_T_MAP:
        return (VALUE)v->v.obj;
    }
    return Qnil;
}

void tc_codec_build_array(tc_codec_decoder *d, uint32_t count, tc_codec_val *out)
{
    out->type = TC_CODEC_T_ARRAY;
    out->v.obj = (uintptr_t)rb_ary_new_capa((long)count);
}

void tc_codec_build_map(tc_codec_decoder *d, uint32_t count, tc_codec_val *out)
{
    out->type = TC_CODEC_T_MAP;
    out->v.obj = (uintptr_t)rb_hash_new();
}

void tc_codec_build_array_push(tc_codec_decoder *d, tc_codec_val *array, const tc_codec_val *item)
{
    rb_ary_push((VALUE)array->v.obj, tc_val_to_ruby(item));
}

void tc_codec_build_map_set(tc_codec_decoder *d, tc_codec_val *map, const tc_codec_val *key,
                            const tc_codec_val *value)
{
    const tc_unpack_state *us = d->user;
    VALUE k, v;

    switch (key->type) {
    case TC_CODEC_T_STR:
        k = tc_utf8_key(key->v.ptr, key->len);
        if (us->symbolize_keys)
            k = rb_str_intern(k);
        break;
    case TC_CODEC_T_BIN:
        k = tc_interned(key->v.ptr, key->len, rb_ascii8bit_encoding());
        if (us->symbolize_keys)
            k = rb_str_intern(k);
        break;
    default:
        k = tc_val_to_ruby(key);
        break;
    }
    v = tc_val_to_ruby(value);
    rb_hash_aset((VALUE)map->v.obj, k, v);
}

VALUE tc_codec_unpack(const char *buf, size_t len, int symbolize_keys)
{
    tc_codec_decoder d;
    tc_unpack_state us;
    tc_codec_val out;

    us.symbolize_keys = symbolize_keys;
    d.user = &us;
    if (tc_codec_decode(&d, buf, len, &out) != 0)
        rb_raise(tc_eProtocolError, "msgpack: %s", d.message);
    return tc_val_to_ruby(&out);
}

/* ---- Ruby methods ------------------------------------------------------ */

/*
 * call-seq: TaskerCore::Codec.pack(obj) -> String (ASCII-8BIT)
 */
static VALUE tc_codec_s_pack(VALUE self, VALUE obj)
{
    return tc_codec_pack(obj);
}

/*
 * call-seq: TaskerCore::Codec.unpack(str, symbolize_keys: false) -> obj
 *
 * Raises TaskerCore::ProtocolError unless str is exactly one valid value.
 */
static VALUE tc_codec_s_unpack(int argc, VALUE *argv, VALUE self)
{
    static ID kw_ids[1];
    VALUE str, opts = Qnil, kw_vals[1] = { Qundef };
    int symbolize = 0;
    VALUE result;

    rb_scan_args(argc, argv, "1:", &str, &opts);
    if (!NIL_P(opts)) {
        if (!kw_ids[0])
            kw_ids[0] = rb_intern("symbolize_keys");
        rb_get_kwargs(opts, kw_ids, 0, 1, kw_vals);
        symbolize = kw_vals[0] != Qundef && RTEST(kw_vals[0]);
    }
    StringValue(str);
    result = tc_codec_unpack(RSTRING_PTR(str), (size_t)RSTRING_LEN(str), symbolize);
    RB_GC_GUARD(str);
    return result;
}

void tc_init_codec(void)
{
    tc_enc_utf8 = rb_utf8_encindex();
    tc_enc_usascii = rb_usascii_encindex();
    tc_enc_binary = rb_ascii8bit_encindex();

    tc_mCodec = rb_define_module_under(tc_mTaskerCore, "Codec");
    rb_gc_register_mark_object(TypedData_Wrap_Struct(0, &tc_key_cache_type, tc_key_cache));
    rb_define_const(tc_mCodec, "MAX_DEPTH", INT2FIX(TC_CODEC_MAX_DEPTH));
    rb_define_singleton_method(tc_mCodec, "pack", tc_codec_s_pack, 1);
    rb_define_singleton_method(tc_mCodec, "unpack", tc_codec_s_unpack, -1);
}
