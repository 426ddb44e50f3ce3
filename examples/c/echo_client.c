/* ipad-echo-client: an ipad client in C, written from docs/protocol.md.
 *
 * The conformance contract: connect to $IPAD_SOCKET; HELLO; SUBSCRIBE; REQUEST_PROXY
 * {module: "echo"}; call `init` (a setup call); then for i in 0..N-1 (N =
 * $IPAD_CONFORMANCE_CALLS, default 20) CALL `echo {text: "frame-<i>"}` and CALL `checksum`
 * with a sealed memfd holding "frame-<i>" repeated to 4096 bytes, and print `<i> <text>
 * <crc32>`. When the proxy turns invalid (a proxy EVENT, or the channel ends) it sends
 * REOPEN_PROXY, replays `init`, sends PROXY_READY and retries the call. At the end
 * RELEASE_PROXY, GOODBYE, exit 0.
 *
 * Exit status: 0 done; 1 a refused request or a deadline passed; 2 the daemon broke the
 * protocol (a malformed packet) or left. Every wait is a poll() with a deadline. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "ipad_wire.h"

#define MODULE "echo"
#define BUFFER_SIZE 4096
/* How long one daemon request may take (REOPEN_PROXY waits up to a start_timeout, 5 s). */
#define REQUEST_MS 15000
/* How long one call may take in all, recoveries included, when the daemon gives none. */
#define CALL_MS 30000
/* Recoveries one call may go through before the client gives up. */
#define MAX_RECOVERIES 20

static int daemon_fd = -1;
static int channel = -1;
static uint64_t daemon_ids, channel_ids;
static int64_t proxy_id = -1;
static int64_t granted_seq; /* proxy EVENTs not after this are about an older channel */
static int invalid;         /* a proxy EVENT said our channel's worker is gone */
static int64_t call_ms = CALL_MS;
static uint8_t in[IPAD_MAX_PACKET];
static uint8_t out[IPAD_MAX_PACKET];
static ipad_frame reply; /* the last call's reply; its payload points into `in` */

static const uint8_t FROM_DAEMON[] = {T_WELCOME, T_PROXY_GRANTED, T_RELEASED, T_SUBSCRIBED,
                                      T_EVENT, T_STATUS_REPLY, T_MODULES, T_GOODBYE, T_ERROR,
                                      T_ADMIN_DONE, T_PROXY_STATE, 0};
static const uint8_t FROM_WORKER[] = {T_RESULT, T_MODULE_EVENT, T_ERROR, 0};

static void die(int status, const char *format, ...) {
    va_list args;
    va_start(args, format);
    fprintf(stderr, "ipad-echo-client: ");
    vfprintf(stderr, format, args);
    fprintf(stderr, "\n");
    va_end(args);
    exit(status);
}

/* Send to the daemon without blocking past `deadline`: its socket may be full. */
static void daemon_send(mp_writer *w, uint8_t type, uint64_t id, int64_t deadline) {
    for (;;) {
        if (ipad_send(daemon_fd, w, type, id, NULL, 0, MSG_DONTWAIT) == 0) return;
        if (errno != EAGAIN) die(2, "sending to the daemon: %s", strerror(errno));
        int64_t left = deadline - ipad_now_ms();
        if (left <= 0) die(1, "the daemon's socket stayed full");
        struct pollfd p = {daemon_fd, POLLOUT, 0};
        poll(&p, 1, (int)left);
    }
}

/* A string field of a decoded map, copied (cut) into out; "" if absent. */
typedef struct {
    int64_t seq, proxy_id, version, call_timeout_ms;
    char kind[32], state[32], code[64], message[512], module[129];
} fields;

static int copy_str(mp_reader *r, char *dst, size_t cap) {
    const char *s;
    uint32_t n;
    if (mp_peek(r) == MP_NIL) return mp_r_nil(r);
    if (mp_r_str(r, &s, &n) < 0) return -1;
    if (n >= cap) n = (uint32_t)cap - 1;
    memcpy(dst, s, n);
    dst[n] = 0;
    return 0;
}

