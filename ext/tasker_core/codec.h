/*
 * codec.h: the msgpack codec shared by every C file of the extension.
 *
 * Two layers:
 *  - codec.c, plain C on msgpack-c, never calls Ruby and never raises: the
 *    output buffer for msgpack_packer, the timestamp extension, integer
 *    ranges, and the decoder (msgpack-c's unpack_template.h instantiated
 *    with our own callbacks) with every bounds, depth and type check and an
 *    error message that names the byte offset.
 *  - codec_class.c, the Ruby binding: walks Ruby objects into the packer,
 *    turns decoded values into Ruby objects, raises.
 *
 * Other C files use only tc_codec_pack / tc_codec_unpack (GVL held; they
 * raise TypeError/RangeError/ArgumentError on pack and
 * TaskerCore::ProtocolError on bad input).
 */
#ifndef TASKER_CORE_CODEC_H
#define TASKER_CORE_CODEC_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <msgpack.h>

/* Deepest nesting of arrays/maps accepted by pack and unpack alike: the
 * outermost container is depth 1. Exposed as TaskerCore::Codec::MAX_DEPTH. */
#define TC_CODEC_MAX_DEPTH 32

/* ---- Ruby-facing API (defined in codec_class.c) ------------------------- */
#ifdef RUBY_RUBY_H
VALUE tc_codec_pack(VALUE obj);
VALUE tc_codec_unpack(const char *buf, size_t len, int symbolize_keys);
#endif

/* ---- packing helpers (codec.c) ----------------------------------------- */

/* Output buffer for msgpack_packer: a msgpack_sbuffer plus a sticky failure
 * flag, so the walker need not check every msgpack_pack_* call; the caller
 * checks `failed` once at the end (and frees with tc_codec_writer_destroy on
 * every path, e.g. from rb_ensure). */
typedef struct tc_codec_writer {
    msgpack_sbuffer sbuf;
    msgpack_packer pk;
    int failed;
} tc_codec_writer;

int tc_codec_writer_init(tc_codec_writer *w, size_t initial);   /* 0, or -1 on ENOMEM */
void tc_codec_writer_reset(tc_codec_writer *w);                 /* empty it, keep the memory */
void tc_codec_writer_destroy(tc_codec_writer *w);               /* idempotent */

/* Fast paths for the most common items (short str, small int, small
 * map/array headers): written straight into the buffer when it has room,
 * otherwise through msgpack-c's packer. Same bytes as msgpack-c writes. */
static inline int tc_codec_writer_room(const tc_codec_writer *w, size_t n)
{
    return w->sbuf.alloc - w->sbuf.size >= n;
}

static inline void tc_codec_put_str(tc_codec_writer *w, const char *p, size_t len)
{
    if (len < 32 && tc_codec_writer_room(w, len + 1)) {
        char *d = w->sbuf.data + w->sbuf.size;
        d[0] = (char)(0xa0 | len);
        memcpy(d + 1, p, len);
        w->sbuf.size += len + 1;
        return;
    }
    msgpack_pack_str(&w->pk, len);
    msgpack_pack_str_body(&w->pk, p, len);
}

static inline void tc_codec_put_int(tc_codec_writer *w, int64_t v)
{
    if (v >= 0 && v < 128 && tc_codec_writer_room(w, 1)) {
        w->sbuf.data[w->sbuf.size++] = (char)v;
        return;
    }
    msgpack_pack_int64(&w->pk, v);
}

static inline void tc_codec_put_map(tc_codec_writer *w, size_t n)
{
    if (n < 16 && tc_codec_writer_room(w, 1)) {
        w->sbuf.data[w->sbuf.size++] = (char)(0x80 | n);
        return;
    }
    msgpack_pack_map(&w->pk, n);
}

static inline void tc_codec_put_array(tc_codec_writer *w, size_t n)
{
    if (n < 16 && tc_codec_writer_room(w, 1)) {
        w->sbuf.data[w->sbuf.size++] = (char)(0x90 | n);
        return;
    }
    msgpack_pack_array(&w->pk, n);
}

/* ---- decoding (codec.c) ------------------------------------------------ */

