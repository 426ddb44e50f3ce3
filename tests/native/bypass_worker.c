/* A native worker that tries to get past the seccomp filter the way an attacker who read
 * ipad/worker/seccomp.py would: other ABIs (x32, i386 int 0x80), high bits in 32-bit arguments,
 * O_ASYNC hidden among other flags, F_SETOWN_EX to a process group, and the system calls
 * the filter may have missed. Each attempt runs in a child; it says on stderr (relayed into
 * the daemon's log) what each got: "ok", an errno name, or the signal that ended the child.
 * Then, before it answers LOAD, it lies on its control socket (fd 3) as the jail speaks on it:
 * it sends the packets in the file LIES (SPAWNED naming host processes, written by the test)
 * and waits to be dropped. Then it exits with status 3, a load failure.
 *
 * Built by tests/test_hostile_redteam2.py. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sched.h>
#include <sys/ioctl.h>
#include <sys/personality.h>
#include <sys/ptrace.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#define X32 0x40000000UL
#define NR_PIDFD_SEND_SIGNAL 424
#define NR_IO_URING_SETUP 425
#define NR_PIDFD_OPEN 434
#define HIGH (1UL << 32)

static long x32_pidfd_open(void) { return syscall(X32 | NR_PIDFD_OPEN, getpid(), 0); }

static long x32_kill(void) { return syscall(X32 | 62, getpid(), 0); }

static long i386_pidfd_open(void) {
    long result;
    /* i386's pidfd_open is 434 as well; a filter that ignores the arch lets it through. */
    __asm__ volatile("int $0x80" : "=a"(result) : "a"(434L), "b"(1L), "c"(0L) : "memory");
    if (result < 0) { errno = (int)-result; return -1; }
    return result;
}

static int a_socket(void) {
    int s[2];
    return socketpair(AF_UNIX, SOCK_STREAM, 0, s) < 0 ? -1 : s[0];
}

static long ioctl_high(void) {
    int owner = getpid();
    return syscall(SYS_ioctl, a_socket(), HIGH | FIOSETOWN, &owner);
}

static long ioctl_async_high(void) {
    int on = 1;
    return syscall(SYS_ioctl, a_socket(), HIGH | FIOASYNC, &on);
}

static long fcntl_setown_high(void) { return syscall(SYS_fcntl, a_socket(), HIGH | F_SETOWN, getpid()); }

static long fcntl_setsig_high(void) { return syscall(SYS_fcntl, a_socket(), HIGH | F_SETSIG, SIGKILL); }

static long setfl_mixed(void) { return fcntl(a_socket(), F_SETFL, O_NONBLOCK | O_APPEND | O_ASYNC); }

static long setfl_high(void) { return syscall(SYS_fcntl, a_socket(), F_SETFL, HIGH | O_ASYNC); }

static long setown_ex_pgrp(void) {
    struct f_owner_ex owner = {F_OWNER_PGRP, getpgrp()};
    return fcntl(a_socket(), F_SETOWN_EX, &owner);
}

static long io_uring(void) {
    char params[120] = {0};
    return syscall(NR_IO_URING_SETUP, 4, params);
}

static long clone_parent_high(void) {
    long pid = syscall(SYS_clone, HIGH | CLONE_PARENT | SIGCHLD, 0, 0, 0, 0);
    if (pid == 0) _exit(0);
    return pid;
}

static long pidfd_of_child(void) {
    /* CLONE_PIDFD hands out a pidfd without pidfd_open: signalling through it must fail too. */
    int pidfd = -1;
    long pid = syscall(SYS_clone, CLONE_PIDFD | SIGCHLD, 0, &pidfd, 0, 0);
    if (pid == 0) { pause(); _exit(0); }
    if (pid < 0) return pid;
    long r = syscall(NR_PIDFD_SEND_SIGNAL, pidfd, SIGKILL, NULL, 0);
    int saved = errno;
    kill((pid_t)pid, SIGKILL);
    waitpid((pid_t)pid, NULL, 0);
    errno = saved;
    return r;
}

static long traceme(void) { return ptrace(PTRACE_TRACEME, 0, 0, 0); }

static long uffd(void) { return syscall(SYS_userfaultfd, 0); }

static long perf(void) { char attr[128] = {0}; return syscall(SYS_perf_event_open, attr, 0, -1, -1, 0); }

static long kcmp_self(void) { return syscall(SYS_kcmp, getpid(), getpid(), 0, 0, 0); }

static long unshare_user(void) { return unshare(CLONE_NEWUSER); }

/* Run in a child: how it ended ("ok", an errno name, or the signal that killed it). */
static const char *in_child(long (*attack)(void)) {
    static char text[64];
    pid_t pid = fork();
    if (pid == 0) {
        long r = attack();
        _exit(r < 0 ? 100 + (errno % 100) : 0);
    }
    int status = 0;
    waitpid(pid, &status, 0);
    if (WIFSIGNALED(status)) return sigabbrev_np(WTERMSIG(status));
    int code = WEXITSTATUS(status);
    if (code == 0) return "ok";
    snprintf(text, sizeof text, "%s", strerrorname_np(code - 100));
    return text;
}

static const struct { const char *name; long (*attack)(void); } ATTACKS[] = {
    {"x32_pidfd_open", x32_pidfd_open}, {"x32_kill", x32_kill},
    {"i386_pidfd_open", i386_pidfd_open}, {"ioctl_setown_high", ioctl_high},
    {"ioctl_async_high", ioctl_async_high}, {"fcntl_setown_high", fcntl_setown_high},
    {"fcntl_setsig_high", fcntl_setsig_high}, {"setfl_mixed", setfl_mixed},
    {"setfl_high", setfl_high}, {"setown_ex_pgrp", setown_ex_pgrp}, {"io_uring", io_uring},
    {"clone_parent_high", clone_parent_high}, {"clone_pidfd_signal", pidfd_of_child},
    {"traceme", traceme}, {"userfaultfd", uffd},
    {"perf_event_open", perf}, {"kcmp", kcmp_self}, {"unshare_user", unshare_user},
};

int main(void) {
    char line[2048];
    int n = snprintf(line, sizeof line, "bypass.native");
    for (size_t i = 0; i < sizeof ATTACKS / sizeof ATTACKS[0]; i++)
        n += snprintf(line + n, sizeof line - n, " %s=%s", ATTACKS[i].name,
                      in_child(ATTACKS[i].attack));
    fprintf(stderr, "%s\n", line);
    FILE *lies = fopen(LIES, "rb");
    uint32_t length;
    unsigned char packet[4096];
    int sent = 0;
    while (lies != NULL && fread(&length, sizeof length, 1, lies) == 1 && length <= sizeof packet
           && fread(packet, 1, length, lies) == length)
        sent += send(3, packet, length, 0) == (ssize_t)length;
    fprintf(stderr, "bypass.native lies=%d\n", sent);
    usleep(500 * 1000); /* time to be judged on what it said */
    fprintf(stderr, "bypass.native done\n");
    return 3;
}
