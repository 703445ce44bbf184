// AES-256-GCM on the GPU, many messages per launch: CTR with shared-memory T-tables, GHASH by
// parallel Horner runs plus a reduction over levels, tag checks on the device.
//
// Compiled at run time by CuPy (NVRTC), so: extern "C" kernels, no host code, no #include. Every
// constant comes from pipellm_client/gpu/params.py as -D defines (GcmParams.cuda_defines()); the
// launch sequence and the batch table are pipellm_client/gpu/plan.py; pipellm_client/gpu/aesgcm_ref.py
// is a numpy mirror of each kernel below (same tables, same decomposition) that is checked against
// NIST vectors and `cryptography`.
//
// Batches. Every kernel works on a batch of n messages (n >= 1) described by a table in device
// memory (u32 words, built on the host by plan.Plan.table and uploaded before the first launch):
//   flags[n]          at 0: one per message, FLAG_BAD from the upload, FLAG_OK once its tag matched
//   descriptors       at PLM_TAB_MSGS(n) + m * PLM_MSG_WORDS: src, dst, nbytes (u64 each, as two
//                     words, low first), the three nonce words, then per GHASH level L: the front
//                     padding and where the level's partials go (uint4 index into `partials`)
//   block starts      at PLM_TAB_STARTS(n) + k * (n + 1), k = GHASH level or PLM_MAX_LEVELS for the
//                     CTR pass: the first CUDA block of each message in that launch (prefix sums)
// A CUDA block finds its message by binary search over its launch's starts and works on that
// message alone, exactly as the single-message decomposition would. Decrypting a batch is: GHASH
// level 0 over every message, the reduction levels (the final level of each message compares its
// tag and writes its flag), then one CTR launch that writes plaintext only if *every* flag of the
// batch is OK -- so a tag failure anywhere leaves every destination of the batch untouched.
// Encrypting is one fused CTR + GHASH launch plus the reduction levels (the final one writes the tag).
//
// Data layout
//   * 128-bit values live in registers as 4 big-endian words w[0..3] (w[0] = bytes 0..3). AES
//     state words are FIPS-197 columns; GHASH values use GCM's reflected bit order, the MSB of
//     w[0] being the coefficient of x^0.
//   * Message blocks are read/written as little-endian uint4 (one 16-byte access) and byte-swapped
//     in registers. Message buffers must be 16-byte aligned (the host checks); the tag and the
//     final partial block are accessed byte by byte.
//   * ctx (uint32 words, built by keyctx.build_context): T0, GHASH reduction table R, round keys,
//     then per GHASH level L a Shoup table of Q_L and one combine multiplier per thread.
//
// Shared-memory tables are laid out so that no access pattern causes bank conflicts: T0 is
// replicated 32 times (lane l always reads bank l) and the Shoup table 8 times (the 8 lanes of a
// quarter-warp that share a 128-bit LDS wavefront each read their own 4 banks). As a side effect
// the lookup timing does not depend on the (secret) indices.
//
// Counter blocks: J0 = nonce || 0x00000001; data block k (0-based) uses nonce || BE32(k + 2);
// the tag mask is E_K(J0).

#ifndef PLM_TPB
#error "compile with the -D options of pipellm_client.gpu.params.GcmParams.cuda_defines()"
#endif

typedef unsigned int u32;
typedef unsigned long long u64;

#define PLM_NWARPS (PLM_TPB / 32)
#define PLM_TREP_SHIFT 5  // T0 copies in shared memory: 1 << 5 = 32, one per lane
#define PLM_MREP_SHIFT 3  // Shoup-table copies in shared memory: 1 << 3 = 8
#define PLM_MREP (1 << PLM_MREP_SHIFT)
#define PLM_T_ENTRIES4 (256 * 32 / 4)  // replicated T0 as uint4: 2048

#if PLM_TPB % 32 != 0
#error "PLM_TPB must be a multiple of 32"
#endif
#if PLM_GH_RUN0 % PLM_ENC_GROUP != 0
#error "PLM_ENC_GROUP must divide PLM_GH_RUN0"
#endif
#if PLM_FLAG_BAD != 0u
#error "the flag arithmetic in plm_finalize assumes PLM_FLAG_BAD == 0"
#endif

// ------------------------------------------------------------------------------------------------
// Small helpers

__device__ __forceinline__ u32 plm_bswap(u32 x) { return __byte_perm(x, 0u, 0x0123u); }

__device__ __forceinline__ u32 plm_rotr(u32 x, u32 n) { return __funnelshift_r(x, x, n); }

// Bytes [4 * w, 4 * w + 4) of a little-endian word that lie below `tail` (0..15).
// Four-word (one AES block) helpers; inlined, so the arrays stay in registers.
__device__ __forceinline__ void plm_zero4(u32 w[4])
{
    w[0] = 0u;
    w[1] = 0u;
    w[2] = 0u;
    w[3] = 0u;
}

