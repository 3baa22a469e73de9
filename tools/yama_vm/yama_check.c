/*
 * yama_check.c - checks pc_readers_admit() (csrc/transport/shm_readers.c)
 * against a kernel with Yama (check.sh boots one under qemu). Started as root from /init: it drops to uid/gid
 * 1000 and re-execs itself (so the process is dumpable again, like any
 * ordinary user process), then acts as the "launcher" of the cases below.
 * Argument "--stay-root" skips the drop (control run: CAP_SYS_PTRACE).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <grp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>

#include "pycoll.h"

#define MAGIC 0x1122334455667788ULL

static int yama_on;   /* ptrace_scope 1 and not root: reads need an ancestor or an admission */
static int unmet;     /* expectations that did not hold */

static void expect(const char *what, int ok, int want) {
    printf("  %-58s %s (expected %s)%s\n", what, ok ? "read" : "refused", want ? "read" : "refused",
           ok == want ? "" : "  <-- UNEXPECTED");
    unmet += ok != want;
}

static void print_file(const char *label, const char *path) {
    char buf[256] = "";
    FILE *f = fopen(path, "r");
    if (!f) { printf("%s: <cannot open %s: %s>\n", label, path, strerror(errno)); return; }
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    if (n && buf[n - 1] == '\n') buf[n - 1] = 0;
    printf("%s: %s\n", label, buf);
}

static void xread(int fd, void *p, size_t n) {
    if (read(fd, p, n) != (ssize_t)n) { perror("read"); _exit(99); }
}
static void xwrite(int fd, const void *p, size_t n) {
    if (write(fd, p, n) != (ssize_t)n) { perror("write"); _exit(99); }
}

/* Try to read 8 bytes at addr in pid; print the outcome; return 0 on success. */
static int try_read(const char *who, pid_t pid, uint64_t addr) {
    uint64_t got = 0;
    struct iovec local = {&got, sizeof got}, remote = {(void *)(uintptr_t)addr, sizeof got};
    ssize_t r = process_vm_readv(pid, &local, 1, &remote, 1, 0);
    int e = errno;
    if (r == (ssize_t)sizeof got)
        printf("    %s (pid %d) process_vm_readv(pid %d) -> %zd bytes, value 0x%016llx %s\n", who,
               (int)getpid(), (int)pid, r, (unsigned long long)got, got == MAGIC ? "(matches)" : "(MISMATCH)");
    else
        printf("    %s (pid %d) process_vm_readv(pid %d) -> %zd, errno %d (%s)\n", who, (int)getpid(),
               (int)pid, r, e, strerror(e));
    return r == (ssize_t)sizeof got && got == MAGIC ? 0 : 1;
}

/* Forks A, a sibling of the running B: B is told A's pid (to_b), A reads
 * the address B sends (from_b) and says when it is done (done_to_b). Waits
 * for both; a B that failed counts as unmet. Whether A's read succeeded. */
static int sibling_reads(pid_t b, int to_b, int from_b, int done_to_b, pid_t launcher) {
    pid_t a = fork();
    if (a == 0) {
        uint64_t addr;
        xread(from_b, &addr, sizeof addr);
        int32_t nca = pc_common_ancestor((int32_t)getpid(), (int32_t)b);
        printf("    A (pid %d): pc_common_ancestor(A, B=%d) = %d; launcher pid %d -> %s\n", (int)getpid(),
               (int)b, nca, (int)launcher, nca == launcher ? "as expected" : "UNEXPECTED");
        int rc = try_read("A", b, addr);
        xwrite(done_to_b, "x", 1);
        _exit(rc);
    }
    xwrite(to_b, &a, sizeof a);
    int sa, sb;
    waitpid(a, &sa, 0);
    waitpid(b, &sb, 0);
    unmet += !WIFEXITED(sb) || WEXITSTATUS(sb) != 0;
    return WIFEXITED(sa) && WEXITSTATUS(sa) == 0;
}

/* Cases 1 and 2: launcher forks siblings B and A; A reads B's memory. */
static void sibling_case(int num, int admit) {
    printf("\n=== case %d: siblings, B %s pc_readers_admit(A) ===\n", num, admit ? "CALLS" : "does NOT call");
    pid_t launcher = getpid();
    int to_b[2], b_to_a[2], a_to_b[2];
    if (pipe(to_b) || pipe(b_to_a) || pipe(a_to_b)) { perror("pipe"); exit(1); }
    pid_t b = fork();
    if (b == 0) {
        volatile uint64_t secret = MAGIC;
        pid_t a;
        xread(to_b[0], &a, sizeof a); /* launcher tells B the pid of A */
        if (admit) {
            pc_readers_admit((int32_t)a);
            int32_t err = -1;
            int32_t named = pc_readers_admitted(&err);
            printf("    B (pid %d): pc_readers_admit(%d); pc_readers_admitted -> pid %d, err %d (%s); launcher pid %d -> %s\n",
                   (int)getpid(), (int)a, named, err, err ? strerror(err) : "ok", (int)launcher,
                   named == launcher && err == 0 ? "as expected" : "UNEXPECTED");
        }
        uint64_t addr = (uint64_t)(uintptr_t)&secret;
        xwrite(b_to_a[1], &addr, sizeof addr);
        char done;
        xread(a_to_b[0], &done, 1); /* stay alive until A has read */
        _exit(secret == MAGIC ? 0 : 1);
    }
    expect("A reads its sibling B", sibling_reads(b, to_b[1], b_to_a[0], a_to_b[1], launcher), admit || !yama_on);
}

/* Case 3: B forks its own child C; C reads B (descendant reading ancestor),
 * and B reads C (ancestor reading descendant). */
