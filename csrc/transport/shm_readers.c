/*
 * shm_readers.c - letting same-host peers read our memory where Yama asks.
 *
 * Single copy reads a peer's buffer with process_vm_readv, which the kernel
 * allows like a ptrace attach. Yama's ptrace_scope 1 (Ubuntu's default)
 * allows that only from an ancestor of the process read, or from a process
 * it named (PR_SET_PTRACER) and that one's descendants: ranks started side
 * by side by torchrun, `pycoll run` or mpirun are siblings, so none could
 * read another and every large payload went through the rings (1.5-3x
 * slower). Each rank now names the nearest process that it and all its
 * same-host peers descend from (their launcher): the ranks and whatever
 * else that launcher started are let in, never every process on the host.
 *
 * The nearest common ancestor of us and a peer is found by walking parent
 * links in /proc/<pid>/stat (the peer's pid comes from SO_PEERCRED, so it is
 * in our pid namespace). With several peers the admitted process is the
 * highest of those ancestors on our own chain, which covers them all; one
 * process-wide setting (prctl replaces the last one), so it only widens.
 * pid 1 is admitted only inside a container's pid namespace: there it is the
 * container's launcher; on the host it would be every process.
 *
 * Without Yama prctl(PR_SET_PTRACER) fails with EINVAL and nothing changes:
 * the probe in transport_shm.c still decides whether single copy is on.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <sys/prctl.h>
#include <unistd.h>

#include "pycoll.h"

#ifndef PR_SET_PTRACER
#define PR_SET_PTRACER 0x59616d61
#endif
#define MAX_DEPTH 64            /* parent links followed: process trees are shallow */
#define INIT_PID_NS 4026531836u /* the initial pid namespace's inode (PROC_PID_INIT_INO) */

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_once_t fork_handler_once = PTHREAD_ONCE_INIT;
static pid_t admitted_pid;     /* the process we named (0: none yet) */
static int admitted_err;       /* errno of that prctl (0: it succeeded) */
static pid_t admitted_for;     /* getpid() when we named it: a forked child starts over */

/* A child forked while another thread held the lock (a data loader forked during a mesh build)
 * would wait on it for ever: the child gets a fresh one. */
static void fresh_lock_in_child(void) { pthread_mutex_init(&lock, NULL); }
static void add_fork_handler(void) { pthread_atfork(NULL, NULL, fresh_lock_in_child); }

/* The parent of pid, or 0 when it cannot be read. The command name in
 * parentheses may hold anything, so the fields are read after its last ')'. */
static pid_t parent_of(pid_t pid) {
    char path[64], line[512];
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    FILE *f = fopen(path, "re");
    if (!f) return 0;
    size_t n = fread(line, 1, sizeof line - 1, f);
    fclose(f);
    line[n] = 0;
    char *close_paren = strrchr(line, ')');
    int ppid = 0;
    char state;
    if (!close_paren || sscanf(close_paren + 1, " %c %d", &state, &ppid) != 2 || ppid < 0) return 0;
    return (pid_t)ppid;
}

/* pid and its ancestors, nearest first, up to pid 1 (or what could be read). */
static int chain_of(pid_t pid, pid_t *chain) {
    int n = 0;
    while (pid > 0 && n < MAX_DEPTH) {
        chain[n++] = pid;
        if (pid == 1) break;
        pid = parent_of(pid);
    }
    return n;
}

static int index_in(const pid_t *chain, int n, pid_t pid) {
    for (int i = 0; i < n; i++)
        if (chain[i] == pid) return i;
    return -1;
}

/* The nearest of b and its ancestors that is on chain (a process's chain_of), or 0. */
static pid_t nearest_on(const pid_t *chain, int n, pid_t b) {
    pid_t cb[MAX_DEPTH];
    int nb = chain_of(b, cb);
    for (int j = 0; j < nb; j++)
        if (index_in(chain, n, cb[j]) >= 0) return cb[j];
    return 0;
}

int32_t pc_common_ancestor(int32_t a, int32_t b) {
    pid_t ca[MAX_DEPTH];
    return (int32_t)nearest_on(ca, chain_of((pid_t)a, ca), (pid_t)b);
}

static int in_initial_pid_namespace(void) {
    char link[64] = "";
    ssize_t n = readlink("/proc/self/ns/pid", link, sizeof link - 1);
    if (n <= 0) return 1; /* cannot tell: assume the host, the safe side */
    link[n] = 0;
    unsigned long ino = 0;
    return sscanf(link, "pid:[%lu]", &ino) != 1 || ino == INIT_PID_NS;
}

void pc_readers_admit(int32_t peer) {
    if (peer <= 0) return;
    pid_t self = getpid(), chain[MAX_DEPTH];
    int n = chain_of(self, chain);
    pid_t nca = nearest_on(chain, n, (pid_t)peer);
    if (nca <= 0 || (nca == 1 && in_initial_pid_namespace())) return;
    pthread_once(&fork_handler_once, add_fork_handler);
    pthread_mutex_lock(&lock);
    if (admitted_for != self) admitted_pid = 0, admitted_err = 0, admitted_for = self;
    /* Keep whichever of the two sits higher on our chain: it covers both peers. */
    if (admitted_pid == 0 || index_in(chain, n, nca) > index_in(chain, n, admitted_pid)) {
        admitted_err = prctl(PR_SET_PTRACER, (unsigned long)nca, 0, 0, 0) == 0 ? 0 : errno;
        admitted_pid = nca;
    }
    pthread_mutex_unlock(&lock);
}

int32_t pc_readers_admitted(int32_t *err) {
    pthread_mutex_lock(&lock);
    int fresh = admitted_for == getpid();
    int32_t pid = fresh ? (int32_t)admitted_pid : 0;
    if (err) *err = fresh ? admitted_err : 0;
    pthread_mutex_unlock(&lock);
    return pid;
}
