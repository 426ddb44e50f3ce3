/* ipad packets over SOCK_SEQPACKET; see ipad_wire.h. */
#define _GNU_SOURCE
#include "ipad_wire.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

char ipad_broken_reason[160];
uint64_t ipad_broken_id;

static uint64_t le(const uint8_t *p, int n) {
    uint64_t v = 0;
    for (int i = n - 1; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}

static void put_le(uint8_t *p, uint64_t v, int n) {
    for (int i = 0; i < n; i++) p[i] = (uint8_t)(v >> (8 * i));
}

int ipad_fd_limit(uint8_t type) {
    switch (type) {
    case T_CALL: return IPAD_MAX_FDS;
    case T_PROXY_GRANTED: case T_OPEN_INSTANCE: case T_LOAD: return 1;
    default: return 0;
    }
}

void ipad_close_fds(ipad_frame *frame) {
    for (int i = 0; i < frame->nfds; i++) close(frame->fds[i]);
    frame->nfds = 0;
}

static int broken(ipad_frame *frame, const char *reason) {
    snprintf(ipad_broken_reason, sizeof ipad_broken_reason, "%s", reason);
    ipad_close_fds(frame);
    return IPAD_BROKEN;
}

int ipad_recv(int sock, uint8_t *buf, const uint8_t *allowed, ipad_frame *frame) {
    union {
        char space[CMSG_SPACE(IPAD_MAX_FDS * sizeof(int))];
        struct cmsghdr align;
    } control;
    struct iovec iov = {buf, IPAD_MAX_PACKET};
    struct msghdr msg = {0};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.space;
    msg.msg_controllen = sizeof control.space;
    frame->nfds = 0;
    ipad_broken_id = 0;
    ssize_t n;
    do {
        n = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
    } while (n < 0 && errno == EINTR);
    if (n < 0) return IPAD_OS_ERROR;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c != NULL; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
        size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (size_t i = 0; i < count && frame->nfds < IPAD_MAX_FDS; i++)
            memcpy(&frame->fds[frame->nfds++], CMSG_DATA(c) + i * sizeof(int), sizeof(int));
    }
    if (n == 0 && frame->nfds == 0) return IPAD_EOF;
    if (msg.msg_flags & MSG_TRUNC) return broken(frame, "packet larger than MAX_PACKET");
    if (msg.msg_flags & MSG_CTRUNC) return broken(frame, "more file descriptors than fit");
    if (n < IPAD_HEADER) return broken(frame, "packet shorter than the header");
    if (buf[0] != 'I' || buf[1] != 'P') return broken(frame, "bad magic");
    ipad_broken_id = le(buf + 8, 8);
    if (buf[2] != IPAD_VERSION) return broken(frame, "unsupported protocol version");
    if (le(buf + 4, 2) != 0) return broken(frame, "non-zero flags");
    if (le(buf + 16, 4) != (uint64_t)(n - IPAD_HEADER))
        return broken(frame, "payload length does not match the bytes received");
    if (le(buf + 6, 2) != (uint64_t)frame->nfds)
        return broken(frame, "header's fd count does not match the fds that arrived");
    frame->type = buf[3];
    int ok = 0;
    for (const uint8_t *t = allowed; *t != 0; t++) ok |= *t == frame->type;
    if (!ok) return broken(frame, "unexpected message type");
    if (frame->nfds > ipad_fd_limit(frame->type)) return broken(frame, "too many fds for its type");
    frame->id = ipad_broken_id;
    frame->payload = buf + IPAD_HEADER;
    frame->length = (uint32_t)(n - IPAD_HEADER);
    if (mp_peek(&(mp_reader){frame->payload, frame->payload + frame->length, 0}) != MP_MAP)
        return broken(frame, "payload is not a map");
    return IPAD_PACKET;
}

void ipad_begin(mp_writer *w, uint8_t *packet) {
    mp_w_init(w, packet + IPAD_HEADER, IPAD_MAX_PAYLOAD);
}

int ipad_send(int sock, mp_writer *w, uint8_t type, uint64_t id, const int *fds, int nfds,
              int flags) {
    if (w->overflow) {
        errno = EMSGSIZE;
        return -1;
    }
    uint8_t *packet = w->buf - IPAD_HEADER;
    packet[0] = 'I';
    packet[1] = 'P';
    packet[2] = IPAD_VERSION;
    packet[3] = type;
    put_le(packet + 4, 0, 2);
    put_le(packet + 6, (uint64_t)nfds, 2);
    put_le(packet + 8, id, 8);
    put_le(packet + 16, w->len, 4);
    union {
        char space[CMSG_SPACE(IPAD_MAX_FDS * sizeof(int))];
        struct cmsghdr align;
    } control;
    struct iovec iov = {packet, IPAD_HEADER + w->len};
    struct msghdr msg = {0};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    if (nfds > 0) {
        msg.msg_control = control.space;
        msg.msg_controllen = CMSG_SPACE((size_t)nfds * sizeof(int));
        struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN((size_t)nfds * sizeof(int));
        memcpy(CMSG_DATA(c), fds, (size_t)nfds * sizeof(int));
    }
    ssize_t n;
    do {
        n = sendmsg(sock, &msg, MSG_NOSIGNAL | flags);
    } while (n < 0 && errno == EINTR);
    return n < 0 ? -1 : 0;
}

int ipad_send_empty(int sock, uint8_t type, uint64_t id, int flags) {
    static uint8_t packet[IPAD_HEADER + 1];
    mp_writer w;
    mp_w_init(&w, packet + IPAD_HEADER, 1);
    mp_w_map(&w, 0);
    return ipad_send(sock, &w, type, id, NULL, 0, flags);
}

uint32_t ipad_crc32(uint32_t crc, const uint8_t *data, size_t len) {
    static uint32_t table[256];
    if (table[1] == 0) {
        for (uint32_t i = 0; i < 256; i++) {
            uint32_t c = i;
            for (int k = 0; k < 8; k++) c = (c & 1) ? 0xedb88320u ^ (c >> 1) : c >> 1;
            table[i] = c;
        }
    }
    crc = ~crc;
    for (size_t i = 0; i < len; i++) crc = table[(crc ^ data[i]) & 0xff] ^ (crc >> 8);
    return ~crc;
}

int64_t ipad_now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}
