// Test-only: lets aesgcm.cu compile as host C++ so its kernels run on the CPU.
//
// Each CUDA block runs as PLM_TPB OS threads (harness.cpp); __syncthreads is a std::barrier, __syncthreads_or a barrier-fenced OR, and
// __shfl_xor_sync exchanges through a per-block array between two barriers, so kernels that call
// them uniformly (as aesgcm.cu does) behave as on the GPU. __shared__ variables become function
// statics, which is correct because blocks run one after another. The intrinsics are bit-exact
// re-implementations of the CUDA ones.
#pragma once

// Standard headers first: the macros below would break libstdc++'s own attributes.
#include <barrier>
#include <cstdint>

#define __global__
#define __device__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __shared__ static
#define __launch_bounds__(...)

struct emu_dim3 {
    unsigned x, y, z;
};

struct alignas(16) uint4 {
    unsigned x, y, z, w;
};

extern thread_local emu_dim3 threadIdx;
extern thread_local emu_dim3 blockIdx;
extern emu_dim3 gridDim;
extern emu_dim3 blockDim;

void emu_syncthreads();
int emu_syncthreads_or(int predicate);
unsigned emu_shfl_xor(unsigned v, int lane_mask);

inline void __syncthreads() { emu_syncthreads(); }

// Non-zero in every thread iff the predicate is non-zero in any thread of the block.
inline int __syncthreads_or(int predicate) { return emu_syncthreads_or(predicate); }

inline unsigned __shfl_xor_sync(unsigned mask, unsigned v, int lane_mask)
{
    (void)mask;
    return emu_shfl_xor(v, lane_mask);
}

// Result byte n is byte (s >> 4n) & 7 of the 8-byte value y:x.
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s)
{
    const std::uint64_t v = ((std::uint64_t)y << 32) | x;
    unsigned r = 0;
    for (int n = 0; n < 4; ++n) {
        const unsigned sel = (s >> (4 * n)) & 7u;
        r |= (unsigned)((v >> (8 * sel)) & 0xffu) << (8 * n);
    }
    return r;
}

// Low 32 bits of (hi:lo) >> (shift & 31).
inline unsigned __funnelshift_r(unsigned lo, unsigned hi, unsigned shift)
{
    const std::uint64_t v = ((std::uint64_t)hi << 32) | lo;
    return (unsigned)(v >> (shift & 31u));
}