/* The fields this client reads, from any message; every other field is skipped. */
static int decode(const ipad_frame *frame, fields *f) {
    mp_reader r;
    uint32_t n, klen;
    const char *key;
    double timeout = 0;
    memset(f, 0, sizeof *f);
    f->seq = f->proxy_id = f->version = -1;
    mp_r_init(&r, frame->payload, frame->length);
    mp_r_map(&r, &n);
    while (n-- && !r.error) {
        mp_r_str(&r, &key, &klen);
        int nil = mp_peek(&r) == MP_NIL;
        if (mp_eq(key, klen, "seq") && !nil) mp_r_int(&r, &f->seq);
        else if (mp_eq(key, klen, "proxy_id") && !nil) mp_r_int(&r, &f->proxy_id);
        else if (mp_eq(key, klen, "version") && !nil) mp_r_int(&r, &f->version);
        else if (mp_eq(key, klen, "call_timeout") && !nil) mp_r_number(&r, &timeout);
        else if (mp_eq(key, klen, "kind")) copy_str(&r, f->kind, sizeof f->kind);
        else if (mp_eq(key, klen, "state")) copy_str(&r, f->state, sizeof f->state);
        else if (mp_eq(key, klen, "code")) copy_str(&r, f->code, sizeof f->code);
        else if (mp_eq(key, klen, "message")) copy_str(&r, f->message, sizeof f->message);
        else if (mp_eq(key, klen, "module")) copy_str(&r, f->module, sizeof f->module);
        else mp_skip(&r);
    }
    if (timeout > 0 && timeout < 3600) f->call_timeout_ms = (int64_t)(timeout * 1000);
    return r.error || r.p != r.end ? -1 : 0;
}

/* Take one packet from the daemon (it is readable). Events are handled here; anything else
 * is returned. A malformed packet, a GOODBYE or the end of the connection ends the client. */
static void daemon_read(ipad_frame *frame, fields *f) {
    int got = ipad_recv(daemon_fd, in, FROM_DAEMON, frame);
    if (got == IPAD_OS_ERROR && errno == EAGAIN) {
        frame->type = 0;
        return;
    }
    if (got == IPAD_BROKEN) die(2, "malformed packet from the daemon: %s", ipad_broken_reason);
    if (got == IPAD_EOF) die(2, "the daemon closed the connection");
    if (got == IPAD_OS_ERROR) {
        /* ECONNRESET may come before a GOODBYE that is still readable: read on. */
        if (errno == ECONNRESET) {
            frame->type = 0;
            return;
        }
        die(2, "reading from the daemon: %s", strerror(errno));
    }
    if (decode(frame, f) < 0) {
        ipad_close_fds(frame);
        die(2, "malformed %d payload from the daemon", frame->type);
    }
    if (frame->type == T_GOODBYE) die(2, "the daemon said goodbye: %s", f->message);
    if (frame->type == T_EVENT) {
        /* "proxy" is the page's kind; "proxy_state" is accepted as the contract spells it. */
        int about_us = (strcmp(f->kind, "proxy") == 0 || strcmp(f->kind, "proxy_state") == 0) &&
                       f->proxy_id == proxy_id && proxy_id >= 0;
        if (about_us && f->seq > granted_seq && strcmp(f->state, "valid") != 0) invalid = 1;
        frame->type = 0; /* consumed */
    }
}

/* Send a request to the daemon and wait for its reply (PROXY_GRANTED's fd left in frame).
 * While waiting, events are handled and late replies to other ids dropped. */
