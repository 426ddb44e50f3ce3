/* ipad-echo-worker: a native ipad worker in C, written from docs/protocol.md.
 *
 * It serves one module (whatever LOAD names, e.g. `echo_c`) with these methods:
 *   init()                   a setup call: resets the instance's call counter; returns nil
 *   echo(text: str)          -> {"text": text}
 *   checksum(data: Buffer)   -> {"size": n, "crc32": zlib's crc32 of the n bytes}
 *
 * The daemon starts it with its control socket on fd 3 and `--parent-pid PID`. One thread,
 * one poll() over the control socket and every instance's channel; nothing blocks longer
 * than the heartbeat interval, and the heartbeat board's counter moves on every turn. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include "ipad_wire.h"

#ifndef ECHO_C_VERSION
#define ECHO_C_VERSION "1.0.0" /* READY's `version`: keep equal to the manifest's */
#endif

#define CONTROL_FD 3
#define MAX_INSTANCES 64
#define EXIT_LOAD_FAILED 3

typedef struct {
    uint64_t id;
    int sock; /* -1: free */
    uint64_t calls;
} instance;

static instance instances[MAX_INSTANCES];
static uint8_t in[IPAD_MAX_PACKET];
static uint8_t out[IPAD_MAX_PACKET];
static int loaded;
static char module[129];
static volatile uint64_t *board; /* [0] beats, [1] odd while a call runs; NULL: PING/PONG */
static size_t board_size;
static int interval_ms = 1000;
/* main's status: 2 after a control message we cannot read (a failure: a clean 0 would not be
 * restarted under restart = "on-failure"). */
static int exit_status;

static void logf_(const char *what) { fprintf(stderr, "echo_c: %s\n", what); }

static void on_sigterm(int sig) { _exit(128 + sig); }

/* --- replies on the control socket -------------------------------------------------- */

static void control_send(mp_writer *w, uint8_t type, uint64_t id) {
    /* The daemon reads its control socket all the time; a full one means it is gone. */
    if (ipad_send(CONTROL_FD, w, type, id, NULL, 0, 0) < 0) {
        logf_("control socket failed: exiting");
        _exit(1);
    }
}

static void control_error(uint64_t id, const char *code, const char *message) {
    mp_writer w;
    ipad_begin(&w, out);
    mp_w_map(&w, 3);
    mp_w_cstr(&w, "code");
    mp_w_cstr(&w, code);
    mp_w_cstr(&w, "message");
    mp_w_cstr(&w, message);
    mp_w_cstr(&w, "details");
    mp_w_map(&w, 0);
    control_send(&w, T_ERROR, id);
}

/* --- instances ------------------------------------------------------------------------ */

static instance *find(uint64_t id) {
    for (int i = 0; i < MAX_INSTANCES; i++)
        if (instances[i].sock >= 0 && instances[i].id == id) return &instances[i];
    return NULL;
}

/* Free an instance; `why` (not NULL) tells the daemon with INSTANCE_CLOSED. */
static void close_instance(instance *inst, const char *why) {
    if (why != NULL) {
        mp_writer w;
        ipad_begin(&w, out);
        mp_w_map(&w, 2);
        mp_w_cstr(&w, "instance_id");
        mp_w_uint(&w, inst->id);
        mp_w_cstr(&w, "reason");
        mp_w_cstr(&w, why);
        control_send(&w, T_INSTANCE_CLOSED, 0);
    }
    close(inst->sock);
    inst->sock = -1;
}

/* Send on a channel without waiting: a client that stops reading loses its instance, and
 * never stalls the others. Returns 0, or -1 after closing the instance. */
static int channel_send(instance *inst, mp_writer *w, uint8_t type, uint64_t id) {
    if (ipad_send(inst->sock, w, type, id, NULL, 0, MSG_DONTWAIT) == 0) return 0;
    close_instance(inst, errno == EAGAIN ? "client does not read its channel" : "channel failed");
    return -1;
}

static int channel_error(instance *inst, uint64_t id, const char *code, const char *message,
                         const char *fd_arg) {
    mp_writer w;
    ipad_begin(&w, out);
    mp_w_map(&w, 3);
    mp_w_cstr(&w, "code");
    mp_w_cstr(&w, code);
    mp_w_cstr(&w, "message");
    mp_w_cstr(&w, message);
    mp_w_cstr(&w, "details");
    mp_w_map(&w, fd_arg != NULL);
    if (fd_arg != NULL) {
        mp_w_cstr(&w, "fd_arg");
        mp_w_cstr(&w, fd_arg);
    }
    return channel_send(inst, &w, T_ERROR, id);
}