__device__ __forceinline__ void plm_set4(u32 w[4], uint4 q)
{
    w[0] = q.x;
    w[1] = q.y;
    w[2] = q.z;
    w[3] = q.w;
}

// GHASH absorbs a block: y ^= the block read big-endian.
__device__ __forceinline__ void plm_xor_bswap4(u32 y[4], const u32 c[4])
{
    y[0] ^= plm_bswap(c[0]);
    y[1] ^= plm_bswap(c[1]);
    y[2] ^= plm_bswap(c[2]);
    y[3] ^= plm_bswap(c[3]);
}

// The counter block of data block k: nonce || inc32 counter (J0 is counter 1, data starts at 2; wraps mod 2^32).
__device__ __forceinline__ void plm_ctr_block(u32 s[4], u32 nw0, u32 nw1, u32 nw2, u64 k)
{
    s[0] = nw0;
    s[1] = nw1;
    s[2] = nw2;
    s[3] = (u32)(k + 2ull);
}

__device__ __forceinline__ u32 plm_tail_mask(u32 tail, u32 w)
{
    const u32 lo = 4u * w;
    if (tail >= lo + 4u) return 0xffffffffu;
    if (tail <= lo) return 0u;
    return (1u << (8u * (tail - lo))) - 1u;
}

// Block k of a message of nfull whole blocks plus `tail` bytes, as 4 little-endian words; the
// partial last block is zero-padded.
__device__ __forceinline__ void plm_load_block(const unsigned char* p, u64 k, u64 nfull, u32 tail,
                                               u32 (&w)[4])
{
    if (k < nfull) {
        const uint4 q = reinterpret_cast<const uint4*>(p)[k];
        plm_set4(w, q);
    } else {
        plm_zero4(w);
        const unsigned char* b = p + 16ull * k;
#pragma unroll
        for (u32 i = 0; i < 16u; ++i) {
            if (i < tail) w[i >> 2] |= (u32)b[i] << (8u * (i & 3u));
        }
    }
}

// Store block k (same indexing as plm_load_block); only `tail` bytes of the partial last block.
__device__ __forceinline__ void plm_store_block(unsigned char* p, u64 k, u64 nfull, u32 tail,
                                                const u32 (&w)[4])
{
    if (k < nfull) {
        uint4 q;
        q.x = w[0];
        q.y = w[1];
        q.z = w[2];
        q.w = w[3];
        reinterpret_cast<uint4*>(p)[k] = q;
    } else {
        unsigned char* b = p + 16ull * k;
#pragma unroll
        for (u32 i = 0; i < 16u; ++i) {
            if (i < tail) b[i] = (unsigned char)(w[i >> 2] >> (8u * (i & 3u)));
        }
    }
}

// ------------------------------------------------------------------------------------------------
// AES-256 (encryption only), T-table form.
//
// tab: the lane's column of the replicated table (LSH = PLM_TREP_SHIFT) or the plain 256-word T0
// (LSH = 0). rk: 15 round keys as uint4. NB blocks are processed round by round together so their
// table loads overlap.

template <int LSH>
__device__ __forceinline__ u32 plm_t(const u32* tab, u32 i)
{
    return tab[i << LSH];
}

// Last-round word: S-box bytes taken from byte 2 of T0 entries (T0[x] = 2s|s|s|3s), assembled
// into (S(a), S(b), S(c), S(d)) from the top byte down.
__device__ __forceinline__ u32 plm_sbox_word(u32 ta, u32 tb, u32 tc, u32 td)
{
    const u32 hi = __byte_perm(ta, tb, 0x2600u);  // byte 3 = S(a), byte 2 = S(b)
    const u32 lo = __byte_perm(tc, td, 0x0015u);  // byte 1 = S(c), byte 0 = S(d)
    return __byte_perm(hi, lo, 0x3254u);
}

