/*
 * codec.c: the plain-C half of the msgpack codec (no Ruby calls, never
 * raises). Owns the pack output buffer (msgpack_sbuffer behind a
 * msgpack_packer) and the decoder: msgpack-c's unpack_template.h
 * instantiated with callbacks that keep scalars as C values, check bounds,
 * depth, map key types and extension types, and describe any failure with
 * its byte offset. Containers are built through the tc_codec_build_*
 * functions of the binding (codec_class.c).
 */

#include "codec.h"
#include <msgpack/unpack_define.h>
#include <stdio.h>
#include <string.h>
#include <stdlib.h>

/* The template's fixed stack (MSGPACK_EMBED_STACK_SIZE, 32) is our depth
 * limit: a container nested deeper fails with MSGPACK_UNPACK_NOMEM_ERROR,
 * which nothing else can produce here. The pack side enforces the same. */
#if TC_CODEC_MAX_DEPTH != MSGPACK_EMBED_STACK_SIZE
#error "TC_CODEC_MAX_DEPTH must equal the unpack template's stack size"
#endif

/* ---- pack output buffer ------------------------------------------------ */

/* msgpack_packer's write callback. Most writes are headers of 1 to 9 bytes:
 * copy those inline rather than through memcpy; grow via msgpack-c. */
static int tc_codec_writer_write(void *data, const char *buf, size_t len)
{
    tc_codec_writer *w = data;
    msgpack_sbuffer *sb = &w->sbuf;

    if (sb->alloc - sb->size < len) {
        if (msgpack_sbuffer_write(sb, buf, len) != 0) {
            w->failed = 1;
            return -1;
        }
        return 0;
    }
    if (len <= 9) {
        char *dst = sb->data + sb->size;
        size_t i;
        for (i = 0; i < len; i++)
            dst[i] = buf[i];
    } else {
        memcpy(sb->data + sb->size, buf, len);
    }
    sb->size += len;
    return 0;
}

int tc_codec_writer_init(tc_codec_writer *w, size_t initial)
{
    msgpack_sbuffer_init(&w->sbuf);
    w->failed = 0;
    if (initial > 0) {
        w->sbuf.data = malloc(initial);
        if (!w->sbuf.data)
            return -1;
        w->sbuf.alloc = initial;
    }
    msgpack_packer_init(&w->pk, w, tc_codec_writer_write);
    return 0;
}

void tc_codec_writer_reset(tc_codec_writer *w)
{
    w->sbuf.size = 0;
    w->failed = 0;
}

void tc_codec_writer_destroy(tc_codec_writer *w)
{
    msgpack_sbuffer_destroy(&w->sbuf);
    w->sbuf.data = NULL;
    w->sbuf.size = w->sbuf.alloc = 0;
}

/* ---- decoder ----------------------------------------------------------- */

const char *tc_codec_type_name(tc_codec_type t)
{
    switch (t) {
    case TC_CODEC_T_NIL: return "nil";
    case TC_CODEC_T_TRUE:
    case TC_CODEC_T_FALSE: return "bool";
    case TC_CODEC_T_UINT:
    case TC_CODEC_T_INT: return "int";
    case TC_CODEC_T_FLOAT: return "float";
    case TC_CODEC_T_STR: return "str";
    case TC_CODEC_T_BIN: return "bin";
    case TC_CODEC_T_TIME: return "timestamp";
    case TC_CODEC_T_ARRAY: return "array";
    case TC_CODEC_T_MAP: return "map";
    }
    return "unknown";
}

/* Callback failures, beyond msgpack-c's own codes (-1 parse, -2 "no memory",
 * which with our fixed stack can only mean "too deep"). The details go in
 * the user struct; the template then reports the byte offset. */
enum {
    TC_E_COUNT = -10,       /* container count larger than the input allows */
    TC_E_EXT_TYPE = -11,    /* ext type other than -1 */
    TC_E_TIMESTAMP = -12,   /* malformed timestamp payload */
    TC_E_KEY_TYPE = -13     /* map key neither str, bin nor int */
};

typedef struct tc_unpack_user {
    tc_codec_decoder *d;
    int64_t detail;         /* count, ext type, payload size, ... */
    size_t at;              /* offset of the offending item, when known */
    tc_codec_type key_type;
    /* tc_codec_depth only: items left in each open container, mirroring
     * the template's stack (it has no "container done" callback). */
    int track_depth, top, max_depth;
    uint32_t left[TC_CODEC_MAX_DEPTH + 1];
} tc_unpack_user;