/* --- the module's methods --------------------------------------------------------------- */

/* Whether s is UTF-8, as every string on the wire must be: echo must not hand a client back
 * bytes its decoder refuses. No overlong forms, surrogates or code points past U+10FFFF. */
static int utf8_ok(const unsigned char *s, uint32_t len) {
    uint32_t i = 0;
    while (i < len) {
        unsigned char c = s[i];
        uint32_t need, cp;
        if (c < 0x80) {
            i++;
            continue;
        }
        if (c >= 0xc2 && c <= 0xdf) need = 1, cp = c & 0x1f;
        else if (c >= 0xe0 && c <= 0xef) need = 2, cp = c & 0x0f;
        else if (c >= 0xf0 && c <= 0xf4) need = 3, cp = c & 0x07;
        else return 0;
        if (len - i <= need) return 0;
        for (uint32_t k = 1; k <= need; k++) {
            if ((s[i + k] & 0xc0) != 0x80) return 0;
            cp = (cp << 6) | (s[i + k] & 0x3f);
        }
        if ((need == 2 && (cp < 0x800 || (cp >= 0xd800 && cp <= 0xdfff))) ||
            (need == 3 && (cp < 0x10000 || cp > 0x10ffff)))
            return 0;
        i += need + 1;
    }
    return 1;
}

typedef struct {
    const char *method;
    uint32_t method_len;
    const char *text; /* echo's argument; NULL if absent */
    uint32_t text_len;
    int unknown_arg;   /* an argument no method of ours has, or of the wrong type */
    int fd_args;       /* how many names fd_args had */
    int fd_arg_data;   /* whether fd_args was exactly ["data"] */
} call;

/* Decode a CALL's payload; unknown fields are skipped (newer peers add optional ones). */
static int decode_call(const ipad_frame *frame, call *c) {
    mp_reader r;
    uint32_t n, m;
    const char *key;
    uint32_t klen;
    memset(c, 0, sizeof *c);
    mp_r_init(&r, frame->payload, frame->length);
    mp_r_map(&r, &n);
    while (n-- && !r.error) {
        mp_r_str(&r, &key, &klen);
        if (mp_eq(key, klen, "method")) {
            mp_r_str(&r, &c->method, &c->method_len);
        } else if (mp_eq(key, klen, "args")) {
            mp_r_map(&r, &m);
            while (m-- && !r.error) {
                mp_r_str(&r, &key, &klen);
                if (mp_eq(key, klen, "text") && mp_peek(&r) == MP_STR) {
                    mp_r_str(&r, &c->text, &c->text_len);
                } else {
                    c->unknown_arg = 1;
                    mp_skip(&r);
                }
            }
        } else if (mp_eq(key, klen, "fd_args")) {
            mp_r_array(&r, &m);
            c->fd_args = (int)m;
            for (uint32_t i = 0; i < m && !r.error; i++) {
                mp_r_str(&r, &key, &klen);
                c->fd_arg_data = m == 1 && mp_eq(key, klen, "data");
            }
        } else {
            mp_skip(&r);
        }
    }
    if (r.error || c->method == NULL || r.p != r.end) return -1;
    /* Strings are UTF-8 on the wire; one that is not makes the packet malformed. */
    if (!utf8_ok((const unsigned char *)c->method, c->method_len)) return -1;
    if (c->text != NULL && !utf8_ok((const unsigned char *)c->text, c->text_len)) return -1;
    return 0;
}

