/* The msgpack subset ipad's messages use: a bounded writer and a bounded reader.
 *
 * msgpack is big-endian (only the ipad packet header is little-endian). The writer never
 * writes past its buffer: it sets `overflow` instead, and the caller refuses to send. The
 * reader never reads past its end and never recurses deeper than MP_MAX_DEPTH: any problem
 * sets `error`, and every later read fails too, so a caller checks once at the end. */
#ifndef IPAD_EXAMPLE_MSGPACK_H
#define IPAD_EXAMPLE_MSGPACK_H

#include <stddef.h>
#include <stdint.h>

/* Nesting a reader follows when it skips a value it does not know (an unknown field). */
#define MP_MAX_DEPTH 32

typedef struct {
    uint8_t *buf;
    size_t cap;
    size_t len;
    int overflow;
} mp_writer;

void mp_w_init(mp_writer *w, uint8_t *buf, size_t cap);
void mp_w_map(mp_writer *w, uint32_t entries);
void mp_w_array(mp_writer *w, uint32_t items);
void mp_w_str(mp_writer *w, const char *s, size_t len);
void mp_w_cstr(mp_writer *w, const char *s);
void mp_w_uint(mp_writer *w, uint64_t v);
void mp_w_int(mp_writer *w, int64_t v);
void mp_w_nil(mp_writer *w);
void mp_w_bool(mp_writer *w, int v);

enum mp_type { MP_NIL, MP_BOOL, MP_INT, MP_FLOAT, MP_STR, MP_BIN, MP_ARRAY, MP_MAP, MP_EXT, MP_BAD };

typedef struct {
    const uint8_t *p;
    const uint8_t *end;
    int error;
} mp_reader;

void mp_r_init(mp_reader *r, const uint8_t *buf, size_t len);
enum mp_type mp_peek(const mp_reader *r);
/* Each returns 0 on success, -1 (and sets r->error) if the next value is not of that type. */
int mp_r_map(mp_reader *r, uint32_t *entries);
int mp_r_array(mp_reader *r, uint32_t *items);
int mp_r_str(mp_reader *r, const char **s, uint32_t *len); /* not NUL-terminated */
int mp_r_int(mp_reader *r, int64_t *v);                    /* any int that fits int64 */
int mp_r_number(mp_reader *r, double *v);                  /* a float, or an int */
int mp_r_bool(mp_reader *r, int *v);
int mp_r_nil(mp_reader *r);
int mp_skip(mp_reader *r); /* any one value, however nested (up to MP_MAX_DEPTH) */

/* Whether the string s[0..len) is the C string key. */
int mp_eq(const char *s, uint32_t len, const char *key);

#endif