/* A container opened: one level deeper; an empty one closes at once. */
static inline void tc_depth_open(tc_unpack_user *u, unsigned int n)
{
    if (!u->track_depth) return;
    if (u->top + 1 > u->max_depth) u->max_depth = u->top + 1;
    if (n > 0 && u->top <= TC_CODEC_MAX_DEPTH) u->left[u->top++] = n;
}

/* An item (array) or entry (map) of the innermost open container ended. */
static inline void tc_depth_item(tc_unpack_user *u)
{
    if (u->track_depth && u->top > 0 && --u->left[u->top - 1] == 0) u->top--;
}

#define msgpack_unpack_func(ret, name) static inline ret tc_template##name
#define msgpack_unpack_callback(name) tc_cb##name
#define msgpack_unpack_struct(name) struct tc_template##name
#define msgpack_unpack_object tc_codec_val
#define msgpack_unpack_user tc_unpack_user

static inline tc_codec_val tc_cb_root(tc_unpack_user *u)
{
    tc_codec_val v;
    (void)u;
    memset(&v, 0, sizeof(v));
    v.type = TC_CODEC_T_NIL;
    return v;
}

#define TC_UINT_CB(name, ctype)                                                    \
    static inline int tc_cb##name(tc_unpack_user *u, ctype d, tc_codec_val *o)      \
    {                                                                              \
        (void)u;                                                                   \
        o->type = TC_CODEC_T_UINT;                                                 \
        o->v.u = d;                                                                \
        return 0;                                                                  \
    }
#define TC_INT_CB(name, ctype)                                                     \
    static inline int tc_cb##name(tc_unpack_user *u, ctype d, tc_codec_val *o)      \
    {                                                                              \
        (void)u;                                                                   \
        o->type = TC_CODEC_T_INT;                                                  \
        o->v.i = d;                                                                \
        return 0;                                                                  \
    }
TC_UINT_CB(_uint8, uint8_t)
TC_UINT_CB(_uint16, uint16_t)
TC_UINT_CB(_uint32, uint32_t)
TC_UINT_CB(_uint64, uint64_t)
TC_INT_CB(_int8, int8_t)
TC_INT_CB(_int16, int16_t)
TC_INT_CB(_int32, int32_t)
TC_INT_CB(_int64, int64_t)

static inline int tc_cb_float(tc_unpack_user *u, float d, tc_codec_val *o)
{
    (void)u;
    o->type = TC_CODEC_T_FLOAT;
    o->v.f = d;
    return 0;
}

static inline int tc_cb_double(tc_unpack_user *u, double d, tc_codec_val *o)
{
    (void)u;
    o->type = TC_CODEC_T_FLOAT;
    o->v.f = d;
    return 0;
}

static inline int tc_cb_nil(tc_unpack_user *u, tc_codec_val *o)
{
    (void)u;
    o->type = TC_CODEC_T_NIL;
    return 0;
}

static inline int tc_cb_true(tc_unpack_user *u, tc_codec_val *o)
{
    (void)u;
    o->type = TC_CODEC_T_TRUE;
    return 0;
}

static inline int tc_cb_false(tc_unpack_user *u, tc_codec_val *o)
{
    (void)u;
    o->type = TC_CODEC_T_FALSE;
    return 0;
}

/* Every array item takes at least one byte and every map entry two, so a
 * count beyond that cannot be honest: refuse it before the binding
 * pre-sizes anything with it. */
static inline int tc_cb_array(tc_unpack_user *u, unsigned int n, tc_codec_val *o)
{
    if ((size_t)n > u->d->len) {
        u->detail = n;
        return TC_E_COUNT;
    }
    tc_depth_open(u, n);
    if (u->d->check_only) {
        o->type = TC_CODEC_T_ARRAY;
        o->v.obj = 0;
        return 0;
    }
    tc_codec_build_array(u->d, (uint32_t)n, o);
    return 0;
}