static void run_call(instance *inst, const ipad_frame *frame, const call *c) {
    mp_writer w;
    ipad_begin(&w, out);
    char message[256];
    int is_echo = mp_eq(c->method, c->method_len, "echo");
    int is_checksum = mp_eq(c->method, c->method_len, "checksum");
    int is_init = mp_eq(c->method, c->method_len, "init");
    if (!is_echo && !is_checksum && !is_init) {
        snprintf(message, sizeof message, "%s has no method '%.*s'; methods: checksum, echo, init",
                 module, (int)(c->method_len > 64 ? 64 : c->method_len), c->method);
        channel_error(inst, frame->id, "unknown_method", message, NULL);
        return;
    }
    if (c->fd_args != frame->nfds) {
        snprintf(message, sizeof message, "%d fds for %d fd arguments", frame->nfds, c->fd_args);
        channel_error(inst, frame->id, "bad_arguments", message, NULL);
        return;
    }
    if (is_init) {
        if (c->unknown_arg || c->text != NULL || frame->nfds != 0) {
            channel_error(inst, frame->id, "bad_arguments", "init() takes no arguments", NULL);
            return;
        }
        inst->calls = 0;
        mp_w_map(&w, 1);
        mp_w_cstr(&w, "value");
        mp_w_nil(&w);
        channel_send(inst, &w, T_RESULT, frame->id);
        return;
    }
    if (is_echo) {
        if (c->unknown_arg || c->text == NULL || frame->nfds != 0) {
            channel_error(inst, frame->id, "bad_arguments",
                          "echo() takes one argument, 'text' (a string), and no buffer", NULL);
            return;
        }
        mp_w_map(&w, 1);
        mp_w_cstr(&w, "value");
        mp_w_map(&w, 1);
        mp_w_cstr(&w, "text");
        mp_w_str(&w, c->text, c->text_len);
        if (w.overflow) {
            channel_error(inst, frame->id, "bad_arguments", "echo() text too long to return", NULL);
            return;
        }
        inst->calls++;
        channel_send(inst, &w, T_RESULT, frame->id);
        return;
    }
    /* checksum(data: Buffer): refuse what could SIGBUS us, then read the whole file from
     * offset 0, its size from fstat. */
    if (c->unknown_arg || c->text != NULL || !c->fd_arg_data) {
        channel_error(inst, frame->id, "bad_arguments",
                      "checksum() takes one buffer argument, 'data'", NULL);
        return;
    }
    int fd = frame->fds[0];
    int seals = fcntl(fd, F_GET_SEALS);
    struct stat st;
    if (seals < 0 || !(seals & F_SEAL_SHRINK)) {
        channel_error(inst, frame->id, "bad_arguments",
                      "buffer 'data' cannot be mapped: the memfd is not sealed against "
                      "shrinking (F_SEAL_SHRINK)", "data");
        return;
    }
    if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
        channel_error(inst, frame->id, "bad_arguments", "buffer 'data' is not a file", "data");
        return;
    }
    uint32_t crc = 0;
    if (st.st_size > 0) {
        void *map = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_SHARED, fd, 0);
        if (map == MAP_FAILED) {
            snprintf(message, sizeof message, "buffer 'data' cannot be mapped: %s",
                     strerror(errno));
            channel_error(inst, frame->id, "bad_arguments", message, "data");
            return;
        }
        crc = ipad_crc32(0, map, (size_t)st.st_size);
        munmap(map, (size_t)st.st_size);
    }
    mp_w_map(&w, 1);
    mp_w_cstr(&w, "value");
    mp_w_map(&w, 2);
    mp_w_cstr(&w, "size");
    mp_w_uint(&w, (uint64_t)st.st_size);
    mp_w_cstr(&w, "crc32");
    mp_w_uint(&w, crc);
    inst->calls++;
    channel_send(inst, &w, T_RESULT, frame->id);
}

static void on_channel(instance *inst) {
    static const uint8_t allowed[] = {T_CALL, 0};
    ipad_frame frame;
    int got = ipad_recv(inst->sock, in, allowed, &frame);
    if (got == IPAD_OS_ERROR && errno == EAGAIN) return;
    if (got == IPAD_EOF) {
        close_instance(inst, "client closed the channel");
        return;
    }
    if (got == IPAD_OS_ERROR) {
        close_instance(inst, "channel failed");
        return;
    }
    char why[200];
    if (got == IPAD_BROKEN) {
        snprintf(why, sizeof why, "protocol error: %s", ipad_broken_reason);
        if (channel_error(inst, ipad_broken_id, "bad_message", ipad_broken_reason, NULL) == 0)
            close_instance(inst, why);
        return;
    }
    call c;
    if (decode_call(&frame, &c) < 0) {
        ipad_close_fds(&frame);
        if (channel_error(inst, frame.id, "bad_message", "bad CALL payload", NULL) == 0)
            close_instance(inst, "protocol error: bad CALL payload");
        return;
    }
    /* The board's second counter is odd while module code runs (the daemon times it). */
    if (board_size >= 16) board[1]++;
    run_call(inst, &frame, &c);
    if (board_size >= 16) board[1]++;
    ipad_close_fds(&frame); /* a call's buffers live as long as the call */
}