static void daemon_request(mp_writer *w, uint8_t type, ipad_frame *frame, fields *f) {
    int64_t deadline = ipad_now_ms() + REQUEST_MS;
    uint64_t id = ++daemon_ids;
    daemon_send(w, type, id, deadline);
    for (;;) {
        int64_t left = deadline - ipad_now_ms();
        if (left <= 0) die(1, "no reply to message type %d within %d ms", type, REQUEST_MS);
        struct pollfd p = {daemon_fd, POLLIN, 0};
        if (poll(&p, 1, (int)left) <= 0) continue;
        daemon_read(frame, f);
        if (frame->type == 0) continue;
        if (frame->id == id) return;
        ipad_close_fds(frame); /* a reply to a request given up */
    }
}

static void begin(mp_writer *w, uint32_t fields_count) {
    ipad_begin(w, out);
    mp_w_map(w, fields_count);
}

/* --- the proxy's channel ------------------------------------------------------------- */

enum outcome { CALL_OK, CALL_ERROR, CALL_BROKEN };

/* One CALL on the channel: the reply's payload is left in `in` (frame/f). CALL_BROKEN: the
 * channel ended or the proxy turned invalid; recover and call again. */
static enum outcome channel_call(const char *method, const char *text, int buffer,
                                 ipad_frame *frame, int64_t deadline) {
    if (channel < 0 || invalid) return CALL_BROKEN;
    mp_writer w;
    begin(&w, 2 + (buffer >= 0));
    mp_w_cstr(&w, "method");
    mp_w_cstr(&w, method);
    mp_w_cstr(&w, "args");
    mp_w_map(&w, text != NULL);
    if (text != NULL) {
        mp_w_cstr(&w, "text");
        mp_w_cstr(&w, text);
    }
    if (buffer >= 0) {
        mp_w_cstr(&w, "fd_args");
        mp_w_array(&w, 1);
        mp_w_cstr(&w, "data");
    }
    uint64_t id = ++channel_ids;
    for (;;) { /* a worker that stops reading must not block us past the deadline */
        if (ipad_send(channel, &w, T_CALL, id, &buffer, buffer >= 0, MSG_DONTWAIT) == 0) break;
        if (errno != EAGAIN) return CALL_BROKEN; /* EPIPE, ECONNRESET: the worker is gone */
        int64_t left = deadline - ipad_now_ms();
        if (left <= 0) die(1, "call %s: the channel stayed full", method);
        struct pollfd p = {channel, POLLOUT, 0};
        poll(&p, 1, left > 100 ? 100 : (int)left);
    }
    for (;;) {
        int64_t left = deadline - ipad_now_ms();
        if (left <= 0) die(1, "call %s: no reply in time", method);
        struct pollfd p[2] = {{channel, POLLIN, 0}, {daemon_fd, POLLIN, 0}};
        if (poll(p, 2, (int)left) <= 0) continue;
        if (p[1].revents) {
            fields f;
            ipad_frame other;
            daemon_read(&other, &f);
            if (other.type != 0) ipad_close_fds(&other); /* no reply expected: drop */
            if (invalid) return CALL_BROKEN;
        }
        if (!p[0].revents) continue;
        int got = ipad_recv(channel, in, FROM_WORKER, frame);
        if (got == IPAD_OS_ERROR && errno == EAGAIN) continue;
        if (got != IPAD_PACKET) return CALL_BROKEN; /* end, reset or a broken packet */
        if (frame->type == T_MODULE_EVENT || frame->id != id) continue; /* not ours: drop */
        return frame->type == T_RESULT ? CALL_OK : CALL_ERROR;
    }
}

