/*
 * delayline.c - userspace link emulator for pycoll's network emulator.
 *
 * Each emulated peer lives in its own network namespace and owns one TUN
 * device ("emu0" by default).  This program opens every peer's TUN (it
 * enters the peer's namespace with setns() just long enough to create the
 * device, so the device lives in the peer namespace while the fd stays
 * here), reads the IPv4 packets the peer sends, looks up the destination
 * peer by address, and holds each packet in a per directed (src,dst) FIFO
 * for that link's one-way delay (+ optional jitter) before writing it into
 * the destination peer's TUN.  Packets may be dropped with a per-link
 * probability (seeded PRNG).  Rate limiting is NOT done here: the Python side
 * puts tc htb/tbf qdiscs on the TUN devices, which is exact and gives real
 * backpressure to the sender's TCP stack.
 *
 * Because SYNs, data and ACKs all cross the delay line, TCP end-to-end sees
 * RTT = delay(u->v) + delay(v->u) and real window / BDP behaviour.
 *
 * Jitter never reorders packets within a link (a packet is never due before
 * the one queued ahead of it), mimicking a FIFO path whose latency varies.
 *
 * Queues are byte ring buffers that grow by doubling up to a per-link cap;
 * beyond the cap packets are dropped (drop-tail), so memory is bounded by the
 * sum of the caps but only what is actually in flight is touched.
 *
 * Config file (one directive per line, '#' comments):
 *   mtu BYTES                  largest packet accepted (default 65535)
 *   seed N                     PRNG seed for loss/jitter (default 1)
 *   stats PATH                 write JSON counters here at exit and on SIGUSR1
 *   watch_stdin 0|1            exit when stdin reaches EOF (parent died)
 *   peer IDX NETNS IFNAME A.B.C.D   NETNS is a name under /var/run/netns,
 *                              an absolute path to a netns file, or "-"
 *   link SRC DST DELAY_NS JITTER_NS LOSS QCAP_BYTES
 *   route A.B.C.D/LEN IDX      packets to this subnet go to peer IDX (a site
 *                              router standing for the hosts behind it);
 *                              consulted only when no peer has the address
 * Peers must be declared before links and routes.  Unlisted links: no delay, no loss.
 *
 * Usage: delayline CONFIG      prints "READY <n>" on stdout once all TUN
 *                              devices exist; runs until SIGTERM/SIGINT/
 *                              SIGHUP (or stdin EOF with watch_stdin 1).
 *
 * Build: cc -std=c99 -O2 -Wall -Wextra -o delayline delayline.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <net/if.h>
#include <linux/if_tun.h>

#define MAX_PEERS 1024
#define READ_BATCH 64     /* packets read per fd per wakeup: fairness */
#define WRITE_BATCH 512   /* packets written before polling again */
#define REC_HDR 16        /* ring record header: len(4) pad(4) due(8) */
#define REC_WRAP 0xFFFFFFFFu
#define MIN_RING (256u * 1024u)
#define DEFAULT_QCAP (32u * 1024u * 1024u)

typedef struct {
    uint8_t *buf;          /* NULL until the first packet */
    size_t size, cap;      /* current ring size; maximum ring size */
    size_t head, tail;     /* read / write offsets */
    size_t nrec, used;     /* records queued; bytes in use (records only) */
    int64_t delay_ns, jitter_ns, last_due;
    uint64_t loss_thr;     /* drop if rng() < loss_thr; 0 = never */
    int heap_pos;          /* index in the due-time heap, -1 if absent */
    uint64_t in_pkts, out_pkts, out_bytes, loss_drops, overflow_drops, write_errs;
    size_t max_used;
} link_t;

typedef struct {
    int fd;
    uint32_t ip;           /* network byte order */
    char netns[256];
    char ifname[IFNAMSIZ];
    uint64_t rx_pkts, bad_pkts;
} peer_t;

static int npeers;
static peer_t peers[MAX_PEERS];
static link_t *links;      /* npeers*npeers, index src*npeers+dst */
static int *heap;          /* heap of link indices ordered by head due time */
static int heap_n;
static uint32_t sorted_ip[MAX_PEERS];
static int sorted_idx[MAX_PEERS];
static size_t mtu = 65535;
static uint64_t rng_state = 1;
static char stats_path[1024];
static int watch_stdin;
static uint64_t unknown_dst, stats_seq;
#define MAX_ROUTES 4096
static uint32_t route_net[MAX_ROUTES], route_mask[MAX_ROUTES];   /* host byte order */
static int route_peer[MAX_ROUTES], nroutes;

