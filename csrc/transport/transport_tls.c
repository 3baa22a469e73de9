/*
 * transport_tls.c - TLS 1.3 over a TCP socket (pycoll's encrypted data plane).
 *
 * Authenticated by an external pre-shared key (the caller derives it from the
 * group secret): no certificates; a peer without the key fails the handshake's
 * binder check and the connection is refused. The handshake runs to the end,
 * blocking with a deadline, before the engine gets the conn, so sendv/recvv
 * only move application data: AES-128-GCM records of at most 16 KiB.
 *
 * Records and frames: each sendv call starts with a frame header (or the rest
 * of a frame) and the first record of a call begins with it, so a header never
 * straddles two records and peek_copy (SSL_peek, one record) sees it whole.
 *
 * OpenSSL's socket BIO writes with write(): a peer gone would raise SIGPIPE and kill
 * a host that does not ignore it. Ours is that BIO with send(MSG_NOSIGNAL) for writes.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/ssl.h>

#include "transport.h"

#define TLS_RECORD 16384 /* TLS's largest plaintext record */
#define TLS_IDENTITY "pycoll-data-plane/1"

typedef struct {
    SSL_CTX *ctx;
    SSL *ssl;
    BIO_METHOD *bio_method; /* the socket BIO's, writing with MSG_NOSIGNAL */
    uint8_t psk[64];
    size_t psk_len;
    size_t pend;            /* bytes of a record SSL_write asked us to retry (0: none) */
    uint8_t stage[TLS_RECORD];
} tls_impl;

static const unsigned char AES128GCM_SHA256[2] = {0x13, 0x01};

static SSL_SESSION *psk_session(SSL *ssl, tls_impl *t) {
    const SSL_CIPHER *cipher = SSL_CIPHER_find(ssl, AES128GCM_SHA256);
    SSL_SESSION *s = cipher ? SSL_SESSION_new() : NULL;
    if (!s) return NULL;
    if (!SSL_SESSION_set1_master_key(s, t->psk, t->psk_len) || !SSL_SESSION_set_cipher(s, cipher) ||
        !SSL_SESSION_set_protocol_version(s, TLS1_3_VERSION)) {
        SSL_SESSION_free(s);
        return NULL;
    }
    return s;
}

/* client: offer the key under our identity */
static int use_psk(SSL *ssl, const EVP_MD *md, const unsigned char **id, size_t *idlen, SSL_SESSION **sess) {
    tls_impl *t = SSL_get_app_data(ssl);
    (void)md; /* our one suite's hash: SHA-256 */
    *sess = psk_session(ssl, t);
    if (!*sess) return 0;
    *id = (const unsigned char *)TLS_IDENTITY;
    *idlen = strlen(TLS_IDENTITY);
    return 1;
}

/* server: the one identity we know; the handshake then checks the client proved the key */
static int find_psk(SSL *ssl, const unsigned char *id, size_t idlen, SSL_SESSION **sess) {
    tls_impl *t = SSL_get_app_data(ssl);
    *sess = NULL;
    if (idlen != strlen(TLS_IDENTITY) || memcmp(id, TLS_IDENTITY, idlen) != 0) return 1; /* unknown: no PSK */
    *sess = psk_session(ssl, t);
    return *sess != NULL;
}

/* BIO write: send(MSG_NOSIGNAL), retry flags as the socket BIO sets them */
static int nosig_write(BIO *b, const char *buf, int len) {
    int fd = -1;
    BIO_get_fd(b, &fd);
    BIO_clear_retry_flags(b);
    ssize_t r = send(fd, buf, (size_t)len, MSG_NOSIGNAL);
    if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) BIO_set_retry_write(b);
    return (int)r;
}

static int nosig_puts(BIO *b, const char *str) {
    return nosig_write(b, str, (int)strlen(str));
}