static void child_case(int num, int admit) {
    printf("\n=== case %d: B forks C; B %s pc_readers_admit(C) ===\n", num, admit ? "CALLS" : "does NOT call");
    pid_t b = fork();
    if (b == 0) {
        volatile uint64_t secret = MAGIC;
        int b_to_c[2], c_to_b[2];
        if (pipe(b_to_c) || pipe(c_to_b)) { perror("pipe"); _exit(1); }
        pid_t c = fork();
        if (c == 0) {
            volatile uint64_t csecret = MAGIC;
            uint64_t addr, mine = (uint64_t)(uintptr_t)&csecret;
            xread(b_to_c[0], &addr, sizeof addr);
            int rc = try_read("C reads its parent B:", getppid(), addr);
            xwrite(c_to_b[1], &mine, sizeof mine);
            char done;
            xread(b_to_c[0], &done, 1); /* stay alive until B has read us */
            _exit(rc);
        }
        if (admit) {
            pc_readers_admit((int32_t)c);
            int32_t err = -1;
            int32_t named = pc_readers_admitted(&err);
            printf("    B (pid %d): pc_common_ancestor(B, C=%d) = %d; pc_readers_admit(%d); pc_readers_admitted -> pid %d, err %d (%s)\n",
                   (int)getpid(), (int)c, pc_common_ancestor(getpid(), c), (int)c, named, err,
                   err ? strerror(err) : "ok");
        }
        uint64_t addr = (uint64_t)(uintptr_t)&secret, caddr;
        xwrite(b_to_c[1], &addr, sizeof addr);
        xread(c_to_b[0], &caddr, sizeof caddr);
        int rb = try_read("B reads its child C:", c, caddr);
        xwrite(b_to_c[1], "x", 1);
        int sc;
        waitpid(c, &sc, 0);
        int rc = WIFEXITED(sc) && WEXITSTATUS(sc) == 0;
        expect("C reads its parent B", rc, admit || !yama_on);
        expect("B reads its child C", rb == 0, 1);
        _exit(unmet);
    }
    int sb;
    waitpid(b, &sb, 0);
    unmet += !WIFEXITED(sb) || WEXITSTATUS(sb) != 0;
}

/* Case 5, as a rank whose peers are a sibling and its own child (Lightning's
 * launcher rank): B admits its sibling A, then its child C; the choice stays
 * the launcher, and both A and C (a descendant of the launcher) read B. */
static void widening_case(int num) {
    printf("\n=== case %d: B admits its sibling A, then its child C; both read B ===\n", num);
    pid_t launcher = getpid();
    int to_b[2], b_to_a[2], a_to_b[2];
    if (pipe(to_b) || pipe(b_to_a) || pipe(a_to_b)) { perror("pipe"); exit(1); }
    pid_t b = fork();
    if (b == 0) {
        volatile uint64_t secret = MAGIC;
        uint64_t addr = (uint64_t)(uintptr_t)&secret;
        pid_t a;
        xread(to_b[0], &a, sizeof a);
        pc_readers_admit((int32_t)a);
        int b_to_c[2];
        if (pipe(b_to_c)) _exit(1);
        pid_t c = fork();
        if (c == 0) {
            char go;
            xread(b_to_c[0], &go, 1);
            _exit(try_read("C reads its parent B:", getppid(), addr));
        }
        pc_readers_admit((int32_t)c);
        int32_t err = -1, named = pc_readers_admitted(&err);
        printf("    B: admitted pid %d, err %d (launcher %d)\n", named, err, (int)launcher);
        int bad = named != launcher || err != 0;
        xwrite(b_to_c[1], "x", 1);
        int sc;
        waitpid(c, &sc, 0);
        expect("C (B's child) reads B, after B admitted A and C", WIFEXITED(sc) && WEXITSTATUS(sc) == 0, 1);
        xwrite(b_to_a[1], &addr, sizeof addr);
        char done;
        xread(a_to_b[0], &done, 1);
        _exit(unmet + bad);
    }
    int read = sibling_reads(b, to_b[1], b_to_a[0], a_to_b[1], launcher);
    expect("A (B's sibling) reads B, after B admitted A and C", read, 1);
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IONBF, 0);
    int stay_root = argc > 1 && strcmp(argv[1], "--stay-root") == 0;
    if (getuid() == 0 && !stay_root) {
        /* Drop to an ordinary user, then exec again so that the process is
         * dumpable (a uid change clears the dumpable flag until exec). */
        if (setgroups(0, NULL) || setgid(1000) || setuid(1000)) { perror("drop privileges"); return 1; }
        execv("/proc/self/exe", argv);
        perror("execv");
        return 1;
    }
    printf("launcher pid %d (parent %d), uid %d euid %d gid %d, dumpable %d\n", (int)getpid(), (int)getppid(),
           (int)getuid(), (int)geteuid(), (int)getgid(), prctl(PR_GET_DUMPABLE));
    print_file("ptrace_scope", "/proc/sys/kernel/yama/ptrace_scope");
    print_file("lsm", "/sys/kernel/security/lsm");
    FILE *f = fopen("/proc/sys/kernel/yama/ptrace_scope", "r");
    int scope = 0;
    if (!f || fscanf(f, "%d", &scope) != 1) scope = -1;
    if (f) fclose(f);
    yama_on = scope == 1 && geteuid() != 0;
    sibling_case(1, 0);
    sibling_case(2, 1);
    child_case(3, 0);
    child_case(4, 1);
    widening_case(5);
    printf("YAMA CHECK (ptrace_scope %d, uid %d): %s\n", scope, (int)getuid(), unmet ? "FAILED" : "PASSED");
    return unmet ? 1 : 0;
}