template <int NB, int LSH>
__device__ __forceinline__ void plm_aes256(const u32* tab, const uint4* rk, u32 (&s)[NB][4])
{
    {
        const uint4 k = rk[0];
#pragma unroll
        for (int b = 0; b < NB; ++b) {
            s[b][0] ^= k.x;
            s[b][1] ^= k.y;
            s[b][2] ^= k.z;
            s[b][3] ^= k.w;
        }
    }
#pragma unroll
    for (int r = 1; r < 14; ++r) {
        const uint4 k = rk[r];
#pragma unroll
        for (int b = 0; b < NB; ++b) {
            const u32 a0 = s[b][0], a1 = s[b][1], a2 = s[b][2], a3 = s[b][3];
            s[b][0] = plm_t<LSH>(tab, a0 >> 24) ^ plm_rotr(plm_t<LSH>(tab, (a1 >> 16) & 0xffu), 8u) ^
                      plm_rotr(plm_t<LSH>(tab, (a2 >> 8) & 0xffu), 16u) ^
                      plm_rotr(plm_t<LSH>(tab, a3 & 0xffu), 24u) ^ k.x;
            s[b][1] = plm_t<LSH>(tab, a1 >> 24) ^ plm_rotr(plm_t<LSH>(tab, (a2 >> 16) & 0xffu), 8u) ^
                      plm_rotr(plm_t<LSH>(tab, (a3 >> 8) & 0xffu), 16u) ^
                      plm_rotr(plm_t<LSH>(tab, a0 & 0xffu), 24u) ^ k.y;
            s[b][2] = plm_t<LSH>(tab, a2 >> 24) ^ plm_rotr(plm_t<LSH>(tab, (a3 >> 16) & 0xffu), 8u) ^
                      plm_rotr(plm_t<LSH>(tab, (a0 >> 8) & 0xffu), 16u) ^
                      plm_rotr(plm_t<LSH>(tab, a1 & 0xffu), 24u) ^ k.z;
            s[b][3] = plm_t<LSH>(tab, a3 >> 24) ^ plm_rotr(plm_t<LSH>(tab, (a0 >> 16) & 0xffu), 8u) ^
                      plm_rotr(plm_t<LSH>(tab, (a1 >> 8) & 0xffu), 16u) ^
                      plm_rotr(plm_t<LSH>(tab, a2 & 0xffu), 24u) ^ k.w;
        }
    }
    {
        const uint4 k = rk[14];
#pragma unroll
        for (int b = 0; b < NB; ++b) {
            const u32 a0 = s[b][0], a1 = s[b][1], a2 = s[b][2], a3 = s[b][3];
            s[b][0] = plm_sbox_word(plm_t<LSH>(tab, a0 >> 24), plm_t<LSH>(tab, (a1 >> 16) & 0xffu),
                                    plm_t<LSH>(tab, (a2 >> 8) & 0xffu), plm_t<LSH>(tab, a3 & 0xffu)) ^
                      k.x;
            s[b][1] = plm_sbox_word(plm_t<LSH>(tab, a1 >> 24), plm_t<LSH>(tab, (a2 >> 16) & 0xffu),
                                    plm_t<LSH>(tab, (a3 >> 8) & 0xffu), plm_t<LSH>(tab, a0 & 0xffu)) ^
                      k.y;
            s[b][2] = plm_sbox_word(plm_t<LSH>(tab, a2 >> 24), plm_t<LSH>(tab, (a3 >> 16) & 0xffu),
                                    plm_t<LSH>(tab, (a0 >> 8) & 0xffu), plm_t<LSH>(tab, a1 & 0xffu)) ^
                      k.z;
            s[b][3] = plm_sbox_word(plm_t<LSH>(tab, a3 >> 24), plm_t<LSH>(tab, (a0 >> 16) & 0xffu),
                                    plm_t<LSH>(tab, (a1 >> 8) & 0xffu), plm_t<LSH>(tab, a2 & 0xffu)) ^
                      k.w;
        }
    }
}

// T0 replicated 32 times (entry e, copy c at word 32 * e + c) and the round keys, into shared.
__device__ __forceinline__ void plm_load_aes_tables(const u32* __restrict__ ctx, uint4* sT4,
                                                    uint4* sRK)
{
    for (u32 u = threadIdx.x; u < (u32)PLM_T_ENTRIES4; u += PLM_TPB) {
        const u32 e = ctx[PLM_CTX_T0 + (u >> 3)];
        uint4 q;
        q.x = e;
        q.y = e;
        q.z = e;
        q.w = e;
        sT4[u] = q;
    }
    const uint4* rk = reinterpret_cast<const uint4*>(ctx + PLM_CTX_RK);
    for (u32 u = threadIdx.x; u < 15u; u += PLM_TPB) sRK[u] = rk[u];
}

// E_K(J0) from global memory (one thread of the final GHASH level; out of line, it is cold).
__device__ __noinline__ uint4 plm_aes_j0(const u32* __restrict__ ctx, u32 nw0, u32 nw1, u32 nw2)
{
    u32 s[1][4];
    s[0][0] = nw0;
    s[0][1] = nw1;
    s[0][2] = nw2;
    s[0][3] = 1u;
    plm_aes256<1, 0>(ctx + PLM_CTX_T0, reinterpret_cast<const uint4*>(ctx + PLM_CTX_RK), s);
    uint4 ek;
    ek.x = s[0][0];
    ek.y = s[0][1];
    ek.z = s[0][2];
    ek.w = s[0][3];
    return ek;
}

// E_K(J0) for the thread that finishes the tag (it XORs this into GHASH), zero for every other thread.
__device__ __forceinline__ uint4 plm_tag_mask(const u32* __restrict__ ctx, bool finisher, u32 nw0, u32 nw1, u32 nw2)
{
    uint4 ek;
    ek.x = 0u;
    ek.y = 0u;
    ek.z = 0u;
    ek.w = 0u;
    if (finisher) ek = plm_aes_j0(ctx, nw0, nw1, nw2);
    return ek;
}