/* The socket BIO's methods with our write; NULL when OpenSSL cannot make one. */
static BIO_METHOD *nosig_method(void) {
    const BIO_METHOD *sock = BIO_s_socket();
    BIO_METHOD *m = BIO_meth_new(BIO_TYPE_SOCKET, "pycoll socket");
    if (!m) return NULL;
    if (!BIO_meth_set_write(m, nosig_write) || !BIO_meth_set_read(m, BIO_meth_get_read(sock)) ||
        !BIO_meth_set_puts(m, nosig_puts) || !BIO_meth_set_ctrl(m, BIO_meth_get_ctrl(sock)) ||
        !BIO_meth_set_create(m, BIO_meth_get_create(sock)) || !BIO_meth_set_destroy(m, BIO_meth_get_destroy(sock))) {
        BIO_meth_free(m);
        return NULL;
    }
    return m;
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static long fail_io(pc_conn *c, int e) {
    ERR_clear_error();
    c->err = e;
    return PC_IO_ERROR;
}

/* An SSL result r <= 0 as PC_IO_*. */
static long classify(pc_conn *c, int r) {
    tls_impl *t = c->impl;
    int e = SSL_get_error(t->ssl, r);
    switch (e) {
    case SSL_ERROR_WANT_READ:
    case SSL_ERROR_WANT_WRITE:
        return PC_IO_AGAIN;
    case SSL_ERROR_ZERO_RETURN:
        return PC_IO_CLOSED;
    case SSL_ERROR_SYSCALL:
        ERR_clear_error();
        if (errno == 0 || errno == ECONNRESET || errno == EPIPE || errno == ENOTCONN || errno == ESHUTDOWN)
            return PC_IO_CLOSED;
        if (errno == EAGAIN || errno == EINTR) return PC_IO_AGAIN;
        c->err = errno;
        return PC_IO_ERROR;
    default:
        /* the peer's end closed without close_notify (how pycoll peers close, and how a dead
         * one does): OpenSSL 3 reports that as an error, but it is a closed peer like TCP's */
#ifdef SSL_R_UNEXPECTED_EOF_WHILE_READING /* OpenSSL 1.1 says SSL_ERROR_SYSCALL, errno 0: above */
        if (ERR_GET_REASON(ERR_peek_error()) == SSL_R_UNEXPECTED_EOF_WHILE_READING) {
            ERR_clear_error();
            return PC_IO_CLOSED;
        }
#endif
        /* a record failed its authentication tag, or the peer sent an alert */
        return fail_io(c, EBADMSG);
    }
}

static long tls_sendv(pc_conn *c, const struct iovec *iov, int iovcnt) {
    tls_impl *t = c->impl;
    long total = 0;
    int i = 0;
    size_t off = 0; /* into iov[i] */
    for (;;) {
        /* the next record: straight out of a large piece, else staged: whole small pieces (a
         * header never splits), large ones cut */
        size_t limit = t->pend ? t->pend : TLS_RECORD, n = 0;
        const void *from = t->stage;
        while (i < iovcnt && iov[i].iov_len == off) i++, off = 0;
        if (i < iovcnt && iov[i].iov_len - off >= limit) {
            from = (const char *)iov[i].iov_base + off;
            n = limit, off += limit;
        }
        while (from == t->stage && i < iovcnt && n < limit) {
            size_t left = iov[i].iov_len - off;
            if (left == 0) {
                i++, off = 0;
                continue;
            }
            size_t take = left < limit - n ? left : limit - n;
            if (!t->pend && take < left && n > 0 && left <= 64) break;
            memcpy(t->stage + n, (const char *)iov[i].iov_base + off, take);
            n += take, off += take;
        }
        if (n == 0) return total ? total : PC_IO_AGAIN;
        ERR_clear_error();
        int r = SSL_write(t->ssl, from, (int)n); /* a retry may come from elsewhere: same bytes */
        if (r <= 0) {
            long res = classify(c, r);
            if (res == PC_IO_AGAIN) {
                t->pend = n; /* retry this very record: the engine offers the same bytes again */
                return total ? total : PC_IO_AGAIN;
            }
            return total ? total : res;
        }
        t->pend = 0;
        total += r;
    }
}

static long tls_recvv(pc_conn *c, const struct iovec *iov, int iovcnt) {
    tls_impl *t = c->impl;
    long total = 0;
    for (int i = 0; i < iovcnt; i++) {
        size_t got = 0;
        while (got < iov[i].iov_len) {
            size_t want = iov[i].iov_len - got;
            ERR_clear_error();
            int r = SSL_read(t->ssl, (char *)iov[i].iov_base + got, want > (1u << 30) ? 1 << 30 : (int)want);
            if (r <= 0) {
                long res = classify(c, r);
                return total ? total : res;
            }
            got += (size_t)r, total += r;
        }
    }
    return total ? total : PC_IO_AGAIN;
}

static long tls_peek_copy(pc_conn *c, void *dst, uint64_t n) {
    tls_impl *t = c->impl;
    ERR_clear_error();
    int r = SSL_peek(t->ssl, dst, n > (1u << 30) ? 1 << 30 : (int)n);
    return r > 0 ? r : classify(c, r);
}

static void tls_shutdown(pc_conn *c) {
    if (c->fd >= 0) shutdown(c->fd, SHUT_RDWR); /* no close_notify: the engine fails fast */
}

static void tls_free(tls_impl *t) {
    if (!t) return;
    if (t->ssl) SSL_free(t->ssl);
    if (t->ctx) SSL_CTX_free(t->ctx);
    if (t->bio_method) BIO_meth_free(t->bio_method); /* after the BIO that used it, freed with ssl */
    OPENSSL_cleanse(t->psk, sizeof t->psk);
    free(t);
}

static void tls_destroy(pc_conn *c) {
    if (c->fd >= 0) close(c->fd);
    tls_free(c->impl);
    free(c);
}

static const pc_conn_ops tls_ops = {.sendv = tls_sendv, .recvv = tls_recvv, .shutdown = tls_shutdown,
                                    .destroy = tls_destroy, .peek_copy = tls_peek_copy};

/* Runs the handshake to the end on the non-blocking socket: PC_OK, PC_ERR_PROTO (the peer
 * does not hold the key or does not speak TLS), PC_ERR_PEER (it closed), PC_ERR_TIMEOUT. */
static pc_status handshake(pc_conn *c, double timeout_s) {
    tls_impl *t = c->impl;
    double deadline = now_s() + timeout_s;
    for (;;) {
        ERR_clear_error();
        int r = SSL_do_handshake(t->ssl);
        if (r == 1) return PC_OK;
        int e = SSL_get_error(t->ssl, r);
        short ev;
        if (e == SSL_ERROR_WANT_READ) ev = POLLIN;
        else if (e == SSL_ERROR_WANT_WRITE) ev = POLLOUT;
        else {
            int closed = e == SSL_ERROR_SYSCALL || e == SSL_ERROR_ZERO_RETURN;
            ERR_clear_error();
            return closed ? PC_ERR_PEER : PC_ERR_PROTO;
        }
        double left = deadline - now_s();
        if (left <= 0) return PC_ERR_TIMEOUT;
        struct pollfd p = {.fd = c->fd, .events = ev};
        int ms = left > 1.0 ? 1000 : (int)(left * 1000) + 1;
        if (poll(&p, 1, ms) < 0 && errno != EINTR) return PC_ERR_IO;
    }
}

pc_conn *pc_tls_conn(int fd, int sockbuf_bytes, int server, const uint8_t *psk, int psk_len, double timeout_s,
                     pc_status *st) {
    *st = PC_ERR_ARG;
    if (!psk || psk_len < 16 || psk_len > 64 || timeout_s <= 0) return NULL;
    *st = PC_ERR_NOMEM;
    pc_conn *c = pc_tcp_conn(fd, sockbuf_bytes); /* TCP_NODELAY, buffers, non-blocking */
    tls_impl *t = c ? calloc(1, sizeof *t) : NULL;
    if (!t) {
        if (c) c->fd = -1, c->ops->destroy(c); /* fd stays the caller's on failure */
        return NULL;
    }
    memcpy(t->psk, psk, (size_t)psk_len);
    t->psk_len = (size_t)psk_len;
    t->ctx = SSL_CTX_new(server ? TLS_server_method() : TLS_client_method());
    if (!t->ctx || !SSL_CTX_set_min_proto_version(t->ctx, TLS1_3_VERSION) ||
        !SSL_CTX_set_ciphersuites(t->ctx, "TLS_AES_128_GCM_SHA256"))
        goto fail;
    SSL_CTX_set_num_tickets(t->ctx, 0); /* no resumption: every conn proves the key afresh */
    SSL_CTX_set_mode(t->ctx, SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    /* read whole socket buffers, not a record header and then its body: half the syscalls.
     * Safe for the engine: recvv returns AGAIN only when the buffered bytes hold no whole
     * record and the socket is drained, so polling the fd then is right. */
    SSL_CTX_set_read_ahead(t->ctx, 1);
    SSL_CTX_set_default_read_buffer_len(t->ctx, 1 << 17);
    t->ssl = SSL_new(t->ctx);
    t->bio_method = t->ssl ? nosig_method() : NULL;
    BIO *bio = t->bio_method ? BIO_new(t->bio_method) : NULL;
    if (!bio) goto fail;
    BIO_set_fd(bio, fd, BIO_NOCLOSE);
    SSL_set_bio(t->ssl, bio, bio); /* ssl owns it now */
    SSL_set_app_data(t->ssl, t);
    if (server) {
        SSL_set_psk_find_session_callback(t->ssl, find_psk);
        SSL_set_accept_state(t->ssl);
    } else {
        SSL_set_psk_use_session_callback(t->ssl, use_psk);
        SSL_set_connect_state(t->ssl);
    }
    pc_conn *tc = c;
    tc->ops = &tls_ops;
    tc->impl = t;
    *st = handshake(tc, timeout_s);
    if (*st == PC_OK) return tc;
    tc->fd = -1; /* the caller keeps fd */
    tls_destroy(tc);
    return NULL;
fail:
    ERR_clear_error();
    tls_free(t);
    c->fd = -1;
    c->ops->destroy(c);
    return NULL;
}