typedef enum tc_codec_type {
    TC_CODEC_T_NIL,
    TC_CODEC_T_TRUE,
    TC_CODEC_T_FALSE,
    TC_CODEC_T_UINT,
    TC_CODEC_T_INT,
    TC_CODEC_T_FLOAT,
    TC_CODEC_T_STR,
    TC_CODEC_T_BIN,
    TC_CODEC_T_TIME,
    TC_CODEC_T_ARRAY,       /* `obj` holds the container built by the binding */
    TC_CODEC_T_MAP
} tc_codec_type;

/* One decoded value. Scalars and str/bin (pointing into the input) stay plain
 * C until the binding turns them into Ruby objects, so a str is built as an
 * interned hash key or as a fresh String depending on where it lands. */
typedef struct tc_codec_val {
    tc_codec_type type;
    uint32_t len;                   /* str/bin length; nsec for TIME */
    union {
        uint64_t u;
        int64_t i;                  /* INT; seconds for TIME */
        double f;
        const char *ptr;            /* STR/BIN bytes inside the input */
        uintptr_t obj;              /* ARRAY/MAP: the Ruby VALUE */
    } v;
} tc_codec_val;

typedef struct tc_codec_decoder {
    void *user;                     /* the binding's state */
    const char *buf;
    size_t len;
    char message[200];              /* set when tc_codec_decode fails */
    int check_only;                 /* validate without calling the builders */
} tc_codec_decoder;

/* Decodes exactly one value that must span all of buf[0, len). Returns 0 and
 * fills *out, or -1 with d->message saying what was wrong and where.
 * Containers and their items go through the tc_codec_build_* functions below;
 * they may raise (memory), which is safe: the decoder's state lives on the C
 * stack and it holds no heap memory. `buf` must stay unchanged meanwhile. */
int tc_codec_decode(tc_codec_decoder *d, const char *buf, size_t len, tc_codec_val *out);

/* Implemented by the binding (codec_class.c), called by tc_codec_decode.
 * count is already checked against the input size. */
void tc_codec_build_array(tc_codec_decoder *d, uint32_t count, tc_codec_val *out);
void tc_codec_build_map(tc_codec_decoder *d, uint32_t count, tc_codec_val *out);
void tc_codec_build_array_push(tc_codec_decoder *d, tc_codec_val *array, const tc_codec_val *item);
/* key is STR, BIN, UINT or INT (the decoder refuses other key types). */
void tc_codec_build_map_set(tc_codec_decoder *d, tc_codec_val *map, const tc_codec_val *key,
                            const tc_codec_val *value);

const char *tc_codec_type_name(tc_codec_type t);

/* Checks, without allocating anything, that buf[0, len) is exactly one
 * msgpack value under the decoder's rules (depth <= TC_CODEC_MAX_DEPTH,
 * counts that the input can hold, str/bin/int map keys, only the timestamp
 * extension). Plain C, never raises: parsers built on msgpack-c's
 * msgpack_unpack_next call it first, because msgpack-c sizes its zone from
 * the declared counts (a 6-byte map header can make it ask for 64 GiB).
 * 0 ok; -1 with the reason in message. */
int tc_codec_check(const char *buf, size_t len, char *message, size_t message_len);

/* tc_codec_check that also reports the deepest nesting of arrays/maps in
 * *depth (a scalar is 0, {} is 1, {"a" => []} is 2). A value nested deeper
 * than TC_CODEC_MAX_DEPTH fails with *depth = TC_CODEC_MAX_DEPTH + 1; other
 * failures leave the depth seen so far. */
int tc_codec_depth(const char *buf, size_t len, int *depth, char *message, size_t message_len);

/* The length in bytes of the one msgpack value that starts at buf (buf may
 * go on after it), without decoding it: 0 with *value_len, or -1 when
 * buf[0, len) ends before the value does or holds the unused type 0xc1.
 * No depth limit and no allocation (a counter, not a stack): use it on
 * bytes tc_codec_check accepted to find where a value lies in them. */
int tc_codec_skip(const char *buf, size_t len, size_t *value_len);

#endif
