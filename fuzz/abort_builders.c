/*
 * abort_builders.c: the codec's container builders for harnesses that only
 * reach the decoder through tc_codec_check, which must never call them.
 */
#include <stdlib.h>

#include "codec.h"

void tc_codec_build_array(tc_codec_decoder *d, uint32_t count, tc_codec_val *out) { abort(); }
void tc_codec_build_map(tc_codec_decoder *d, uint32_t count, tc_codec_val *out) { abort(); }
void tc_codec_build_array_push(tc_codec_decoder *d, tc_codec_val *array, const tc_codec_val *item) { abort(); }
void tc_codec_build_map_set(tc_codec_decoder *d, tc_codec_val *map, const tc_codec_val *key, const tc_codec_val *value)
{
    abort();
}
