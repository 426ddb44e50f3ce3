/* The msgpack subset ipad's messages use; see msgpack.h. */
#include "msgpack.h"

#include <string.h>

void mp_w_init(mp_writer *w, uint8_t *buf, size_t cap) {
    w->buf = buf;
    w->cap = cap;
    w->len = 0;
    w->overflow = 0;
}

static void put(mp_writer *w, const void *data, size_t n) {
    if (w->overflow || n > w->cap - w->len) {
        w->overflow = 1;
        return;
    }
    memcpy(w->buf + w->len, data, n);
    w->len += n;
}

/* A type byte followed by `size` bytes of v, big-endian. */
static void put_be(mp_writer *w, uint8_t type, uint64_t v, int size) {
    uint8_t out[9];
    out[0] = type;
    for (int i = 0; i < size; i++) out[1 + i] = (uint8_t)(v >> (8 * (size - 1 - i)));
    put(w, out, 1 + (size_t)size);
}

static void put_header(mp_writer *w, uint32_t n, uint8_t fix, uint32_t fixmax, uint8_t t16,
                       uint8_t t32) {
    if (n <= fixmax) {
        uint8_t b = (uint8_t)(fix | n);
        put(w, &b, 1);
    } else if (n <= 0xffff) {
        put_be(w, t16, n, 2);
    } else {
        put_be(w, t32, n, 4);
    }
}

void mp_w_map(mp_writer *w, uint32_t entries) { put_header(w, entries, 0x80, 15, 0xde, 0xdf); }
void mp_w_array(mp_writer *w, uint32_t items) { put_header(w, items, 0x90, 15, 0xdc, 0xdd); }

void mp_w_str(mp_writer *w, const char *s, size_t len) {
    if (len > UINT32_MAX) {
        w->overflow = 1;
        return;
    }
    if (len <= 31) {
        uint8_t b = (uint8_t)(0xa0 | len);
        put(w, &b, 1);
    } else if (len <= 0xff) {
        put_be(w, 0xd9, len, 1);
    } else if (len <= 0xffff) {
        put_be(w, 0xda, len, 2);
    } else {
        put_be(w, 0xdb, len, 4);
    }
    put(w, s, len);
}

void mp_w_cstr(mp_writer *w, const char *s) { mp_w_str(w, s, strlen(s)); }

void mp_w_uint(mp_writer *w, uint64_t v) {
    if (v <= 0x7f) {
        uint8_t b = (uint8_t)v;
        put(w, &b, 1);
    } else if (v <= 0xff) {
        put_be(w, 0xcc, v, 1);
    } else if (v <= 0xffff) {
        put_be(w, 0xcd, v, 2);
    } else if (v <= 0xffffffffu) {
        put_be(w, 0xce, v, 4);
    } else {
        put_be(w, 0xcf, v, 8);
    }
}

void mp_w_int(mp_writer *w, int64_t v) {
    if (v >= 0) {
        mp_w_uint(w, (uint64_t)v);
    } else if (v >= -32) {
        uint8_t b = (uint8_t)(int8_t)v;
        put(w, &b, 1);
    } else {
        put_be(w, 0xd3, (uint64_t)v, 8);
    }
}

void mp_w_nil(mp_writer *w) { put(w, "\xc0", 1); }
void mp_w_bool(mp_writer *w, int v) { put(w, v ? "\xc3" : "\xc2", 1); }

void mp_r_init(mp_reader *r, const uint8_t *buf, size_t len) {
    r->p = buf;
    r->end = buf + len;
    r->error = 0;
}

static int fail(mp_reader *r) {
    r->error = 1;
    return -1;
}

/* Take n bytes (after the type byte) as a big-endian unsigned number. */
static int take_be(mp_reader *r, int n, uint64_t *v) {
    if (r->error || r->end - r->p < n) return fail(r);
    uint64_t out = 0;
    for (int i = 0; i < n; i++) out = (out << 8) | r->p[i];
    r->p += n;
    *v = out;
    return 0;
}

enum mp_type mp_peek(const mp_reader *r) {
    if (r->error || r->p >= r->end) return MP_BAD;
    uint8_t b = *r->p;
    if (b <= 0x7f || b >= 0xe0) return MP_INT;
    if (b <= 0x8f) return MP_MAP;
    if (b <= 0x9f) return MP_ARRAY;
    if (b <= 0xbf) return MP_STR;
    switch (b) {
    case 0xc0: return MP_NIL;
    case 0xc2: case 0xc3: return MP_BOOL;
    case 0xc4: case 0xc5: case 0xc6: return MP_BIN;
    case 0xc7: case 0xc8: case 0xc9: return MP_EXT;
    case 0xca: case 0xcb: return MP_FLOAT;
    case 0xcc: case 0xcd: case 0xce: case 0xcf: case 0xd0: case 0xd1: case 0xd2: case 0xd3:
        return MP_INT;
    case 0xd4: case 0xd5: case 0xd6: case 0xd7: case 0xd8: return MP_EXT;
    case 0xd9: case 0xda: case 0xdb: return MP_STR;
    case 0xdc: case 0xdd: return MP_ARRAY;
    case 0xde: case 0xdf: return MP_MAP;
    default: return MP_BAD; /* 0xc1 is never used */
    }
}