static inline int tc_cb_map(tc_unpack_user *u, unsigned int n, tc_codec_val *o)
{
    if ((size_t)n > u->d->len / 2) {
        u->detail = n;
        return TC_E_COUNT;
    }
    tc_depth_open(u, n);
    if (u->d->check_only) {
        o->type = TC_CODEC_T_MAP;
        o->v.obj = 0;
        return 0;
    }
    tc_codec_build_map(u->d, (uint32_t)n, o);
    return 0;
}

static inline int tc_cb_array_item(tc_unpack_user *u, tc_codec_val *c, tc_codec_val o)
{
    tc_depth_item(u);
    if (!u->d->check_only) tc_codec_build_array_push(u->d, c, &o);
    return 0;
}

static inline int tc_cb_map_item(tc_unpack_user *u, tc_codec_val *c, tc_codec_val k, tc_codec_val v)
{
    switch (k.type) {
    case TC_CODEC_T_STR:
    case TC_CODEC_T_BIN:
    case TC_CODEC_T_UINT:
    case TC_CODEC_T_INT:
        tc_depth_item(u);
        if (!u->d->check_only) tc_codec_build_map_set(u->d, c, &k, &v);
        return 0;
    default:
        u->key_type = k.type;
        return TC_E_KEY_TYPE;
    }
}

static inline int tc_cb_str(tc_unpack_user *u, const char *b, const char *p, unsigned int l, tc_codec_val *o)
{
    (void)u;
    (void)b;
    o->type = TC_CODEC_T_STR;
    o->v.ptr = p;
    o->len = l;
    return 0;
}

static inline int tc_cb_bin(tc_unpack_user *u, const char *b, const char *p, unsigned int l, tc_codec_val *o)
{
    (void)u;
    (void)b;
    o->type = TC_CODEC_T_BIN;
    o->v.ptr = p;
    o->len = l;
    return 0;
}

/* p points at the ext type byte, l counts it too. Only the timestamp
 * extension (type -1, 4/8/12 bytes, nanoseconds below 1e9) is known. */
static inline int tc_cb_ext(tc_unpack_user *u, const char *b, const char *p, unsigned int l, tc_codec_val *o)
{
    msgpack_object obj;
    msgpack_timestamp ts;

    u->at = (size_t)(p - b);
    obj.type = MSGPACK_OBJECT_EXT;
    obj.via.ext.type = (int8_t)p[0];
    obj.via.ext.size = l - 1;
    obj.via.ext.ptr = p + 1;
    if (obj.via.ext.type != -1) {
        u->detail = obj.via.ext.type;
        return TC_E_EXT_TYPE;
    }
    if (!msgpack_object_to_timestamp(&obj, &ts) || ts.tv_nsec >= 1000000000u) {
        u->detail = obj.via.ext.size;
        return TC_E_TIMESTAMP;
    }
    o->type = TC_CODEC_T_TIME;
    o->v.i = ts.tv_sec;
    o->len = ts.tv_nsec;
    return 0;
}

#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wimplicit-fallthrough"
#pragma GCC diagnostic ignored "-Wsign-compare"
#endif
#include <msgpack/unpack_template.h>
#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif

/* What a header byte that the template stopped inside was announcing. */
static const char *tc_codec_cs_name(unsigned int cs)
{
    switch (cs) {
    case MSGPACK_CS_FLOAT:
    case MSGPACK_CS_DOUBLE: return "float";
    case MSGPACK_CS_UINT_8:
    case MSGPACK_CS_UINT_16:
    case MSGPACK_CS_UINT_32:
    case MSGPACK_CS_UINT_64:
    case MSGPACK_CS_INT_8:
    case MSGPACK_CS_INT_16:
    case MSGPACK_CS_INT_32:
    case MSGPACK_CS_INT_64: return "int";
    case MSGPACK_CS_STR_8:
    case MSGPACK_CS_STR_16:
    case MSGPACK_CS_STR_32: return "str length";
    case MSGPACK_CS_BIN_8:
    case MSGPACK_CS_BIN_16:
    case MSGPACK_CS_BIN_32: return "bin length";
    case MSGPACK_CS_EXT_8:
    case MSGPACK_CS_EXT_16:
    case MSGPACK_CS_EXT_32: return "ext length";
    case MSGPACK_CS_ARRAY_16:
    case MSGPACK_CS_ARRAY_32: return "array length";
    case MSGPACK_CS_MAP_16:
    case MSGPACK_CS_MAP_32: return "map length";
    case MSGPACK_ACS_STR_VALUE: return "str";
    case MSGPACK_ACS_BIN_VALUE: return "bin";
    default: return "ext";
    }
}

