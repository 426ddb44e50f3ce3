/* A minimal msgpack writer: what the stubs describe_to_c.py generates call on.
 *
 * Any msgpack library does (mpack, cmp, msgpack-c): map these functions onto
 * it. This one writes into a fixed buffer and remembers if it overflowed; the
 * encoding is msgpack's, big-endian, as docs/protocol.md says of payloads.
 */
#ifndef IPAD_WRITER_H
#define IPAD_WRITER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

typedef struct {
    uint8_t *data;
    size_t size;
    size_t used;
    bool overflow;
} ipad_writer;

/* A value already encoded as msgpack, written as it is (a schema the stubs do not map). */
typedef struct {
    const uint8_t *data;
    size_t size;
} ipad_raw;

static inline void ipad_w_bytes(ipad_writer *w, const void *bytes, size_t n) {
    if (w->overflow || n > w->size - w->used) {
        w->overflow = true;
        return;
    }
    memcpy(w->data + w->used, bytes, n);
    w->used += n;
}

static inline void ipad_w_be(ipad_writer *w, uint8_t tag, uint64_t v, int n) {
    uint8_t out[9] = {tag};
    for (int i = 0; i < n; i++) out[1 + i] = (uint8_t)(v >> (8 * (n - 1 - i)));
    ipad_w_bytes(w, out, (size_t)n + 1);
}

static inline void ipad_w_nil(ipad_writer *w) { ipad_w_be(w, 0xc0, 0, 0); }
static inline void ipad_w_bool(ipad_writer *w, bool v) { ipad_w_be(w, v ? 0xc3 : 0xc2, 0, 0); }

static inline void ipad_w_int(ipad_writer *w, int64_t v) {
    if (v >= 0 && v < 128) ipad_w_be(w, (uint8_t)v, 0, 0);
    else if (v < 0 && v >= -32) ipad_w_be(w, (uint8_t)(int8_t)v, 0, 0);
    else ipad_w_be(w, 0xd3, (uint64_t)v, 8);
}

static inline void ipad_w_double(ipad_writer *w, double v) {
    uint64_t bits;
    memcpy(&bits, &v, sizeof bits);
    ipad_w_be(w, 0xcb, bits, 8);
}

static inline void ipad_w_str(ipad_writer *w, const char *s) {
    size_t n = strlen(s);
    if (n < 32) ipad_w_be(w, (uint8_t)(0xa0 | n), 0, 0);
    else ipad_w_be(w, 0xdb, n, 4);
    ipad_w_bytes(w, s, n);
}

static inline void ipad_w_array(ipad_writer *w, size_t n) {
    if (n < 16) ipad_w_be(w, (uint8_t)(0x90 | n), 0, 0);
    else ipad_w_be(w, 0xdd, n, 4);
}

static inline void ipad_w_map(ipad_writer *w, size_t n) {
    if (n < 16) ipad_w_be(w, (uint8_t)(0x80 | n), 0, 0);
    else ipad_w_be(w, 0xdf, n, 4);
}

static inline void ipad_w_raw(ipad_writer *w, const ipad_raw *v) { ipad_w_bytes(w, v->data, v->size); }

#endif