/* --- control ---------------------------------------------------------------------------- */

static void on_load(const ipad_frame *frame) {
    mp_reader r;
    uint32_t n, klen;
    const char *key, *name = NULL;
    uint32_t name_len = 0;
    double interval = 0;
    mp_r_init(&r, frame->payload, frame->length);
    mp_r_map(&r, &n);
    while (n-- && !r.error) {
        mp_r_str(&r, &key, &klen);
        if (mp_eq(key, klen, "module")) {
            mp_r_str(&r, &name, &name_len);
        } else if (mp_eq(key, klen, "heartbeat_interval")) {
            mp_r_number(&r, &interval);
        } else {
            mp_skip(&r); /* entry_point, module_dir, tuning, signed: nothing for us */
        }
    }
    if (r.error || name == NULL || name_len > 128) {
        control_error(frame->id, "module_error", "bad LOAD payload");
        _exit(EXIT_LOAD_FAILED);
    }
    memcpy(module, name, name_len);
    module[name_len] = 0;
    if (frame->nfds == 1 && interval > 0) {
        struct stat st;
        if (fstat(frame->fds[0], &st) == 0 && st.st_size >= 8) {
            board_size = st.st_size >= 16 ? 16 : 8;
            void *map = mmap(NULL, board_size, PROT_READ | PROT_WRITE, MAP_SHARED,
                             frame->fds[0], 0);
            if (map != MAP_FAILED) board = map;
            else board_size = 0;
        }
        interval_ms = interval * 1000 > 1000 ? 1000 : (int)(interval * 1000);
        if (interval_ms < 1) interval_ms = 1;
    }
    loaded = 1;
    char comm[16]; /* ps shows which module this worker serves (cut to 15 bytes) */
    snprintf(comm, sizeof comm, "ipad:%.10s", module);
    prctl(PR_SET_NAME, comm, 0, 0, 0);
    mp_writer w;
    ipad_begin(&w, out);
    mp_w_map(&w, 5);
    mp_w_cstr(&w, "module");
    mp_w_cstr(&w, module);
    mp_w_cstr(&w, "version");
    mp_w_cstr(&w, ECHO_C_VERSION);
    mp_w_cstr(&w, "methods");
    mp_w_array(&w, 3);
    static const char *const names[] = {"checksum", "echo", "init"};
    for (int i = 0; i < 3; i++) {
        mp_w_map(&w, 2);
        mp_w_cstr(&w, "name");
        mp_w_cstr(&w, names[i]);
        mp_w_cstr(&w, "setup");
        mp_w_bool(&w, i == 2);
    }
    mp_w_cstr(&w, "pid");
    mp_w_uint(&w, (uint64_t)getpid());
    mp_w_cstr(&w, "beats");
    mp_w_bool(&w, board != NULL);
    control_send(&w, T_READY, frame->id);
}

/* An int field of a control message's map, unknown fields skipped; -1 if absent or bad. */
static int64_t int_field(const ipad_frame *frame, const char *field, double *number) {
    mp_reader r;
    uint32_t n, klen;
    const char *key;
    int64_t v = -1;
    mp_r_init(&r, frame->payload, frame->length);
    mp_r_map(&r, &n);
    while (n-- && !r.error) {
        mp_r_str(&r, &key, &klen);
        if (mp_eq(key, klen, field)) {
            if (number != NULL) mp_r_number(&r, number);
            else mp_r_int(&r, &v);
            if (number != NULL) v = 0;
        } else {
            mp_skip(&r);
        }
    }
    return r.error ? -1 : v;
}

