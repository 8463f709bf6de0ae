/*
 * codec_fuzz.c: libFuzzer harness for the msgpack decoder core
 * (ext/tasker_core/codec.c). The container builders, which the Ruby binding
 * implements, are replaced by plain C ones that count items and check the
 * invariants the decoder promises them: every str/bin lies inside the
 * input, map keys are str/bin/int, counts never exceed the input size.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "codec.h"

typedef struct fuzz_state {
    size_t items;
} fuzz_state;

static void check_val(tc_codec_decoder *d, const tc_codec_val *v)
{
    /* An empty str/bin may carry any pointer (msgpack-c leaves NULL). */
    if ((v->type == TC_CODEC_T_STR || v->type == TC_CODEC_T_BIN) && v->len > 0) {
        if (v->len > d->len || v->v.ptr < d->buf || v->v.ptr + v->len > d->buf + d->len) abort();
        /* Touch every byte so ASan sees an out-of-bounds pointer. */
        volatile unsigned char sink = 0;
        for (uint32_t i = 0; i < v->len; i++) sink ^= (unsigned char)v->v.ptr[i];
        (void)sink;
    }
    if (v->type == TC_CODEC_T_TIME && v->len >= 1000000000u) abort();
}

void tc_codec_build_array(tc_codec_decoder *d, uint32_t count, tc_codec_val *out)
{
    if (count > d->len) abort();
    out->type = TC_CODEC_T_ARRAY;
    out->v.obj = 0;
}

void tc_codec_build_map(tc_codec_decoder *d, uint32_t count, tc_codec_val *out)
{
    if (count > d->len) abort();
    out->type = TC_CODEC_T_MAP;
    out->v.obj = 0;
}

void tc_codec_build_array_push(tc_codec_decoder *d, tc_codec_val *array, const tc_codec_val *item)
{
    if (array->type != TC_CODEC_T_ARRAY) abort();
    check_val(d, item);
    ((fuzz_state *)d->user)->items++;
}

void tc_codec_build_map_set(tc_codec_decoder *d, tc_codec_val *map, const tc_codec_val *key,
                            const tc_codec_val *value)
{
    if (map->type != TC_CODEC_T_MAP) abort();
    if (key->type != TC_CODEC_T_STR && key->type != TC_CODEC_T_BIN && key->type != TC_CODEC_T_UINT &&
        key->type != TC_CODEC_T_INT)
        abort();
    check_val(d, key);
    check_val(d, value);
    ((fuzz_state *)d->user)->items++;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    /* A private copy, so reads past the end hit ASan's redzone. */
    char *buf = malloc(size ? size : 1);
    memcpy(buf, data, size);
    fuzz_state st = {0};
    tc_codec_decoder d;
    memset(&d, 0, sizeof(d));
    d.user = &st;
    tc_codec_val out;
    int rc = tc_codec_decode(&d, buf, size, &out);
    if (rc == 0) {
        check_val(&d, &out);
        /* A top-level success consumed every byte, so it cannot have more items than bytes. */
        if (st.items > size) abort();
    } else if (rc != -1 || d.message[0] == '\0' || strnlen(d.message, sizeof(d.message)) == sizeof(d.message)) {
        abort(); /* every failure says why */
    }
    /* The allocation-free check must agree with the full decode. */
    char why[200];
    if ((tc_codec_check(buf, size, why, sizeof(why)) == 0) != (rc == 0)) abort();
    /* The skipper finds a value's end inside the input; on an accepted
     * input the one value is the whole of it, and a prefix cut short of
     * the end holds no complete value. */
    size_t n = 0;
    int sk = tc_codec_skip(buf, size, &n);
    if (sk == 0 && (n == 0 || n > size)) abort();
    if (rc == 0 && (sk != 0 || n != size)) abort();
    if (rc == 0 && size > 0 && tc_codec_skip(buf, size - 1, &n) == 0) abort();
    free(buf);
    return 0;
}