/* Ask for a new channel, replay `init` on it, and tell the daemon the replay is done. */
static void recover(int64_t deadline) {
    for (int attempt = 0;; attempt++) {
        if (attempt >= MAX_RECOVERIES || ipad_now_ms() > deadline) die(1, "could not recover");
        if (channel >= 0) close(channel);
        channel = -1;
        mp_writer w;
        ipad_frame frame;
        fields f;
        begin(&w, 1);
        mp_w_cstr(&w, "proxy_id");
        mp_w_int(&w, proxy_id);
        daemon_request(&w, T_REOPEN_PROXY, &frame, &f);
        if (frame.type == T_ERROR) {
            if (strcmp(f.code, "module_unavailable") != 0 && strcmp(f.code, "limit_exceeded") != 0)
                die(1, "REOPEN_PROXY refused: %s: %s", f.code, f.message);
            usleep(200000); /* the module is coming back: ask again */
            continue;
        }
        if (frame.type != T_PROXY_GRANTED || frame.nfds != 1 || f.proxy_id != proxy_id) {
            ipad_close_fds(&frame);
            die(2, "REOPEN_PROXY answered with message type %d", frame.type);
        }
        channel = frame.fds[0];
        granted_seq = f.seq;
        invalid = 0;
        int replayed = 0;
        enum outcome o = channel_call("init", NULL, -1, &frame, deadline);
        if (o == CALL_BROKEN) continue; /* the new worker died as well */
        if (o == CALL_OK) replayed = 1;
        begin(&w, 2);
        mp_w_cstr(&w, "proxy_id");
        mp_w_int(&w, proxy_id);
        mp_w_cstr(&w, "replayed");
        mp_w_int(&w, replayed);
        daemon_request(&w, T_PROXY_READY, &frame, &f);
        if (frame.type == T_ERROR) die(1, "PROXY_READY refused: %s: %s", f.code, f.message);
        fprintf(stderr, "ipad-echo-client: recovered proxy %" PRId64 " (replayed %d)\n",
                proxy_id, replayed);
        return;
    }
}

/* A call that survives worker restarts: recover and retry until its deadline. */
static void call(const char *method, const char *text, int buffer, fields *result) {
    int64_t deadline = ipad_now_ms() + call_ms;
    ipad_frame frame;
    for (;;) {
        enum outcome o = channel_call(method, text, buffer, &frame, deadline);
        if (o == CALL_BROKEN) {
            recover(deadline);
            continue;
        }
        if (decode(&frame, result) < 0) die(2, "malformed reply to %s", method);
        reply = frame;
        if (o == CALL_ERROR) {
            if (strcmp(method, "init") == 0 && strcmp(result->code, "unknown_method") == 0) {
                fprintf(stderr, "ipad-echo-client: the module has no init: nothing to replay\n");
                return;
            }
            die(1, "%s failed: %s: %s", method, result->code, result->message);
        }
        return;
    }
}

/* The value of RESULT {"value": {...}}: an int or a string field of that map. */
static int result_field(const char *name, int64_t *number, char *text, size_t cap) {
    mp_reader r;
    uint32_t n, m, klen;
    const char *key;
    int found = 0;
    mp_r_init(&r, reply.payload, reply.length);
    mp_r_map(&r, &n);
    while (n-- && !r.error) {
        mp_r_str(&r, &key, &klen);
        if (!mp_eq(key, klen, "value") || mp_peek(&r) != MP_MAP) {
            mp_skip(&r);
            continue;
        }
        mp_r_map(&r, &m);
        while (m-- && !r.error) {
            mp_r_str(&r, &key, &klen);
            if (mp_eq(key, klen, name) && number != NULL && mp_r_int(&r, number) == 0) found = 1;
            else if (mp_eq(key, klen, name) && text != NULL && copy_str(&r, text, cap) == 0)
                found = 1;
            else mp_skip(&r);
        }
    }
    return found && !r.error ? 0 : -1;
}

static int sealed_frame(const char *text) {
    int fd = memfd_create("ipad-echo-frame", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (fd < 0) die(1, "memfd_create: %s", strerror(errno));
    uint8_t data[BUFFER_SIZE];
    size_t len = strlen(text);
    for (size_t i = 0; i < BUFFER_SIZE; i++) data[i] = (uint8_t)text[i % len];
    if (pwrite(fd, data, BUFFER_SIZE, 0) != BUFFER_SIZE) die(1, "writing the frame");
    if (fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_FUTURE_WRITE) < 0)
        die(1, "sealing the frame: %s", strerror(errno));
    return fd;
}

