/*
 * Closed-loop socketmap load generator: CONNS connections, each with exactly one request in flight, as
 * Postfix's socketmap client (dict_sockmap) does.  Compiled at run time by bench/policyd_vs_peer.py.
 *
 *   sockmap_load TARGET CONNS WARMUP_S MEASURE_S REQFILE
 *   TARGET: tcp:HOST:PORT or unix:PATH;  REQFILE: one request payload ("name key") per line.
 *
 * Latency is measured from write() of a request to the read() that completes its reply.  Replies count only
 * for requests sent inside the measurement window.  Prints one JSON object on stdout.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define MAX_CONNS 1024
#define MAX_REQS 100000
#define BUF 8192
#define HIST_NS 100                   /* histogram bucket width */
#define HIST_N (100 * 1000 * 1000 / HIST_NS) /* up to 100 ms, then the overflow bucket */

typedef struct {
    int fd;
    size_t next;
    uint64_t t0;
    size_t len;
    char buf[BUF];
} conn_t;

static char *reqs[MAX_REQS];
static size_t reqlen[MAX_REQS];
static size_t nreqs;
static uint32_t hist[HIST_N + 1];
static uint64_t max_ns, counted, all_replies, bad;
static char first_bad[128];

static void die(const char *what) {
    fprintf(stderr, "sockmap_load: %s: %s\n", what, strerror(errno));
    exit(2);
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static double cpu_s(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_stime.tv_sec + (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

static void load_requests(const char *path) {
    FILE *f = fopen(path, "r");
    if (!f) die(path);
    char line[600];
    while (nreqs < MAX_REQS && fgets(line, sizeof line, f)) {
        size_t n = strcspn(line, "\r\n");
        if (!n) continue;
        line[n] = 0;
        char *r = malloc(n + 16);
        if (!r) die("malloc");
        reqlen[nreqs] = (size_t)sprintf(r, "%zu:%s,", n, line);
        reqs[nreqs++] = r;
    }
    fclose(f);
    if (!nreqs) {
        fprintf(stderr, "sockmap_load: no requests in %s\n", path);
        exit(2);
    }
}

static int open_conn(const char *target) {
    int fd;
    if (!strncmp(target, "unix:", 5)) {
        struct sockaddr_un sun = {.sun_family = AF_UNIX};
        snprintf(sun.sun_path, sizeof sun.sun_path, "%s", target + 5);
        fd = socket(AF_UNIX, SOCK_STREAM, 0);
        if (fd < 0 || connect(fd, (struct sockaddr *)&sun, sizeof sun) < 0) die(target);
    } else if (!strncmp(target, "tcp:", 4)) {
        char host[256];
        snprintf(host, sizeof host, "%s", target + 4);
        char *colon = strrchr(host, ':');
        if (!colon) die("target needs tcp:HOST:PORT");
        *colon = 0;
        struct sockaddr_in sin = {.sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(colon + 1))};
        if (inet_pton(AF_INET, host, &sin.sin_addr) != 1) die("bad IPv4 address");
        fd = socket(AF_INET, SOCK_STREAM, 0);
        if (fd < 0 || connect(fd, (struct sockaddr *)&sin, sizeof sin) < 0) die(target);
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    } else {
        errno = EINVAL;
        die("target must be tcp:HOST:PORT or unix:PATH");
    }
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    return fd;
}

static void send_next(conn_t *c) {
    size_t i = c->next++ % nreqs;
    c->t0 = now_ns();
    ssize_t w = write(c->fd, reqs[i], reqlen[i]);
    if (w != (ssize_t)reqlen[i]) die("short write");
}

/* One complete netstring reply at the start of c->buf?  Returns its total length, 0 if incomplete. */
static size_t reply_len(conn_t *c, const char **payload, size_t *plen) {
    char *colon = memchr(c->buf, ':', c->len < 8 ? c->len : 8);
    if (!colon) {
        if (c->len >= 8) { errno = EPROTO; die("bad netstring reply"); }
        return 0;
    }
    size_t n = strtoul(c->buf, NULL, 10);
    size_t head = (size_t)(colon - c->buf) + 1;
    if (c->len < head + n + 1) return 0;
    if (c->buf[head + n] != ',') { errno = EPROTO; die("netstring reply without ','"); }
    *payload = c->buf + head;
    *plen = n;
    return head + n + 1;
}

static uint64_t percentile(double p) {
    uint64_t want = (uint64_t)(p * (double)counted + 0.5), acc = 0;
    if (want == 0) want = 1;
    for (size_t i = 0; i <= HIST_N; i++) {
        acc += hist[i];
        if (acc >= want) return i == HIST_N ? max_ns : i * HIST_NS + HIST_NS / 2;
    }
    return max_ns;
}

int main(int argc, char **argv) {
    if (argc != 6) {
        fprintf(stderr, "usage: %s tcp:HOST:PORT|unix:PATH CONNS WARMUP_S MEASURE_S REQFILE\n", argv[0]);
        return 2;
    }
    int nconns = atoi(argv[2]);
    double warm = atof(argv[3]), dur = atof(argv[4]);
    if (nconns < 1 || nconns > MAX_CONNS || dur <= 0 || warm < 0 || dur > 600) {
        fprintf(stderr, "sockmap_load: bad arguments\n");
        return 2;
    }
    load_requests(argv[5]);
    conn_t *conns = calloc((size_t)nconns, sizeof(conn_t));
    int ep = epoll_create1(0);
    if (!conns || ep < 0) die("setup");
    for (int i = 0; i < nconns; i++) {
        conns[i].fd = open_conn(argv[1]);
        conns[i].next = (size_t)i * nreqs / (size_t)nconns;
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &conns[i]};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, conns[i].fd, &ev) < 0) die("epoll_ctl");
    }
    uint64_t start = now_ns();
    uint64_t mstart = start + (uint64_t)(warm * 1e9), mend = mstart + (uint64_t)(dur * 1e9);
    int measuring = 0;
    double cpu0 = 0, cpu1 = 0;
    for (int i = 0; i < nconns; i++) send_next(&conns[i]);
    struct epoll_event evs[MAX_CONNS];
    uint64_t t = start;
    while (t < mend) {
        int n = epoll_wait(ep, evs, MAX_CONNS, 100);
        if (n < 0 && errno != EINTR) die("epoll_wait");
        for (int k = 0; k < n; k++) {
            conn_t *c = evs[k].data.ptr;
            ssize_t r = read(c->fd, c->buf + c->len, BUF - c->len);
            if (r == 0) { errno = ECONNRESET; die("server closed a connection"); }
            if (r < 0) {
                if (errno == EAGAIN || errno == EINTR) continue;
                die("read");
            }
            t = now_ns();
            c->len += (size_t)r;
            const char *p;
            size_t plen, total;
            while ((total = reply_len(c, &p, &plen)) > 0) {
                all_replies++;
                if (c->t0 >= mstart && t <= mend) {
                    uint64_t lat = t - c->t0;
                    hist[lat / HIST_NS < HIST_N ? lat / HIST_NS : HIST_N]++;
                    if (lat > max_ns) max_ns = lat;
                    counted++;
                }
                if (plen < 3 || memcmp(p, "OK ", 3) != 0) {
                    if (!bad++) snprintf(first_bad, sizeof first_bad, "%.*s", (int)(plen < 100 ? plen : 100), p);
                }
                memmove(c->buf, c->buf + total, c->len - total);
                c->len -= total;
                send_next(c);
            }
        }
        t = now_ns();
        if (!measuring && t >= mstart) {
            measuring = 1;
            cpu0 = cpu_s();
        }
    }
    cpu1 = cpu_s();
    for (int k = 0; k < nconns; k++) close(conns[k].fd);
    for (char *q = first_bad; *q; q++)
        if (*q == '"' || *q == '\\' || (unsigned char)*q < 0x20) *q = '?';
    printf("{\"conns\": %d, \"seconds\": %.3f, \"queries\": %llu, \"all_replies\": %llu, \"wall\": %.3f, "
           "\"qps\": %.1f, \"p50_us\": %.2f, \"p90_us\": %.2f, \"p99_us\": %.2f, \"p999_us\": %.2f, "
           "\"max_us\": %.2f, \"bad\": %llu, \"first_bad\": \"%s\", \"cpu\": %.4f}\n",
           nconns, dur, (unsigned long long)counted, (unsigned long long)all_replies, (t - start) / 1e9,
           counted / dur, percentile(0.50) / 1e3, percentile(0.90) / 1e3, percentile(0.99) / 1e3,
           percentile(0.999) / 1e3, max_ns / 1e3, (unsigned long long)bad, first_bad,
           dur > 0 ? (cpu1 - cpu0) / dur : 0.0);
    return 0;
}
