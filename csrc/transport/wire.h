/*
 * wire.h - the frame header that precedes every payload on a connection.
 *
 * 32 bytes, little-endian:
 *   0  u32 magic    "PCOL"
 *   4  u16 version  PC_VERSION
 *   6  u16 kind     PC_FRAME_DATA, or PC_FRAME_REMOTE: the payload is then a
 *                   48-byte descriptor (u64 address, u64 len) of the bytes in
 *                   the sender's memory, for the receiver to copy itself
 *                   (same-host shared-memory connections only), then the
 *                   shared buffer they lie in (u64 registration, u64 fd,
 *                   u64 address, u64 len; all 0: none; core/shared_buffers.h)
 *   8  u32 tag      which piece of which step (planner-defined)
 *  12  u32 desc     digest of the collective's arguments
 *  16  u64 seq      collective sequence number on this comm
 *  24  u64 len      payload bytes that follow (REMOTE: bytes the descriptor names)
 * The receiver knows what it expects (its plan says peer, tag and length),
 * so a header is accepted only if every field equals that expectation; a
 * length off the wire is never used to size or place anything.
 */
#ifndef PYCOLL_WIRE_H
#define PYCOLL_WIRE_H

#include <stdint.h>

#define PC_MAGIC 0x4c4f4350u /* "PCOL" read as little-endian */
#define PC_FRAME_DATA 1
#define PC_FRAME_REMOTE 2
#define PC_REMOTE_DESC_BYTES 48
#define PC_HDR_BYTES 32

typedef struct {
    uint32_t magic;
    uint16_t version, kind;
    uint32_t tag, desc;
    uint64_t seq, len;
} pc_frame_hdr;

static inline void put_u16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); }
static inline void put_u32(uint8_t *p, uint32_t v) { for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i)); }
static inline void put_u64(uint8_t *p, uint64_t v) { for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i)); }
static inline uint16_t get_u16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }
static inline uint32_t get_u32(const uint8_t *p) {
    uint32_t v = 0;
    for (int i = 3; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}
static inline uint64_t get_u64(const uint8_t *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}

static inline void hdr_encode(uint8_t *p, const pc_frame_hdr *h) {
    put_u32(p, h->magic);
    put_u16(p + 4, h->version);
    put_u16(p + 6, h->kind);
    put_u32(p + 8, h->tag);
    put_u32(p + 12, h->desc);
    put_u64(p + 16, h->seq);
    put_u64(p + 24, h->len);
}

static inline void hdr_decode(const uint8_t *p, pc_frame_hdr *h) {
    h->magic = get_u32(p);
    h->version = get_u16(p + 4);
    h->kind = get_u16(p + 6);
    h->tag = get_u32(p + 8);
    h->desc = get_u32(p + 12);
    h->seq = get_u64(p + 16);
    h->len = get_u64(p + 24);
}

#endif
