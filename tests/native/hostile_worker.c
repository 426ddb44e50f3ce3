/* A hostile native worker: before it answers anything, it tries every way to signal or
 * outlive what is outside its sandbox, and says on stderr (relayed into the daemon's log)
 * what each attempt got. Then it exits with status 3, a load failure.
 *
 * Built by tests/test_e2e_hostile_sandbox.py with -DTARGETS="<file of host pids>" and
 * -DMARKER="<the name its escapee takes>". */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sched.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <dirent.h>
#include <unistd.h>

#define NR_PIDFD_SEND_SIGNAL 424
#define NR_PIDFD_OPEN 434
#define NR_CLONE3 435

static const char *outcome(long result) { return result < 0 ? strerrorname_np(errno) : "ok"; }

static long pidfd_kill(int fd) { return syscall(NR_PIDFD_SEND_SIGNAL, fd, SIGKILL, NULL, 0); }

static long via_pidfd_open(pid_t pid) {
    long fd = syscall(NR_PIDFD_OPEN, pid, 0);
    if (fd < 0) return fd;
    long r = pidfd_kill((int)fd);
    close((int)fd);
    return r;
}

static long via_proc(pid_t pid) {
    char path[64];
    snprintf(path, sizeof path, "/proc/%d", (int)pid);
    int fd = open(path, O_RDONLY | O_DIRECTORY);
    if (fd < 0) return -1;
    long r = pidfd_kill(fd);
    close(fd);
    return r;
}

static long via_setown(pid_t owner) {
    int p[2];
    if (pipe(p) < 0) return -1;
    long r = fcntl(p[0], F_SETOWN, owner);
    if (r == 0) r = fcntl(p[0], F_SETSIG, SIGKILL);
    if (r == 0) r = fcntl(p[0], F_SETFL, O_ASYNC);
    if (r == 0) r = write(p[1], "x", 1) == 1 ? 0 : -1;
    int saved = errno;
    close(p[0]);
    close(p[1]);
    errno = saved;
    return r;
}

static long via_ioctl(pid_t owner) {
    int s[2], on = 1;
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, s) < 0) return -1;
    long r = ioctl(s[0], FIOSETOWN, &owner);
    if (r == 0) r = ioctl(s[0], FIOASYNC, &on);
    if (r == 0) r = send(s[1], "x", 1, 0) == 1 ? 0 : -1;
    int saved = errno;
    close(s[0]);
    close(s[1]);
    errno = saved;
    return r;
}

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

static long kill_everyone(void) { return kill(-1, SIGKILL); }

static long clone_parent(void) {
    long pid = syscall(SYS_clone, CLONE_PARENT | SIGCHLD, 0, 0, 0, 0);
    if (pid == 0) _exit(0);
    return pid;
}

static long clone3_parent(void) {
    uint64_t args[11] = {CLONE_PARENT};
    long pid = syscall(NR_CLONE3, args, sizeof args);
    if (pid == 0) _exit(0);
    return pid;
}

static long escape(void) {
    /* Leave group and session, ask for no parent-death signal, name ourselves, wait. */
    if (fork() == 0) {
        setsid();
        if (fork() == 0) {
            setpgid(0, 0);
            prctl(PR_SET_PDEATHSIG, 0);
            prctl(PR_SET_NAME, MARKER);
            signal(SIGTERM, SIG_IGN);
            signal(SIGHUP, SIG_IGN);
            for (;;) pause();
        }
        _exit(0);
    }
    wait(NULL);
    return 0;
}

int main(void) {
    FILE *file = fopen(TARGETS, "r");
    int target;
    if (file == NULL) {
        fprintf(stderr, "hostile.native error=no-targets errno=%s\n", strerrorname_np(errno));
    } else {
        while (fscanf(file, "%d", &target) == 1) {
            pid_t pid = (pid_t)target;
            char line[512];
            int n = snprintf(line, sizeof line, "hostile.native target=%d kill=%s", target,
                             outcome(kill(pid, SIGKILL)));
            n += snprintf(line + n, sizeof line - n, " tgkill=%s",
                          outcome(syscall(SYS_tgkill, pid, pid, SIGKILL)));
            n += snprintf(line + n, sizeof line - n, " pidfd_open=%s",
                          outcome(via_pidfd_open(pid)));
            n += snprintf(line + n, sizeof line - n, " proc_pidfd=%s", outcome(via_proc(pid)));
            n += snprintf(line + n, sizeof line - n, " setown=%s", outcome(via_setown(pid)));
            n += snprintf(line + n, sizeof line - n, " setown_group=%s",
                          outcome(via_setown(-pid)));
            snprintf(line + n, sizeof line - n, " ioctl_owner=%s", outcome(via_ioctl(pid)));
            fprintf(stderr, "%s\n", line);
        }
        fclose(file);
    }
    int seen = 0;
    DIR *proc = opendir("/proc");
    if (proc != NULL) {
        struct dirent *entry;
        while ((entry = readdir(proc)) != NULL) seen += entry->d_name[0] >= '1' && entry->d_name[0] <= '9';
        closedir(proc);
    }
    fprintf(stderr, "hostile.native self=%d proc_pids=%d\n", (int)getpid(), seen);
    fprintf(stderr, "hostile.native kill_everyone=%s", in_child(kill_everyone));
    fprintf(stderr, " clone_parent=%s", in_child(clone_parent));
    fprintf(stderr, " clone3_parent=%s", in_child(clone3_parent));
    fprintf(stderr, " escape=%s\n", outcome(escape()));
    fprintf(stderr, "hostile.native done\n");
    return 3;
}