static int tc_codec_decode_mode(tc_codec_decoder *d, const char *buf, size_t len, tc_codec_val *out,
                                int check_only, int *depth);

int tc_codec_decode(tc_codec_decoder *d, const char *buf, size_t len, tc_codec_val *out)
{
    /* Callers fill the fields they know; check_only is ours to set. */
    return tc_codec_decode_mode(d, buf, len, out, 0, NULL);
}

/* depth non-NULL: also measure the nesting into *depth (check_only only). */
static int tc_codec_decode_mode(tc_codec_decoder *d, const char *buf, size_t len, tc_codec_val *out,
                                int check_only, int *depth)
{
    struct tc_template_context ctx;
    size_t off = 0;
    int ret;

    d->buf = buf;
    d->len = len;
    d->check_only = check_only;
    d->message[0] = '\0';
    if (len == 0) {
        snprintf(d->message, sizeof(d->message), "empty input: no msgpack value");
        return -1;
    }

    tc_template_init(&ctx);
    memset(&ctx.user, 0, sizeof(ctx.user));
    ctx.user.d = d;
    ctx.user.track_depth = depth != NULL;
    ret = tc_template_execute(&ctx, buf, len, &off);
    if (depth) *depth = ret == MSGPACK_UNPACK_NOMEM_ERROR ? TC_CODEC_MAX_DEPTH + 1 : ctx.user.max_depth;

    if (ret == 1) {
        if (off != len) {
            snprintf(d->message, sizeof(d->message),
                     "trailing bytes: the value ends at byte %zu of %zu", off, len);
            return -1;
        }
        *out = tc_template_data(&ctx);
        return 0;
    }

    switch (ret) {
    case 0:
        if (ctx.cs == MSGPACK_ACS_STR_VALUE || ctx.cs == MSGPACK_ACS_BIN_VALUE ||
            ctx.cs == MSGPACK_ACS_EXT_VALUE) {
            snprintf(d->message, sizeof(d->message),
                     "truncated input: %s at byte %zu declares %u bytes but only %zu remain",
                     tc_codec_cs_name(ctx.cs), off, ctx.trail, len - off);
        } else if (ctx.cs != MSGPACK_CS_HEADER) {
            snprintf(d->message, sizeof(d->message),
                     "truncated input: %s header cut off at byte %zu (%zu bytes in all)",
                     tc_codec_cs_name(ctx.cs), off, len);
        } else {
            snprintf(d->message, sizeof(d->message),
                     "truncated input: %zu bytes end inside an unfinished %s (%zu more items expected)",
                     len, ctx.top > 0 && ctx.stack[ctx.top - 1].ct == MSGPACK_CT_ARRAY_ITEM ? "array" : "map",
                     ctx.top > 0 ? ctx.stack[ctx.top - 1].count : (size_t)0);
        }
        break;
    case MSGPACK_UNPACK_PARSE_ERROR:
        snprintf(d->message, sizeof(d->message), "invalid byte 0x%02x at byte %zu",
                 (unsigned int)(unsigned char)buf[off], off);
        break;
    case MSGPACK_UNPACK_NOMEM_ERROR:
        snprintf(d->message, sizeof(d->message),
                 "nesting deeper than %d arrays/maps at byte %zu", TC_CODEC_MAX_DEPTH, off);
        break;
    case TC_E_COUNT:
        snprintf(d->message, sizeof(d->message),
                 "container at or before byte %zu declares %lld items, more than a %zu-byte input can hold",
                 off, (long long)ctx.user.detail, len);
        break;
    case TC_E_EXT_TYPE:
        snprintf(d->message, sizeof(d->message), "unknown ext type %lld at byte %zu",
                 (long long)ctx.user.detail, ctx.user.at);
        break;
    case TC_E_TIMESTAMP:
        snprintf(d->message, sizeof(d->message),
                 "malformed timestamp ext at byte %zu (%lld bytes, or nanoseconds >= 1e9)",
                 ctx.user.at, (long long)ctx.user.detail);
        break;
    case TC_E_KEY_TYPE:
        snprintf(d->message, sizeof(d->message),
                 "unsupported map key type %s (only str, bin and int keys) in the entry ending at byte %zu",
                 tc_codec_type_name(ctx.user.key_type), off);
        break;
    default:
        snprintf(d->message, sizeof(d->message), "malformed msgpack at byte %zu", off);
        break;
    }
    return -1;
}