// ------------------------------------------------------------------------------------------------
// GF(2^128)

// z = z * Q with Q's Shoup 4-bit table: entry n at M[n << RSH] (M already offset to this thread's
// replica); R: reduction table. Nibbles of z are consumed from the low end of w[3] up to the top
// of w[0] (mbedTLS gcm_mult order).
template <int RSH>
__device__ __forceinline__ void plm_gf_mul_shoup(u32 (&z)[4], const uint4* M, const u32* R)
{
    const u32 x0 = z[0], x1 = z[1], x2 = z[2], x3 = z[3];
    u32 a0 = 0u, a1 = 0u, a2 = 0u, a3 = 0u;
#pragma unroll
    for (int w = 3; w >= 0; --w) {
        const u32 xw = (w == 3) ? x3 : (w == 2) ? x2 : (w == 1) ? x1 : x0;
#pragma unroll
        for (u32 sh = 0; sh < 32u; sh += 4u) {
            const u32 rem = a3 & 0xfu;
            a3 = __funnelshift_r(a3, a2, 4u);
            a2 = __funnelshift_r(a2, a1, 4u);
            a1 = __funnelshift_r(a1, a0, 4u);
            a0 = (a0 >> 4) ^ R[rem];
            const uint4 e = M[((xw >> sh) & 0xfu) << RSH];
            a0 ^= e.x;
            a1 ^= e.y;
            a2 ^= e.z;
            a3 ^= e.w;
        }
    }
    z[0] = a0;
    z[1] = a1;
    z[2] = a2;
    z[3] = a3;
}

// z * P, bit by bit (SP 800-38D Algorithm 1), where e[c] = P * x^(32 c): word c of z drives its
// own chain, so the four 32-step chains are independent (latency / 4). Out of line: it runs once
// per thread and is shared by three kernels (compile time); by-value arguments stay in registers.
__device__ __noinline__ uint4 plm_gf_mul_pw(uint4 zin, const uint4* e)
{
    const u32 z[4] = {zin.x, zin.y, zin.z, zin.w};
    u32 v[4][4];
    u32 acc[4][4];
#pragma unroll
    for (int c = 0; c < 4; ++c) {
        const uint4 q = e[c];
        plm_set4(v[c], q);
        plm_zero4(acc[c]);
    }
#pragma unroll
    for (u32 j = 0; j < 32u; ++j) {
#pragma unroll
        for (int c = 0; c < 4; ++c) {
            const u32 m = 0u - ((z[c] >> (31u - j)) & 1u);
            acc[c][0] ^= v[c][0] & m;
            acc[c][1] ^= v[c][1] & m;
            acc[c][2] ^= v[c][2] & m;
            acc[c][3] ^= v[c][3] & m;
            const u32 carry = 0u - (v[c][3] & 1u);
            v[c][3] = __funnelshift_r(v[c][3], v[c][2], 1u);
            v[c][2] = __funnelshift_r(v[c][2], v[c][1], 1u);
            v[c][1] = __funnelshift_r(v[c][1], v[c][0], 1u);
            v[c][0] = (v[c][0] >> 1) ^ (carry & 0xE1000000u);
        }
    }
    uint4 out;
    out.x = acc[0][0] ^ acc[1][0] ^ acc[2][0] ^ acc[3][0];
    out.y = acc[0][1] ^ acc[1][1] ^ acc[2][1] ^ acc[3][1];
    out.z = acc[0][2] ^ acc[1][2] ^ acc[2][2] ^ acc[3][2];
    out.w = acc[0][3] ^ acc[1][3] ^ acc[2][3] ^ acc[3][3];
    return out;
}

// ------------------------------------------------------------------------------------------------
// GHASH levels

// Level L's Shoup table (8 copies) and the reduction table, into shared.
__device__ __forceinline__ void plm_load_ghash_tables(const u32* __restrict__ ctx, u32 level,
                                                      uint4* sM, u32* sR)
{
    const uint4* gM =
        reinterpret_cast<const uint4*>(ctx + PLM_CTX_SHOUP + PLM_SHOUP_WORDS * level);
    for (u32 u = threadIdx.x; u < 16u * PLM_MREP; u += PLM_TPB) sM[u] = gM[u >> PLM_MREP_SHIFT];
    for (u32 u = threadIdx.x; u < 16u; u += PLM_TPB) sR[u] = ctx[PLM_CTX_R + u];
}