int main(void) {
    const char *path = getenv("IPAD_SOCKET");
    const char *count = getenv("IPAD_CONFORMANCE_CALLS");
    long calls = count != NULL && *count ? strtol(count, NULL, 10) : 20;
    if (path == NULL || !*path) die(1, "IPAD_SOCKET is not set");
    if (calls < 0 || calls > 1000000) die(1, "IPAD_CONFORMANCE_CALLS out of range");
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof addr.sun_path) die(1, "socket path too long");
    strcpy(addr.sun_path, path);
    daemon_fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    if (daemon_fd < 0 || connect(daemon_fd, (struct sockaddr *)&addr, sizeof addr) < 0)
        die(1, "connecting to %s: %s", path, strerror(errno));

    mp_writer w;
    ipad_frame frame;
    fields f;
    begin(&w, 2);
    mp_w_cstr(&w, "versions");
    mp_w_array(&w, 1);
    mp_w_uint(&w, 1);
    mp_w_cstr(&w, "client");
    mp_w_cstr(&w, "ipad-echo-client");
    daemon_request(&w, T_HELLO, &frame, &f);
    if (frame.type != T_WELCOME || f.version != 1) die(1, "HELLO refused: %s", f.message);

    begin(&w, 0); /* SUBSCRIBE: without it no EVENT comes */
    daemon_request(&w, T_SUBSCRIBE, &frame, &f);
    if (frame.type != T_SUBSCRIBED) die(1, "SUBSCRIBE refused: %s", f.message);

    begin(&w, 1);
    mp_w_cstr(&w, "module");
    mp_w_cstr(&w, MODULE);
    daemon_request(&w, T_REQUEST_PROXY, &frame, &f);
    if (frame.type != T_PROXY_GRANTED || frame.nfds != 1 || f.proxy_id < 0) {
        ipad_close_fds(&frame);
        die(1, "REQUEST_PROXY refused: %s: %s", f.code, f.message);
    }
    channel = frame.fds[0];
    proxy_id = f.proxy_id;
    granted_seq = f.seq;
    if (f.call_timeout_ms > 0) call_ms = f.call_timeout_ms * 3; /* recovery included */

    call("init", NULL, -1, &f);
    for (long i = 0; i < calls; i++) {
        char text[64], echoed[64];
        snprintf(text, sizeof text, "frame-%ld", i);
        call("echo", text, -1, &f);
        if (result_field("text", NULL, echoed, sizeof echoed) < 0 || strcmp(echoed, text) != 0)
            die(1, "echo returned something else than %s", text);
        int buffer = sealed_frame(text);
        int64_t size = -1, crc = -1;
        call("checksum", NULL, buffer, &f);
        close(buffer);
        if (result_field("size", &size, NULL, 0) < 0 || result_field("crc32", &crc, NULL, 0) < 0 ||
            size != BUFFER_SIZE)
            die(1, "checksum returned no size of %d and crc32", BUFFER_SIZE);
        printf("%ld %s %" PRId64 "\n", i, echoed, crc);
        fflush(stdout);
    }

    begin(&w, 1);
    mp_w_cstr(&w, "proxy_id");
    mp_w_int(&w, proxy_id);
    daemon_request(&w, T_RELEASE_PROXY, &frame, &f);
    if (frame.type != T_RELEASED) die(1, "RELEASE_PROXY refused: %s: %s", f.code, f.message);
    close(channel);
    begin(&w, 1);
    mp_w_cstr(&w, "reason");
    mp_w_cstr(&w, "done");
    daemon_send(&w, T_GOODBYE, 0, ipad_now_ms() + REQUEST_MS);
    close(daemon_fd);
    return 0;
}