/* Returns 0 to go on, 1 when the worker must exit. */
static int on_control(void) {
    static const uint8_t allowed[] = {T_LOAD, T_OPEN_INSTANCE, T_PING, T_SHUTDOWN,
                                      T_CLOSE_INSTANCE, T_HEARTBEAT, 0};
    ipad_frame frame;
    int got = ipad_recv(CONTROL_FD, in, allowed, &frame);
    if (got == IPAD_OS_ERROR && errno == EAGAIN) return 0;
    if (got == IPAD_EOF || got == IPAD_OS_ERROR) return 1; /* the daemon is gone */
    if (got == IPAD_BROKEN) {
        fprintf(stderr, "echo_c: broken control message (%s): exiting\n", ipad_broken_reason);
        exit_status = 2;
        return 1;
    }
    double number = 0;
    int64_t id;
    instance *inst;
    switch (frame.type) {
    case T_LOAD:
        if (loaded) control_error(frame.id, "bad_message", "LOAD sent twice");
        else on_load(&frame);
        break;
    case T_OPEN_INSTANCE:
        id = int_field(&frame, "instance_id", NULL);
        inst = NULL;
        for (int i = 0; i < MAX_INSTANCES && id >= 0 && !find((uint64_t)id); i++)
            if (instances[i].sock < 0) {
                inst = &instances[i];
                break;
            }
        if (!loaded || frame.nfds != 1 || id < 0 || find((uint64_t)id) != NULL) {
            control_error(frame.id, "bad_message", "cannot open that instance now");
            break;
        }
        if (inst == NULL) { /* the constructor's failure, as the page puts it */
            control_error(frame.id, "module_error", "too many instances (64) in this worker");
            break;
        }
        inst->id = (uint64_t)id;
        inst->sock = frame.fds[0];
        inst->calls = 0;
        frame.nfds = 0; /* the instance owns it now */
        mp_writer w;
        ipad_begin(&w, out);
        mp_w_map(&w, 1);
        mp_w_cstr(&w, "instance_id");
        mp_w_uint(&w, (uint64_t)id);
        control_send(&w, T_INSTANCE_OPENED, frame.id);
        break;
    case T_CLOSE_INSTANCE:
        id = int_field(&frame, "instance_id", NULL);
        if (id >= 0 && (inst = find((uint64_t)id)) != NULL) close_instance(inst, NULL);
        break;
    case T_PING:
        if (ipad_send_empty(CONTROL_FD, T_PONG, frame.id, 0) < 0) return 1;
        break;
    case T_HEARTBEAT:
        if (int_field(&frame, "interval", &number) == 0 && number > 0)
            interval_ms = number * 1000 > 1000 ? 1000 : number * 1000 < 1 ? 1 : (int)(number * 1000);
        break;
    case T_SHUTDOWN:
        ipad_close_fds(&frame);
        return 1;
    }
    ipad_close_fds(&frame);
    return 0;
}

int main(int argc, char **argv) {
    long parent = -1;
    for (int i = 1; i + 1 < argc; i++)
        if (strcmp(argv[i], "--parent-pid") == 0) parent = strtol(argv[i + 1], NULL, 10);
    /* Never outlive the daemon; the check closes the race where it died before prctl. In a
     * sandbox we are pid 1 and --parent-pid is 0, which is what getppid() says there. */
    prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
    if (parent >= 0 && getppid() != parent) return 1;
    /* pid 1 of a namespace gets no signal it has no handler for: SIGTERM must exit. */
    signal(SIGTERM, on_sigterm);
    signal(SIGHUP, SIG_IGN); /* "reload" for the daemon, sent to the whole service */
    if (fcntl(CONTROL_FD, F_GETFD) < 0) {
        logf_("no control socket on fd 3 (run by the ipad daemon)");
        return 2;
    }
    for (int i = 0; i < MAX_INSTANCES; i++) instances[i].sock = -1;
    struct pollfd fds[1 + MAX_INSTANCES];
    instance *owner[1 + MAX_INSTANCES];
    for (;;) {
        if (board != NULL) board[0]++;
        int n = 0;
        fds[n++] = (struct pollfd){CONTROL_FD, POLLIN, 0};
        for (int i = 0; i < MAX_INSTANCES; i++)
            if (instances[i].sock >= 0) {
                owner[n] = &instances[i];
                fds[n++] = (struct pollfd){instances[i].sock, POLLIN, 0};
            }
        if (poll(fds, (nfds_t)n, interval_ms) < 0) {
            if (errno == EINTR) continue;
            return 1;
        }
        if (fds[0].revents && on_control()) break;
        for (int i = 1; i < n; i++)
            if (fds[i].revents && owner[i]->sock == fds[i].fd) on_channel(owner[i]);
    }
    for (int i = 0; i < MAX_INSTANCES; i++)
        if (instances[i].sock >= 0) close(instances[i].sock);
    return exit_status;
}