// XOR of y over the CUDA block, valid in thread 0 afterwards. Every thread must call it.
__device__ __forceinline__ void plm_block_xor(u32 (&y)[4], uint4* sRed)
{
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        y[0] ^= __shfl_xor_sync(0xffffffffu, y[0], off);
        y[1] ^= __shfl_xor_sync(0xffffffffu, y[1], off);
        y[2] ^= __shfl_xor_sync(0xffffffffu, y[2], off);
        y[3] ^= __shfl_xor_sync(0xffffffffu, y[3], off);
    }
    if ((threadIdx.x & 31u) == 0u) {
        uint4 q;
        q.x = y[0];
        q.y = y[1];
        q.z = y[2];
        q.w = y[3];
        sRed[threadIdx.x >> 5] = q;
    }
    __syncthreads();
    if (threadIdx.x == 0u) {
#pragma unroll
        for (int w = 1; w < PLM_NWARPS; ++w) {
            const uint4 q = sRed[w];
            y[0] ^= q.x;
            y[1] ^= q.y;
            y[2] ^= q.z;
            y[3] ^= q.w;
        }
    }
}

// Thread 0 of the single block of the final level: z = sum_k C_k H^(n-1-k) over the message.
// S = ((z * H) ^ len_block) * H is GHASH(C) with no AAD; tag = S ^ E_K(J0). Encrypt: write the
// tag. Decrypt: compare it with the received one in constant time and write the flag. Out of line
// (cold, one thread per message).
__device__ __noinline__ void plm_finalize(const u32* __restrict__ ctx, uint4 zin, u64 msg_len,
                                          uint4 ekin, unsigned char* tag, u32* flag, u32 mode)
{
    const uint4* M = reinterpret_cast<const uint4*>(ctx + PLM_CTX_SHOUP);  // level 0: Q_0 = H
    const u32* R = ctx + PLM_CTX_R;
    u32 z[4] = {zin.x, zin.y, zin.z, zin.w};
    const u32 ek[4] = {ekin.x, ekin.y, ekin.z, ekin.w};
    plm_gf_mul_shoup<0>(z, M, R);
    const u64 bits = msg_len * 8ull;  // length block: [len(A) = 0]_64 || [8 len(C)]_64
    z[2] ^= (u32)(bits >> 32);
    z[3] ^= (u32)bits;
    plm_gf_mul_shoup<0>(z, M, R);
    u32 diff = 0u;
#pragma unroll
    for (u32 i = 0; i < 16u; ++i) {
        const u32 byte = ((z[i >> 2] ^ ek[i >> 2]) >> (24u - 8u * (i & 3u))) & 0xffu;
        if (mode == PLM_MODE_ENCRYPT) {
            tag[i] = (unsigned char)byte;
        } else {
            diff |= byte ^ (u32)tag[i];
        }
    }
    if (mode == PLM_MODE_DECRYPT) {
        const u32 ok = (diff - 1u) >> 31;  // 1 iff diff == 0, without a branch
        *flag = PLM_FLAG_OK & (0u - ok);
    }
}

// Combine this thread's run (times its multiplier), reduce over the block, then either store the
// block's partial at `out` or, in the message's final level, finish its tag.
__device__ __forceinline__ void plm_ghash_block_end(const u32* __restrict__ ctx, u32 level,
                                                    u32 (&y)[4], uint4* sRed, bool final,
                                                    uint4* out, u64 msg_len, uint4 ek,
                                                    unsigned char* tag, u32* flag, u32 mode)
{
    const uint4* pw = reinterpret_cast<const uint4*>(ctx + PLM_CTX_PW + PLM_PW_LEVEL_WORDS * level +
                                                     PLM_PW_ENTRY_WORDS * threadIdx.x);
    uint4 q;
    q.x = y[0];
    q.y = y[1];
    q.z = y[2];
    q.w = y[3];
    q = plm_gf_mul_pw(q, pw);
    plm_set4(y, q);
    plm_block_xor(y, sRed);
    if (threadIdx.x == 0u) {
        q.x = y[0];
        q.y = y[1];
        q.z = y[2];
        q.w = y[3];
        if (final) {
            plm_finalize(ctx, q, msg_len, ek, tag, flag, mode);
        } else {
            *out = q;
        }
    }
}

// ------------------------------------------------------------------------------------------------
// The batch table (layout at the top of this file; plan.py builds it)

__device__ __forceinline__ u64 plm_u64(const u32* p) { return (u64)p[0] | ((u64)p[1] << 32); }

__device__ __forceinline__ u32 plm_tab_msgs(u32 n) { return (n + 3u) & ~3u; }

__device__ __forceinline__ u32 plm_tab_starts(u32 n) { return plm_tab_msgs(n) + n * PLM_MSG_WORDS; }

