/* ipad packets over AF_UNIX SOCK_SEQPACKET, as docs/protocol.md describes them.
 *
 * One message is one packet: a 20-byte little-endian header, then one msgpack map. File
 * descriptors travel with their packet as SCM_RIGHTS. */
#ifndef IPAD_EXAMPLE_WIRE_H
#define IPAD_EXAMPLE_WIRE_H

#include <stddef.h>
#include <stdint.h>

#include "msgpack.h"

#define IPAD_HEADER 20
#define IPAD_VERSION 1
#define IPAD_MAX_PAYLOAD 262144
#define IPAD_MAX_PACKET (IPAD_MAX_PAYLOAD + IPAD_HEADER)
#define IPAD_MAX_FDS 16

enum ipad_type {
    T_HELLO = 1, T_WELCOME = 2, T_REQUEST_PROXY = 3, T_PROXY_GRANTED = 4, T_RELEASE_PROXY = 5,
    T_RELEASED = 6, T_SUBSCRIBE = 7, T_SUBSCRIBED = 8, T_EVENT = 9, T_STATUS = 10,
    T_STATUS_REPLY = 11, T_LIST_MODULES = 12, T_MODULES = 13, T_GOODBYE = 14, T_ERROR = 15,
    T_ADMIN = 16, T_ADMIN_DONE = 17, T_REOPEN_PROXY = 18, T_PROXY_READY = 19, T_PROXY_STATE = 20,
    T_LOAD = 32, T_READY = 33, T_OPEN_INSTANCE = 34, T_INSTANCE_OPENED = 35, T_PING = 36,
    T_PONG = 37, T_SHUTDOWN = 38, T_CLOSE_INSTANCE = 39, T_INSTANCE_CLOSED = 40,
    T_HEARTBEAT = 41, T_CALL = 48, T_RESULT = 49, T_MODULE_EVENT = 50,
};

/* One received packet. The receiver owns fds[0..nfds). */
typedef struct {
    uint8_t type;
    uint64_t id;
    const uint8_t *payload; /* points into the receive buffer */
    uint32_t length;
    int fds[IPAD_MAX_FDS];
    int nfds;
} ipad_frame;

/* Why the last ipad_recv returned IPAD_BROKEN (one sentence), and the broken packet's
 * request id when its header could be read (else 0). */
extern char ipad_broken_reason[160];
extern uint64_t ipad_broken_id;

enum { IPAD_BROKEN = -2, IPAD_OS_ERROR = -1, IPAD_EOF = 0, IPAD_PACKET = 1 };

/* Receive one packet into buf (IPAD_MAX_PACKET bytes) without blocking the caller longer
 * than the socket does. `allowed` is a 0-terminated list of the types this end accepts.
 * On IPAD_BROKEN every descriptor that came is closed already. */
int ipad_recv(int sock, uint8_t *buf, const uint8_t *allowed, ipad_frame *frame);

/* The most descriptors a message of this type may carry. */
int ipad_fd_limit(uint8_t type);

/* A writer for a message's payload inside `packet` (IPAD_MAX_PACKET bytes): the header is
 * filled in by ipad_send. */
void ipad_begin(mp_writer *w, uint8_t *packet);

/* Send the message written with w. flags are added to MSG_NOSIGNAL (a dead peer must be an
 * EPIPE, never a signal). Returns 0, or -1 with errno (EMSGSIZE if the payload overflowed). */
int ipad_send(int sock, mp_writer *w, uint8_t type, uint64_t id, const int *fds, int nfds,
              int flags);

/* An empty map as payload (PING, PONG, STATUS...). */
int ipad_send_empty(int sock, uint8_t type, uint64_t id, int flags);

void ipad_close_fds(ipad_frame *frame);

/* zlib's CRC-32 (the same value as Python's zlib.crc32). */
uint32_t ipad_crc32(uint32_t crc, const uint8_t *data, size_t len);

/* Milliseconds on the monotonic clock. */
int64_t ipad_now_ms(void);

#endif
