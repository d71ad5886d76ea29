/* C helpers of the overlaycache core: SIGBUS-guarded memory access and MurmurHash3 x64-128.
 *
 * Guarded access: a copy or hash that touches an mmap'd page whose file was truncated, or whose
 * device failed, raises SIGBUS. The handler jumps back to the guarded call, which then returns -1,
 * instead of killing the process. The jump target is a per-thread pointer that is set just before
 * the access and cleared after; it is volatile so the compiler cannot drop or move the stores around
 * the memcpy (it would otherwise see that memcpy cannot read it). With no target set, the handler
 * restores the previous disposition and re-raises, so unrelated SIGBUS still behaves as before.
 */
#ifndef OVERLAYCACHE_OC_H
#define OVERLAYCACHE_OC_H

#include <setjmp.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>

static __thread sigjmp_buf *volatile oc_jump_target = NULL;
static struct sigaction oc_previous_sigbus;

static volatile sig_atomic_t oc_reraised = 0;

static void oc_sigbus_handler(int sig, siginfo_t *info, void *context)
{
    sigjmp_buf *target = oc_jump_target;
    (void)info;
    (void)context;
    if (target != NULL) {
        oc_jump_target = NULL;
        siglongjmp(*target, 1);
    }
    if (oc_reraised) {
        /* The previous handler chained back to us: end the loop with the default action. */
        signal(SIGBUS, SIG_DFL);
    } else {
        oc_reraised = 1;
        sigaction(SIGBUS, &oc_previous_sigbus, NULL);
    }
    raise(sig);
}

/* Install the handler, or put it back in front when another one (faulthandler, say) was installed
 * after it; the displaced handler becomes the one we chain to. */
static int oc_install_sigbus_handler(void)
{
    struct sigaction action, current;
    if (sigaction(SIGBUS, NULL, &current) == 0 && (current.sa_flags & SA_SIGINFO) &&
        current.sa_sigaction == oc_sigbus_handler)
        return 0;
    memset(&action, 0, sizeof(action));
    action.sa_sigaction = oc_sigbus_handler;
    /* SA_NODEFER: SIGBUS stays unblocked after the jump, so sigsetjmp need not save the mask. */
    action.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&action.sa_mask);
    if (sigaction(SIGBUS, &action, &oc_previous_sigbus) != 0)
        return -1;
    return 0;
}

#define OC_BARRIER() __asm__ __volatile__("" ::: "memory")

/* memcpy that returns -1 instead of dying when a page of src or dst cannot be accessed. */
static int oc_guarded_copy(void *dst, const void *src, size_t n)
{
    sigjmp_buf target;
    if (sigsetjmp(target, 0)) {
        oc_jump_target = NULL;
        OC_BARRIER();
        return -1;
    }
    oc_jump_target = &target;
    OC_BARRIER();
    memcpy(dst, src, n);
    OC_BARRIER();
    oc_jump_target = NULL;
    return 0;
}

/* As oc_guarded_copy, then read one byte at probe (if not NULL) under the same guard: a file
   truncated inside the last page of the copied range reads as zeros there without a SIGBUS, but
   the page after it (probe) is then past the end of the file and faults. Returns 0, -1 (the copy
   faulted) or -2 (only the probe did: the caller checks the bytes another way). */
static int oc_guarded_copy_probe(void *dst, const void *src, size_t n, const void *probe)
{
    sigjmp_buf target;
    volatile int copied = 0;
    if (sigsetjmp(target, 0)) {
        oc_jump_target = NULL;
        OC_BARRIER();
        return copied ? -2 : -1;
    }
    oc_jump_target = &target;
    OC_BARRIER();
    memcpy(dst, src, n);
    OC_BARRIER();
    copied = 1;
    OC_BARRIER();
    if (probe != NULL)
        (void)*(const volatile unsigned char *)probe;
    OC_BARRIER();
    oc_jump_target = NULL;
    return 0;
}

/* ---- MurmurHash3 x64-128, seed 0, as in the mmh3 package's mmh3_x64_128_digest ---- */