// The message whose range of blocks holds block b: the last m < n with starts[m] <= b (messages
// with no block in this launch have empty ranges and are never chosen).
__device__ __forceinline__ u32 plm_find(const u32* starts, u32 n, u32 b)
{
    u32 lo = 0u;
    u32 hi = n;
    while (hi - lo > 1u) {
        const u32 mid = (lo + hi) >> 1;
        if (starts[mid] <= b) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    return lo;
}

__device__ __forceinline__ unsigned char* plm_msg_src(const u32* d)
{
    return reinterpret_cast<unsigned char*>(plm_u64(d + PLM_MSG_SRC));
}

__device__ __forceinline__ unsigned char* plm_msg_dst(const u32* d)
{
    return reinterpret_cast<unsigned char*>(plm_u64(d + PLM_MSG_DST));
}

__device__ __forceinline__ u32 plm_level_pad(const u32* d, u32 level)
{
    return d[PLM_MSG_LEVELS + 2u * level];
}

__device__ __forceinline__ u32 plm_level_part(const u32* d, u32 level)
{
    return d[PLM_MSG_LEVELS + 2u * level + 1u];
}

// What one CUDA block needs to know about its message in one launch.
struct plm_job {
    u32 m;         // message index in the batch
    u32 lb;        // this block's index among the message's blocks
    u32 grid;      // the message's blocks in this launch
    u32 prev;      // the message's blocks in the previous GHASH level (its items here)
    const u32* d;  // the message's descriptor
    u64 nbytes;    // the message's length (plaintext = ciphertext without the tag)
    u64 nfull;     // its whole 16-byte blocks
    u32 tail;      // and the bytes after them (0..15)
    u32 nw0, nw1, nw2;  // its nonce, as the descriptor's three words
    u64 pad;       // zero blocks in front of its items at this GHASH level (0 past the last level)
    bool final;    // one block of this launch holds the whole message: it finishes the tag here
};

__device__ __forceinline__ plm_job plm_job_of(const u32* tab, u32 n, u32 k)
{
    const u32* starts = tab + plm_tab_starts(n) + k * (n + 1u);
    plm_job j;
    j.m = plm_find(starts, n, blockIdx.x);
    j.lb = blockIdx.x - starts[j.m];
    j.grid = starts[j.m + 1u] - starts[j.m];
    j.prev = 0u;
    if (k >= 1u && k < (u32)PLM_MAX_LEVELS) {
        const u32* before = starts - (n + 1u);
        j.prev = before[j.m + 1u] - before[j.m];
    }
    j.d = tab + plm_tab_msgs(n) + j.m * PLM_MSG_WORDS;
    j.nbytes = plm_u64(j.d + PLM_MSG_NBYTES);
    j.nfull = j.nbytes >> 4;
    j.tail = (u32)(j.nbytes & 15ull);
    j.nw0 = j.d[PLM_MSG_NONCE];
    j.nw1 = j.d[PLM_MSG_NONCE + 1u];
    j.nw2 = j.d[PLM_MSG_NONCE + 2u];
    j.pad = k < (u32)PLM_MAX_LEVELS ? plm_level_pad(j.d, k) : 0ull;
    j.final = j.grid == 1u;
    return j;
}

// The tag mask E_K(J0), computed by the thread that will finish the message's tag, zero elsewhere.
__device__ __forceinline__ uint4 plm_job_tag_mask(const u32* __restrict__ ctx, const plm_job& job, u32 tid)
{
    return plm_tag_mask(ctx, job.final && tid == 0u, job.nw0, job.nw1, job.nw2);
}

// ------------------------------------------------------------------------------------------------
// Kernels

// GHASH level 0 over each message's ciphertext (decrypt). A message's ciphertext is front-padded
// with `pad` zero blocks to grid * TPB * RUN0 blocks; its thread g folds virtual blocks
// [g RUN0, (g+1) RUN0). A message whose level 0 is one block finishes here: its tag is compared
// and its flag written.
// (At least 1024 resident threads per SM, i.e. <= 64 registers: the batch lookup must not cost occupancy.)
extern "C" __global__ void __launch_bounds__(PLM_TPB, PLM_GHASH_MIN_BLOCKS)
    plm_gcm_ghash_ct(const u32* __restrict__ ctx, u32* tab, u32 n, uint4* partials)
{
    __shared__ uint4 sM[16 * PLM_MREP];
    __shared__ u32 sR[16];
    __shared__ uint4 sRed[PLM_NWARPS];
    const u32 tid = threadIdx.x;
    const plm_job job = plm_job_of(tab, n, 0u);
    const unsigned char* ct = plm_msg_src(job.d);
    plm_load_ghash_tables(ctx, 0u, sM, sR);
    const uint4 ek = plm_job_tag_mask(ctx, job, tid);
    __syncthreads();

    const u64 v0 = ((u64)job.lb * PLM_TPB + tid) * PLM_GH_RUN0;
    u32 blk[PLM_GH_RUN0][4];
#pragma unroll
    for (int j = 0; j < PLM_GH_RUN0; ++j) {
        const u64 v = v0 + (u64)j;
        plm_zero4(blk[j]);
        if (v >= job.pad) plm_load_block(ct, v - job.pad, job.nfull, job.tail, blk[j]);
    }
    const uint4* M = sM + (tid & (PLM_MREP - 1u));
    u32 y[4] = {0u, 0u, 0u, 0u};
#pragma unroll
    for (int j = 0; j < PLM_GH_RUN0; ++j) {
        plm_gf_mul_shoup<PLM_MREP_SHIFT>(y, M, sR);
        plm_xor_bswap4(y, blk[j]);
    }
    plm_ghash_block_end(ctx, 0u, y, sRed, job.final, partials + plm_level_part(job.d, 0u) + job.lb,
                        job.nbytes, ek, plm_msg_src(job.d) + job.nbytes, tab + job.m, PLM_MODE_DECRYPT);
}

// GHASH level >= 1: each message with this level folds its previous level's partials, front-padded
// with `pad` zero items; same structure as level 0 with Q_level. Messages whose tree ended at an
// earlier level have no block here. The final level decrypts: compare the tag, write the flag;
// encrypts: write the tag after the ciphertext.
extern "C" __global__ void __launch_bounds__(PLM_TPB)
    plm_gcm_ghash_reduce(const u32* __restrict__ ctx, u32* tab, u32 n, uint4* partials, u32 level,
                         u32 mode)
{
    __shared__ uint4 sM[16 * PLM_MREP];
    __shared__ u32 sR[16];
    __shared__ uint4 sRed[PLM_NWARPS];
    const u32 tid = threadIdx.x;
    const plm_job job = plm_job_of(tab, n, level);
    const u64 n_items = job.prev;
    const uint4* items = partials + plm_level_part(job.d, level - 1u);
    plm_load_ghash_tables(ctx, level, sM, sR);
    const uint4 ek = plm_job_tag_mask(ctx, job, tid);
    __syncthreads();

    const u64 v0 = ((u64)job.lb * PLM_TPB + tid) * PLM_GH_RUN;
    u32 it[PLM_GH_RUN][4];
#pragma unroll
    for (int j = 0; j < PLM_GH_RUN; ++j) {
        const u64 v = v0 + (u64)j;
        plm_zero4(it[j]);
        if (v >= job.pad && v - job.pad < n_items) {
            const uint4 q = items[v - job.pad];
            plm_set4(it[j], q);
        }
    }
    const uint4* M = sM + (tid & (PLM_MREP - 1u));
    u32 y[4] = {0u, 0u, 0u, 0u};
#pragma unroll
    for (int j = 0; j < PLM_GH_RUN; ++j) {
        plm_gf_mul_shoup<PLM_MREP_SHIFT>(y, M, sR);
        y[0] ^= it[j][0];
        y[1] ^= it[j][1];
        y[2] ^= it[j][2];
        y[3] ^= it[j][3];
    }
    unsigned char* tag =
        (mode == PLM_MODE_ENCRYPT ? plm_msg_dst(job.d) : plm_msg_src(job.d)) + job.nbytes;
    plm_ghash_block_end(ctx, level, y, sRed, job.final,
                        partials + plm_level_part(job.d, level) + job.lb, job.nbytes, ek, tag,
                        tab + job.m, mode);
}

// Decrypt CTR pass, run after every tag check of the batch in the same stream: each thread
// decrypts CTR_BPT consecutive blocks of one message. Unless the flag of every message in the
// batch is OK, every block returns before touching any destination, so no destination of the
// batch is written and none ever holds unauthenticated plaintext. Messages that are only verified
// (DISCARD) have no block here. ct == pt (in place) is fine: a thread loads all its blocks before
// it stores any.
extern "C" __global__ void __launch_bounds__(PLM_TPB)
    plm_gcm_ctr_decrypt(const u32* __restrict__ ctx, const u32* __restrict__ tab, u32 n)
{
    __shared__ uint4 sT4[PLM_T_ENTRIES4];
    __shared__ uint4 sRK[15];
    u32 bad = 0u;
    for (u32 i = threadIdx.x; i < n; i += PLM_TPB) bad |= tab[i] != PLM_FLAG_OK ? 1u : 0u;
    if (__syncthreads_or((int)bad) != 0) return;  // uniform across the block and the grid
    const plm_job job = plm_job_of(tab, n, (u32)PLM_MAX_LEVELS);
    const unsigned char* ct = plm_msg_src(job.d);
    unsigned char* pt = plm_msg_dst(job.d);
    plm_load_aes_tables(ctx, sT4, sRK);
    __syncthreads();

    const u64 nblk = job.nfull + (job.tail != 0u ? 1ull : 0ull);
    const u64 first = ((u64)job.lb * PLM_TPB + threadIdx.x) * PLM_CTR_BPT;
    if (first >= nblk) return;
    const u32* tabT = reinterpret_cast<const u32*>(sT4) + (threadIdx.x & 31u);
    u32 s[PLM_CTR_BPT][4];
    u32 d[PLM_CTR_BPT][4];
#pragma unroll
    for (int j = 0; j < PLM_CTR_BPT; ++j) {
        const u64 k = first + (u64)j;
        plm_zero4(d[j]);
        if (k < nblk) plm_load_block(ct, k, job.nfull, job.tail, d[j]);
        plm_ctr_block(s[j], job.nw0, job.nw1, job.nw2, k);
    }
    plm_aes256<PLM_CTR_BPT, PLM_TREP_SHIFT>(tabT, sRK, s);
#pragma unroll
    for (int j = 0; j < PLM_CTR_BPT; ++j) {
        const u64 k = first + (u64)j;
        if (k < nblk) {
            u32 c[4];
            c[0] = d[j][0] ^ plm_bswap(s[j][0]);
            c[1] = d[j][1] ^ plm_bswap(s[j][1]);
            c[2] = d[j][2] ^ plm_bswap(s[j][2]);
            c[3] = d[j][3] ^ plm_bswap(s[j][3]);
            plm_store_block(pt, k, job.nfull, job.tail, c);
        }
    }
}

// Encrypt, fused: CTR over the thread's GHASH run of one message (same front-padded decomposition
// as plm_gcm_ghash_ct), writing the ciphertext and folding it into GHASH level 0 in registers. The
// message's final GHASH level writes the tag right after its ciphertext. pt == out (in place) is
// fine.
extern "C" __global__ void __launch_bounds__(PLM_TPB)
    plm_gcm_encrypt(const u32* __restrict__ ctx, const u32* __restrict__ tab, u32 n,
                    uint4* partials)
{
    __shared__ uint4 sT4[PLM_T_ENTRIES4];
    __shared__ uint4 sRK[15];
    __shared__ uint4 sM[16 * PLM_MREP];
    __shared__ u32 sR[16];
    __shared__ uint4 sRed[PLM_NWARPS];
    const u32 tid = threadIdx.x;
    const plm_job job = plm_job_of(tab, n, 0u);
    const unsigned char* pt = plm_msg_src(job.d);
    unsigned char* out = plm_msg_dst(job.d);
    plm_load_aes_tables(ctx, sT4, sRK);
    plm_load_ghash_tables(ctx, 0u, sM, sR);
    const uint4 ek = plm_job_tag_mask(ctx, job, tid);
    __syncthreads();

    const u64 v0 = ((u64)job.lb * PLM_TPB + tid) * PLM_GH_RUN0;
    const u32* tabT = reinterpret_cast<const u32*>(sT4) + (tid & 31u);
    const uint4* M = sM + (tid & (PLM_MREP - 1u));
    u32 y[4] = {0u, 0u, 0u, 0u};
#pragma unroll
    for (int g = 0; g < PLM_GH_RUN0 / PLM_ENC_GROUP; ++g) {
        u32 s[PLM_ENC_GROUP][4];
        u32 d[PLM_ENC_GROUP][4];
#pragma unroll
        for (int b = 0; b < PLM_ENC_GROUP; ++b) {
            const u64 v = v0 + (u64)(g * PLM_ENC_GROUP + b);
            const u64 k = v - job.pad;  // real block index when v >= pad
            plm_zero4(d[b]);
            if (v >= job.pad) plm_load_block(pt, k, job.nfull, job.tail, d[b]);
            plm_ctr_block(s[b], job.nw0, job.nw1, job.nw2, k);
        }
        plm_aes256<PLM_ENC_GROUP, PLM_TREP_SHIFT>(tabT, sRK, s);
#pragma unroll
        for (int b = 0; b < PLM_ENC_GROUP; ++b) {
            const u64 v = v0 + (u64)(g * PLM_ENC_GROUP + b);
            u32 c[4] = {0u, 0u, 0u, 0u};
            if (v >= job.pad) {
                const u64 k = v - job.pad;
                c[0] = d[b][0] ^ plm_bswap(s[b][0]);
                c[1] = d[b][1] ^ plm_bswap(s[b][1]);
                c[2] = d[b][2] ^ plm_bswap(s[b][2]);
                c[3] = d[b][3] ^ plm_bswap(s[b][3]);
                plm_store_block(out, k, job.nfull, job.tail, c);
                if (k >= job.nfull) {  // partial last block: GHASH sees it zero-padded
                    c[0] &= plm_tail_mask(job.tail, 0u);
                    c[1] &= plm_tail_mask(job.tail, 1u);
                    c[2] &= plm_tail_mask(job.tail, 2u);
                    c[3] &= plm_tail_mask(job.tail, 3u);
                }
            }
            plm_gf_mul_shoup<PLM_MREP_SHIFT>(y, M, sR);
            plm_xor_bswap4(y, c);
        }
    }
    plm_ghash_block_end(ctx, 0u, y, sRed, job.final, partials + plm_level_part(job.d, 0u) + job.lb,
                        job.nbytes, ek, out + job.nbytes, nullptr, PLM_MODE_ENCRYPT);
}