/* A container header: fix form (mask 0x0f) or 16/32-bit count. */
static int container(mp_reader *r, enum mp_type want, uint8_t t16, uint32_t *n) {
    if (mp_peek(r) != want) return fail(r);
    uint8_t b = *r->p++;
    uint64_t v;
    if (b == t16) {
        if (take_be(r, 2, &v) < 0) return -1;
    } else if (b == t16 + 1) {
        if (take_be(r, 4, &v) < 0) return -1;
    } else {
        v = b & 0x0f;
    }
    /* Every entry takes at least one byte: a count beyond what is left is a lie. */
    uint64_t least = want == MP_MAP ? 2 * v : v;
    if (least > (uint64_t)(r->end - r->p)) return fail(r);
    *n = (uint32_t)v;
    return 0;
}

int mp_r_map(mp_reader *r, uint32_t *entries) { return container(r, MP_MAP, 0xde, entries); }
int mp_r_array(mp_reader *r, uint32_t *items) { return container(r, MP_ARRAY, 0xdc, items); }

/* The length of a str or bin after its type byte. */
static int blob(mp_reader *r, const char **s, uint32_t *len) {
    uint8_t b = *r->p++;
    uint64_t n;
    if (b >= 0xa0 && b <= 0xbf) {
        n = b & 0x1f;
    } else if (b == 0xd9 || b == 0xc4) {
        if (take_be(r, 1, &n) < 0) return -1;
    } else if (b == 0xda || b == 0xc5) {
        if (take_be(r, 2, &n) < 0) return -1;
    } else {
        if (take_be(r, 4, &n) < 0) return -1;
    }
    if (n > (uint64_t)(r->end - r->p)) return fail(r);
    *s = (const char *)r->p;
    *len = (uint32_t)n;
    r->p += n;
    return 0;
}

int mp_r_str(mp_reader *r, const char **s, uint32_t *len) {
    if (mp_peek(r) != MP_STR) return fail(r);
    return blob(r, s, len);
}

int mp_r_int(mp_reader *r, int64_t *v) {
    if (mp_peek(r) != MP_INT) return fail(r);
    uint8_t b = *r->p++;
    uint64_t u;
    if (b <= 0x7f) {
        *v = b;
        return 0;
    }
    if (b >= 0xe0) {
        *v = (int8_t)b;
        return 0;
    }
    static const int sizes[] = {1, 2, 4, 8};
    int size = sizes[(b - 0xcc) & 3];
    if (take_be(r, size, &u) < 0) return -1;
    if (b <= 0xcf) { /* unsigned */
        if (u > INT64_MAX) return fail(r);
        *v = (int64_t)u;
    } else if (size == 1) {
        *v = (int8_t)u;
    } else if (size == 2) {
        *v = (int16_t)u;
    } else if (size == 4) {
        *v = (int32_t)u;
    } else {
        *v = (int64_t)u;
    }
    return 0;
}

int mp_r_number(mp_reader *r, double *v) {
    enum mp_type t = mp_peek(r);
    if (t == MP_INT) {
        int64_t i;
        if (mp_r_int(r, &i) < 0) return -1;
        *v = (double)i;
        return 0;
    }
    if (t != MP_FLOAT) return fail(r);
    uint8_t b = *r->p++;
    uint64_t u;
    if (b == 0xca) {
        if (take_be(r, 4, &u) < 0) return -1;
        uint32_t bits = (uint32_t)u;
        float f;
        memcpy(&f, &bits, sizeof f);
        *v = f;
    } else {
        if (take_be(r, 8, &u) < 0) return -1;
        memcpy(v, &u, sizeof *v);
    }
    return 0;
}

int mp_r_bool(mp_reader *r, int *v) {
    if (mp_peek(r) != MP_BOOL) return fail(r);
    *v = *r->p++ == 0xc3;
    return 0;
}

int mp_r_nil(mp_reader *r) {
    if (mp_peek(r) != MP_NIL) return fail(r);
    r->p++;
    return 0;
}

static int skip(mp_reader *r, int depth) {
    if (depth > MP_MAX_DEPTH) return fail(r);
    const char *s;
    uint32_t n;
    uint64_t len;
    int64_t i;
    double d;
    int b;
    switch (mp_peek(r)) {
    case MP_NIL: return mp_r_nil(r);
    case MP_BOOL: return mp_r_bool(r, &b);
    case MP_INT:
        if (*r->p == 0xcf) { /* a uint64 beyond int64 is valid msgpack: skip, do not judge */
            r->p++;
            return take_be(r, 8, &len);
        }
        return mp_r_int(r, &i);
    case MP_FLOAT: return mp_r_number(r, &d);
    case MP_STR: case MP_BIN: return blob(r, &s, &n);
    case MP_ARRAY:
        if (mp_r_array(r, &n) < 0) return -1;
        while (n--)
            if (skip(r, depth + 1) < 0) return -1;
        return 0;
    case MP_MAP:
        if (mp_r_map(r, &n) < 0) return -1;
        while (n--)
            if (skip(r, depth + 1) < 0 || skip(r, depth + 1) < 0) return -1;
        return 0;
    case MP_EXT: {
        uint8_t t = *r->p++;
        if (t >= 0xd4 && t <= 0xd8) {
            len = 1u << (t - 0xd4);
        } else if (take_be(r, t == 0xc7 ? 1 : t == 0xc8 ? 2 : 4, &len) < 0) {
            return -1;
        }
        if (len + 1 > (uint64_t)(r->end - r->p)) return fail(r); /* the ext's type byte too */
        r->p += len + 1;
        return 0;
    }
    default: return fail(r);
    }
}

int mp_skip(mp_reader *r) { return skip(r, 0); }

int mp_eq(const char *s, uint32_t len, const char *key) {
    return strlen(key) == len && memcmp(s, key, len) == 0;
}