static volatile sig_atomic_t g_stop, g_dump;

static void on_signal(int sig)
{
    if (sig == SIGUSR1)
        g_dump = 1;
    else
        g_stop = 1;
}

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* splitmix64: tiny, good enough for loss/jitter decisions, reproducible. */
static uint64_t rng(void)
{
    uint64_t z = (rng_state += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

static void die(const char *what)
{
    fprintf(stderr, "delayline: %s: %s\n", what, strerror(errno));
    exit(2);
}

/* ---------------------------------------------------------------- ring */

static size_t rec_size(size_t len) { return REC_HDR + ((len + 7u) & ~(size_t)7u); }

static uint32_t rd_len(const link_t *l, size_t off)
{
    uint32_t v;
    memcpy(&v, l->buf + off, 4);
    return v;
}

/* Make head point at a real record (skip a wrap marker / end of buffer). */
static void fix_head(link_t *l)
{
    if (l->nrec == 0) {
        l->head = l->tail = 0;
        return;
    }
    if (l->head + REC_HDR > l->size || rd_len(l, l->head) == REC_WRAP)
        l->head = 0;
}

static int64_t head_due(const link_t *l)
{
    int64_t d;
    memcpy(&d, l->buf + l->head + 8, 8);
    return d;
}

/* Find room for a record of `need` bytes; returns offset or -1 if full. */
static long ring_reserve(link_t *l, size_t need)
{
    if (l->nrec == 0) {
        l->head = l->tail = 0;
        return need <= l->size ? 0 : -1;
    }
    if (l->tail > l->head) {              /* contiguous [head, tail) */
        if (l->size - l->tail >= need)
            return (long)l->tail;
        if (l->head > need) {             /* wrap; strict keeps tail != head */
            if (l->size - l->tail >= 4) {
                uint32_t w = REC_WRAP;
                memcpy(l->buf + l->tail, &w, 4);
            }
            l->tail = 0;
            return 0;
        }
        return -1;
    }
    /* wrapped: [head, size) + [0, tail), free space is [tail, head) */
    if (l->head - l->tail > need)
        return (long)l->tail;
    return -1;
}

/* Double the ring (up to cap), copying queued records in order to offset 0. */
static int ring_grow(link_t *l, size_t need)
{
    size_t nsize = l->size ? l->size * 2 : MIN_RING;
    while (nsize < 2 * rec_size(mtu))
        nsize *= 2;
    if (nsize > l->cap)
        nsize = l->cap;
    if (nsize <= l->size || nsize < need)
        return -1;
    uint8_t *nb = malloc(nsize);
    if (!nb)
        return -1;
    size_t off = 0, h = l->head, k;
    for (k = 0; k < l->nrec; k++) {
        if (h + REC_HDR > l->size || rd_len(l, h) == REC_WRAP)
            h = 0;
        size_t rs = rec_size(rd_len(l, h));
        memcpy(nb + off, l->buf + h, rs);
        off += rs;
        h += rs;
    }
    free(l->buf);
    l->buf = nb;
    l->size = nsize;
    l->head = 0;
    l->tail = off;
    if (l->nrec == 0)
        l->tail = 0;
    return 0;
}

static int ring_push(link_t *l, const uint8_t *pkt, size_t len, int64_t due)
{
    size_t need = rec_size(len);
    long off = l->buf ? ring_reserve(l, need) : -1;
    if (off < 0) {
        if (ring_grow(l, need) < 0)
            return -1;
        off = ring_reserve(l, need);
        if (off < 0)
            return -1;
    }
    uint32_t len32 = (uint32_t)len, pad = 0;
    memcpy(l->buf + off, &len32, 4);
    memcpy(l->buf + off + 4, &pad, 4);
    memcpy(l->buf + off + 8, &due, 8);
    memcpy(l->buf + off + REC_HDR, pkt, len);
    l->tail = (size_t)off + need;
    l->nrec++;
    l->used += need;
    if (l->used > l->max_used)
        l->max_used = l->used;
    return 0;
}

static void ring_pop(link_t *l)
{
    size_t need = rec_size(rd_len(l, l->head));
    l->head += need;
    l->nrec--;
    l->used -= need;
    fix_head(l);
}

/* ---------------------------------------------------------------- heap */

static int64_t key(int li) { return head_due(&links[li]); }

static void heap_swap(int a, int b)
{
    int t = heap[a];
    heap[a] = heap[b];
    heap[b] = t;
    links[heap[a]].heap_pos = a;
    links[heap[b]].heap_pos = b;
}

static void heap_up(int i)
{
    while (i > 0) {
        int p = (i - 1) / 2;
        if (key(heap[p]) <= key(heap[i]))
            break;
        heap_swap(p, i);
        i = p;
    }
}

static void heap_down(int i)
{
    for (;;) {
        int c = 2 * i + 1, m = i;
        if (c < heap_n && key(heap[c]) < key(heap[m]))
            m = c;
        if (c + 1 < heap_n && key(heap[c + 1]) < key(heap[m]))
            m = c + 1;
        if (m == i)
            break;
        heap_swap(i, m);
        i = m;
    }
}

static void heap_push(int li)
{
    heap[heap_n] = li;
    links[li].heap_pos = heap_n;
    heap_n++;
    heap_up(heap_n - 1);
}

static void heap_pop_top(void)
{
    links[heap[0]].heap_pos = -1;
    heap_n--;
    if (heap_n > 0) {
        heap[0] = heap[heap_n];
        links[heap[0]].heap_pos = 0;
        heap_down(0);
    }
}

/* ---------------------------------------------------------------- config */

static int find_peer(uint32_t ip)
{
    int lo = 0, hi = npeers - 1;
    uint32_t h = ntohl(ip);
    while (lo <= hi) {
        int mid = (lo + hi) / 2;
        if (sorted_ip[mid] == h)
            return sorted_idx[mid];
        if (sorted_ip[mid] < h)
            lo = mid + 1;
        else
            hi = mid - 1;
    }
    return -1;
}

/* A peer's own address first, then the routes (first match; few, checked in order). */
static int find_dst(uint32_t ip)
{
    int i, p = find_peer(ip);
    uint32_t h = ntohl(ip);
    if (p >= 0)
        return p;
    for (i = 0; i < nroutes; i++)
        if ((h & route_mask[i]) == route_net[i])
            return route_peer[i];
    return -1;
}

static void build_index(void)
{
    int i, j;
    for (i = 0; i < npeers; i++) {
        sorted_ip[i] = ntohl(peers[i].ip);
        sorted_idx[i] = i;
    }
    for (i = 1; i < npeers; i++) {   /* insertion sort: n is small, runs once */
        uint32_t k = sorted_ip[i];
        int v = sorted_idx[i];
        for (j = i - 1; j >= 0 && sorted_ip[j] > k; j--) {
            sorted_ip[j + 1] = sorted_ip[j];
            sorted_idx[j + 1] = sorted_idx[j];
        }
        sorted_ip[j + 1] = k;
        sorted_idx[j + 1] = v;
    }
    for (i = 1; i < npeers; i++)
        if (sorted_ip[i] == sorted_ip[i - 1]) {
            fprintf(stderr, "delayline: duplicate peer address\n");
            exit(2);
        }
}

static void alloc_links(int n)
{
    int i;
    links = calloc((size_t)n * (size_t)n, sizeof(link_t));
    heap = calloc((size_t)n * (size_t)n, sizeof(int));
    if (!links || !heap)
        die("calloc");
    for (i = 0; i < n * n; i++) {
        links[i].cap = DEFAULT_QCAP;
        links[i].heap_pos = -1;
    }
}

static void read_config(const char *path)
{
    FILE *f = fopen(path, "r");
    char line[2048];
    int lineno = 0, declared = -1;
    if (!f)
        die(path);
    while (fgets(line, sizeof line, f) && lineno < 10000000) {
        char *p = line, kw[32];
        lineno++;
        while (*p == ' ' || *p == '\t')
            p++;
        if (*p == '#' || *p == '\n' || *p == 0)
            continue;
        if (sscanf(p, "%31s", kw) != 1)
            continue;
        if (!strcmp(kw, "peers")) {
            if (sscanf(p, "%*s %d", &declared) != 1 || declared < 1 || declared > MAX_PEERS)
                goto bad;
            alloc_links(declared);
        } else if (!strcmp(kw, "mtu")) {
            unsigned long v;
            if (sscanf(p, "%*s %lu", &v) != 1 || v < 576 || v > 65535)
                goto bad;
            mtu = v;
        } else if (!strcmp(kw, "seed")) {
            unsigned long long v;
            if (sscanf(p, "%*s %llu", &v) != 1)
                goto bad;
            rng_state = (uint64_t)v;
        } else if (!strcmp(kw, "stats")) {
            if (sscanf(p, "%*s %1023s", stats_path) != 1)
                goto bad;
        } else if (!strcmp(kw, "watch_stdin")) {
            if (sscanf(p, "%*s %d", &watch_stdin) != 1)
                goto bad;
        } else if (!strcmp(kw, "peer")) {
            int idx;
            char ns[256], ifn[64], ip[64];
            struct in_addr a;
            if (declared < 0 || sscanf(p, "%*s %d %255s %63s %63s", &idx, ns, ifn, ip) != 4)
                goto bad;
            if (idx != npeers || idx >= declared || strlen(ifn) >= IFNAMSIZ ||
                inet_pton(AF_INET, ip, &a) != 1)
                goto bad;
            memcpy(peers[idx].netns, ns, sizeof ns);
            memcpy(peers[idx].ifname, ifn, strlen(ifn) + 1);
            peers[idx].ip = a.s_addr;
            peers[idx].fd = -1;
            npeers++;
        } else if (!strcmp(kw, "link")) {
            int s, d;
            long long dl, jt;
            double loss;
            unsigned long long qcap;
            if (sscanf(p, "%*s %d %d %lld %lld %lf %llu", &s, &d, &dl, &jt, &loss, &qcap) != 6)
                goto bad;
            if (s < 0 || d < 0 || s >= declared || d >= declared || s == d || dl < 0 || jt < 0 ||
                !(loss >= 0.0 && loss <= 1.0) || qcap < 2 * rec_size(mtu) ||
                qcap > (1ULL << 34))
                goto bad;
            link_t *l = &links[s * declared + d];
            l->delay_ns = dl;
            l->jitter_ns = jt;
            /* 2^64 * loss, saturating: exact enough for any loss >= 1e-15 */
            l->loss_thr = loss >= 1.0 ? UINT64_MAX : (uint64_t)(loss * 18446744073709551616.0);
            l->cap = (size_t)qcap & ~(size_t)7;   /* records are 8-aligned */
        } else if (!strcmp(kw, "route")) {
            char net[64];
            int plen, idx;
            struct in_addr a;
            if (sscanf(p, "%*s %63[0-9.]/%d %d", net, &plen, &idx) != 3 || plen < 0 || plen > 32 ||
                idx < 0 || idx >= npeers || nroutes >= MAX_ROUTES || inet_pton(AF_INET, net, &a) != 1)
                goto bad;
            route_mask[nroutes] = plen ? ~(uint32_t)0 << (32 - plen) : 0;
            route_net[nroutes] = ntohl(a.s_addr) & route_mask[nroutes];
            route_peer[nroutes++] = idx;
        } else {
            goto bad;
        }
        continue;
bad:
        fprintf(stderr, "delayline: %s:%d: bad directive: %s", path, lineno, line);
        exit(2);
    }
    fclose(f);
    if (declared < 1 || npeers != declared) {
        fprintf(stderr, "delayline: config declares %d peers but lists %d\n", declared, npeers);
        exit(2);
    }
    build_index();
}

/* ---------------------------------------------------------------- tun */

static int open_tun_in(const peer_t *p, int home_ns)
{
    int nsfd = -1, fd;
    struct ifreq ifr;
    if (strcmp(p->netns, "-") != 0) {
        char path[512];
        if (p->netns[0] == '/')
            snprintf(path, sizeof path, "%s", p->netns);
        else
            snprintf(path, sizeof path, "/var/run/netns/%s", p->netns);
        nsfd = open(path, O_RDONLY | O_CLOEXEC);
        if (nsfd < 0)
            die(path);
        if (setns(nsfd, CLONE_NEWNET) < 0)
            die("setns(peer)");
        close(nsfd);
    }
    /* The TUN's namespace is the one current at open() time. */
    fd = open("/dev/net/tun", O_RDWR | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0)
        die("/dev/net/tun");
    memset(&ifr, 0, sizeof ifr);
    ifr.ifr_flags = IFF_TUN | IFF_NO_PI;
    memcpy(ifr.ifr_name, p->ifname, strlen(p->ifname) + 1);
    if (ioctl(fd, TUNSETIFF, &ifr) < 0)
        die("TUNSETIFF");
    if (strcmp(p->netns, "-") != 0 && setns(home_ns, CLONE_NEWNET) < 0)
        die("setns(home)");
    return fd;
}

/* ---------------------------------------------------------------- stats */

static void write_stats(void)
{
    char tmp[1100];
    FILE *f;
    int s, d;
    if (!stats_path[0])
        return;
    snprintf(tmp, sizeof tmp, "%s.tmp", stats_path);
    f = fopen(tmp, "w");
    if (!f)
        return;
    stats_seq++;
    fprintf(f, "{\"seq\": %" PRIu64 ", \"unknown_dst\": %" PRIu64 ", \"peers\": [", stats_seq,
            unknown_dst);
    for (s = 0; s < npeers; s++)
        fprintf(f, "%s{\"rx_pkts\": %" PRIu64 ", \"bad_pkts\": %" PRIu64 "}", s ? ", " : "",
                peers[s].rx_pkts, peers[s].bad_pkts);
    fprintf(f, "], \"links\": [");
    int first = 1;
    for (s = 0; s < npeers; s++)
        for (d = 0; d < npeers; d++) {
            link_t *l = &links[s * npeers + d];
            if (s == d)
                continue;
            fprintf(f,
                    "%s\n{\"src\": %d, \"dst\": %d, \"in_pkts\": %" PRIu64 ", \"out_pkts\": %" PRIu64
                    ", \"out_bytes\": %" PRIu64 ", \"loss_drops\": %" PRIu64
                    ", \"overflow_drops\": %" PRIu64 ", \"write_errors\": %" PRIu64
                    ", \"queued_pkts\": %zu, \"max_queue_bytes\": %zu, \"ring_bytes\": %zu}",
                    first ? "" : ",", s, d, l->in_pkts, l->out_pkts, l->out_bytes, l->loss_drops,
                    l->overflow_drops, l->write_errs, l->nrec, l->max_used, l->size);
            first = 0;
        }
    fprintf(f, "]}\n");
    if (fclose(f) == 0)
        rename(tmp, stats_path);
}

/* ---------------------------------------------------------------- main */

static void handle_packet(int src, const uint8_t *pkt, size_t len, int64_t now)
{
    uint32_t dst_ip;
    int dst;
    link_t *l;
    if (len < 20 || (pkt[0] >> 4) != 4) {   /* IPv4 only; v6 is disabled in peers */
        peers[src].bad_pkts++;
        return;
    }
    memcpy(&dst_ip, pkt + 16, 4);
    dst = find_dst(dst_ip);
    if (dst < 0 || dst == src) {
        unknown_dst++;
        return;
    }
    l = &links[src * npeers + dst];
    l->in_pkts++;
    if (l->loss_thr && rng() < l->loss_thr) {
        l->loss_drops++;
        return;
    }
    int64_t due = now + l->delay_ns;
    if (l->jitter_ns > 0) {
        uint64_t span = 2 * (uint64_t)l->jitter_ns + 1;
        due += (int64_t)(rng() % span) - l->jitter_ns;
        if (due < now)
            due = now;
    }
    if (due < l->last_due)   /* keep FIFO order: jitter never reorders */
        due = l->last_due;
    int was_empty = l->nrec == 0;
    if (ring_push(l, pkt, len, due) < 0) {
        l->overflow_drops++;
        return;
    }
    l->last_due = due;
    if (was_empty)
        heap_push((int)(l - links));
}

/* Write every packet whose time has come (up to WRITE_BATCH). */
static int flush_due(int64_t now)
{
    int n = 0;
    while (heap_n > 0 && n < WRITE_BATCH) {
        int li = heap[0];
        link_t *l = &links[li];
        if (head_due(l) > now)
            break;
        uint32_t len = rd_len(l, l->head);
        int dst = li % npeers;
        ssize_t w = write(peers[dst].fd, l->buf + l->head + REC_HDR, len);
        if (w == (ssize_t)len) {
            l->out_pkts++;
            l->out_bytes += len;
        } else {
            l->write_errs++;
        }
        ring_pop(l);
        if (l->nrec == 0)
            heap_pop_top();
        else
            heap_down(0);
        n++;
    }
    return n;
}

int main(int argc, char **argv)
{
    int i, home_ns;
    sigset_t block, orig;
    struct sigaction sa;
    struct pollfd *pfd;
    uint8_t *buf;

    if (argc != 2 || !strcmp(argv[1], "-h") || !strcmp(argv[1], "--help")) {
        fprintf(stderr, "usage: %s CONFIG   (see the comment at the top of delayline.c)\n",
                argv[0]);
        return argc == 2 ? 0 : 2;
    }
    read_config(argv[1]);
    /* Default 50 us timer slack would add up to 50 us to every delay. */
    prctl(PR_SET_TIMERSLACK, 1000UL, 0UL, 0UL, 0UL);

    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGHUP, &sa, NULL);
    sigaction(SIGUSR1, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
    /* Signals are only delivered inside ppoll(): no races on the flags. */
    sigemptyset(&block);
    sigaddset(&block, SIGTERM);
    sigaddset(&block, SIGINT);
    sigaddset(&block, SIGHUP);
    sigaddset(&block, SIGUSR1);
    sigprocmask(SIG_BLOCK, &block, &orig);

    home_ns = open("/proc/self/ns/net", O_RDONLY | O_CLOEXEC);
    if (home_ns < 0)
        die("/proc/self/ns/net");
    for (i = 0; i < npeers; i++)
        peers[i].fd = open_tun_in(&peers[i], home_ns);
    close(home_ns);

    pfd = calloc((size_t)npeers + 1, sizeof *pfd);
    buf = malloc(65536);
    if (!pfd || !buf)
        die("malloc");
    for (i = 0; i < npeers; i++) {
        pfd[i].fd = peers[i].fd;
        pfd[i].events = POLLIN;
    }
    pfd[npeers].fd = watch_stdin ? 0 : -1;
    pfd[npeers].events = POLLIN;

    printf("READY %d\n", npeers);
    fflush(stdout);

    while (!g_stop) {
        int64_t now = now_ns();
        struct timespec ts, *tsp = &ts;
        int busy = flush_due(now) >= WRITE_BATCH;

        if (g_dump) {
            g_dump = 0;
            write_stats();
        }
        if (busy) {
            ts.tv_sec = 0;
            ts.tv_nsec = 0;
        } else if (heap_n > 0) {
            int64_t wait = head_due(&links[heap[0]]) - now_ns();
            if (wait < 0)
                wait = 0;
            ts.tv_sec = (time_t)(wait / 1000000000LL);
            ts.tv_nsec = (long)(wait % 1000000000LL);
        } else {
            ts.tv_sec = 1;   /* idle: wake up now and then anyway */
            ts.tv_nsec = 0;
        }
        int r = ppoll(pfd, (nfds_t)npeers + 1, tsp, &orig);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            die("ppoll");
        }
        if (r == 0)
            continue;
        if (pfd[npeers].revents) {
            ssize_t k = read(0, buf, 65536);
            if (k == 0 || (k < 0 && errno != EINTR && errno != EAGAIN))
                break;   /* parent went away */
        }
        for (i = 0; i < npeers; i++) {
            int k;
            if (!(pfd[i].revents & POLLIN))
                continue;
            /* Timestamp at read time so queueing in here does not add delay. */
            for (k = 0; k < READ_BATCH; k++) {
                ssize_t len = read(pfd[i].fd, buf, 65536);
                if (len < 0) {
                    if (errno != EAGAIN && errno != EINTR)
                        peers[i].bad_pkts++;
                    break;
                }
                peers[i].rx_pkts++;
                handle_packet(i, buf, (size_t)len, now_ns());
            }
        }
    }
    write_stats();
    for (i = 0; i < npeers; i++)
        close(peers[i].fd);
    return 0;
}