int tc_codec_check(const char *buf, size_t len, char *message, size_t message_len)
{
    tc_codec_decoder d;
    tc_codec_val out;
    int rc;

    memset(&d, 0, sizeof(d));
    rc = tc_codec_decode_mode(&d, buf, len, &out, 1, NULL);
    if (rc != 0 && message != NULL && message_len > 0)
        snprintf(message, message_len, "%s", d.message);
    return rc;
}

int tc_codec_depth(const char *buf, size_t len, int *depth, char *message, size_t message_len)
{
    tc_codec_decoder d;
    tc_codec_val out;
    int rc, dummy;

    memset(&d, 0, sizeof(d));
    rc = tc_codec_decode_mode(&d, buf, len, &out, 1, depth ? depth : &dummy);
    if (rc != 0 && message != NULL && message_len > 0)
        snprintf(message, message_len, "%s", d.message);
    return rc;
}

/* Big-endian reads of 1, 2 or 4 bytes. */
static uint32_t tc_be(const unsigned char *p, int n)
{
    uint32_t v = 0;
    for (int i = 0; i < n; i++) v = (v << 8) | p[i];
    return v;
}

int tc_codec_skip(const char *buf, size_t len, size_t *value_len)
{
    const unsigned char *p = (const unsigned char *)buf;
    size_t off = 0;
    uint64_t left = 1; /* values still to skip: a container adds its items */
    while (left > 0) {
        if (off >= len) return -1;
        unsigned char b = p[off++];
        uint64_t body = 0, items = 0;
        int hdr = 0; /* bytes of length after the type byte */
        left--;
        if (b <= 0x7f || b >= 0xe0) {
            continue;                                /* fixint */
        } else if (b <= 0x8f) {
            items = 2u * (b & 0x0f);                 /* fixmap */
        } else if (b <= 0x9f) {
            items = b & 0x0f;                        /* fixarray */
        } else if (b <= 0xbf) {
            body = b & 0x1f;                         /* fixstr */
        } else {
            switch (b) {
            case 0xc0: case 0xc2: case 0xc3: continue;          /* nil, false, true */
            case 0xc4: case 0xd9: hdr = 1; break;               /* bin8, str8 */
            case 0xc5: case 0xda: hdr = 2; break;               /* bin16, str16 */
            case 0xc6: case 0xdb: hdr = 4; break;               /* bin32, str32 */
            case 0xc7: hdr = 1; body = 1; break;                /* ext8: + type byte */
            case 0xc8: hdr = 2; body = 1; break;                /* ext16 */
            case 0xc9: hdr = 4; body = 1; break;                /* ext32 */
            case 0xcc: case 0xd0: body = 1; break;
            case 0xcd: case 0xd1: body = 2; break;
            case 0xca: case 0xce: case 0xd2: body = 4; break;
            case 0xcb: case 0xcf: case 0xd3: body = 8; break;
            case 0xd4: body = 2; break;                         /* fixext 1..16: type + data */
            case 0xd5: body = 3; break;
            case 0xd6: body = 5; break;
            case 0xd7: body = 9; break;
            case 0xd8: body = 17; break;
            case 0xdc: case 0xde: hdr = 2; break;               /* array16, map16 */
            case 0xdd: case 0xdf: hdr = 4; break;               /* array32, map32 */
            default: return -1;                                 /* 0xc1, never used */
            }
            if (hdr) {
                if (len - off < (size_t)hdr) return -1;
                uint64_t n = tc_be(p + off, hdr);
                off += (size_t)hdr;
                if (b == 0xdc || b == 0xdd)
                    items = n;
                else if (b == 0xde || b == 0xdf)
                    items = 2 * n;
                else
                    body += n;
            }
        }
        if (body > len - off) return -1;
        off += (size_t)body;
        /* Every item takes at least a byte: a count the input cannot hold is malformed. */
        if (items > len - off) return -1;
        left += items;
    }
    *value_len = off;
    return 0;
}