static inline uint64_t oc_rotl64(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

static inline uint64_t oc_fmix64(uint64_t k)
{
    k ^= k >> 33;
    k *= 0xff51afd7ed558ccdULL;
    k ^= k >> 33;
    k *= 0xc4ceb9fe1a85ec53ULL;
    k ^= k >> 33;
    return k;
}

static void oc_mmh3_x64_128(const void *key, size_t len, unsigned char out[16])
{
    const uint8_t *data = (const uint8_t *)key;
    const size_t nblocks = len / 16;
    uint64_t h1 = 0, h2 = 0;
    const uint64_t c1 = 0x87c37b91114253d5ULL;
    const uint64_t c2 = 0x4cf5ad432745937fULL;
    size_t i;
    const uint8_t *tail;
    uint64_t k1 = 0, k2 = 0;

    for (i = 0; i < nblocks; i++) {
        uint64_t b1, b2;
        memcpy(&b1, data + i * 16, 8);
        memcpy(&b2, data + i * 16 + 8, 8);
        b1 *= c1; b1 = oc_rotl64(b1, 31); b1 *= c2; h1 ^= b1;
        h1 = oc_rotl64(h1, 27); h1 += h2; h1 = h1 * 5 + 0x52dce729;
        b2 *= c2; b2 = oc_rotl64(b2, 33); b2 *= c1; h2 ^= b2;
        h2 = oc_rotl64(h2, 31); h2 += h1; h2 = h2 * 5 + 0x38495ab5;
    }

    tail = data + nblocks * 16;
    switch (len & 15) {
    case 15: k2 ^= ((uint64_t)tail[14]) << 48; /* fall through */
    case 14: k2 ^= ((uint64_t)tail[13]) << 40; /* fall through */
    case 13: k2 ^= ((uint64_t)tail[12]) << 32; /* fall through */
    case 12: k2 ^= ((uint64_t)tail[11]) << 24; /* fall through */
    case 11: k2 ^= ((uint64_t)tail[10]) << 16; /* fall through */
    case 10: k2 ^= ((uint64_t)tail[9]) << 8;   /* fall through */
    case 9:
        k2 ^= ((uint64_t)tail[8]);
        k2 *= c2; k2 = oc_rotl64(k2, 33); k2 *= c1; h2 ^= k2;
        /* fall through */
    case 8: k1 ^= ((uint64_t)tail[7]) << 56; /* fall through */
    case 7: k1 ^= ((uint64_t)tail[6]) << 48; /* fall through */
    case 6: k1 ^= ((uint64_t)tail[5]) << 40; /* fall through */
    case 5: k1 ^= ((uint64_t)tail[4]) << 32; /* fall through */
    case 4: k1 ^= ((uint64_t)tail[3]) << 24; /* fall through */
    case 3: k1 ^= ((uint64_t)tail[2]) << 16; /* fall through */
    case 2: k1 ^= ((uint64_t)tail[1]) << 8;  /* fall through */
    case 1:
        k1 ^= ((uint64_t)tail[0]);
        k1 *= c1; k1 = oc_rotl64(k1, 31); k1 *= c2; h1 ^= k1;
    }

    h1 ^= (uint64_t)len;
    h2 ^= (uint64_t)len;
    h1 += h2;
    h2 += h1;
    h1 = oc_fmix64(h1);
    h2 = oc_fmix64(h2);
    h1 += h2;
    h2 += h1;
    memcpy(out, &h1, 8); /* little-endian machines only: checked at import */
    memcpy(out + 8, &h2, 8);
}

/* Hash that returns -1 instead of dying when a page of key cannot be accessed. */
static int oc_guarded_hash(const void *key, size_t len, unsigned char out[16])
{
    sigjmp_buf target;
    if (sigsetjmp(target, 0)) {
        oc_jump_target = NULL;
        OC_BARRIER();
        return -1;
    }
    oc_jump_target = &target;
    OC_BARRIER();
    oc_mmh3_x64_128(key, len, out);
    OC_BARRIER();
    oc_jump_target = NULL;
    return 0;
}

/* Byte-expansion table for resolve: bit i of the index selects byte i of the value. */
static uint64_t oc_expand8[256];

static void oc_init_tables(void)
{
    int v, b;
    for (v = 0; v < 256; v++) {
        uint64_t e = 0;
        for (b = 0; b < 8; b++)
            if (v & (1 << b))
                e |= (uint64_t)0xff << (8 * b);
        oc_expand8[v] = e;
    }
}

#endif
