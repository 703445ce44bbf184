// Test-only launcher for aesgcm.cu compiled as host C++ (see cuda_emu.h): runs a 1-D grid block
// by block, each block as PLM_TPB threads. Called from Python through ctypes with the kernel's
// arguments as an array of 64-bit values (pointers are host addresses).
#include "cuda_emu.h"

#include <atomic>
#include <string>
#include <thread>
#include <vector>

typedef unsigned int u32;
typedef unsigned long long u64;

thread_local emu_dim3 threadIdx;
thread_local emu_dim3 blockIdx;
emu_dim3 gridDim;
emu_dim3 blockDim;

static std::barrier<>* g_bar = nullptr;
static unsigned g_xchg[1024];

void emu_syncthreads() { g_bar->arrive_and_wait(); }

static std::atomic<int> g_or{0};

int emu_syncthreads_or(int predicate)
{
    g_bar->arrive_and_wait();  // everyone has read the previous result
    if (threadIdx.x == 0u) g_or.store(0);
    g_bar->arrive_and_wait();
    if (predicate != 0) g_or.store(1);
    g_bar->arrive_and_wait();
    return g_or.load();
}

unsigned emu_shfl_xor(unsigned v, int lane_mask)
{
    g_bar->arrive_and_wait();  // everyone has read the previous exchange
    g_xchg[threadIdx.x] = v;
    g_bar->arrive_and_wait();
    return g_xchg[threadIdx.x ^ (unsigned)lane_mask];
}

extern "C" {
void plm_gcm_ghash_ct(const u32*, u32*, u32, uint4*);
void plm_gcm_ghash_reduce(const u32*, u32*, u32, uint4*, u32, u32);
void plm_gcm_ctr_decrypt(const u32*, const u32*, u32);
void plm_gcm_encrypt(const u32*, const u32*, u32, uint4*);
}

template <class F>
static void run_grid(unsigned grid, F f)
{
    gridDim = {grid, 1u, 1u};
    blockDim = {(unsigned)PLM_TPB, 1u, 1u};
    for (unsigned b = 0; b < grid; ++b) {
        std::barrier<> bar(PLM_TPB);
        g_bar = &bar;
        std::vector<std::thread> threads;
        threads.reserve(PLM_TPB);
        for (unsigned t = 0; t < (unsigned)PLM_TPB; ++t) {
            threads.emplace_back([t, b, &bar, &f] {
                threadIdx = {t, 0u, 0u};
                blockIdx = {b, 0u, 0u};
                f();
                bar.arrive_and_drop();  // an exited thread no longer holds up barriers (as on GPU)
            });
        }
        for (auto& th : threads) th.join();
        g_bar = nullptr;
    }
}

template <class T>
static T P(u64 v)
{
    return reinterpret_cast<T>(static_cast<std::uintptr_t>(v));
}

extern "C" int emu_launch(const char* name, unsigned grid, const u64* args, int nargs)
{
    std::vector<u64> a(args, args + nargs);
    const std::string k(name);
    if (k == "plm_gcm_ghash_ct" && nargs == 4) {
        run_grid(grid, [&a] {
            plm_gcm_ghash_ct(P<const u32*>(a[0]), P<u32*>(a[1]), (u32)a[2], P<uint4*>(a[3]));
        });
    } else if (k == "plm_gcm_ghash_reduce" && nargs == 6) {
        run_grid(grid, [&a] {
            plm_gcm_ghash_reduce(P<const u32*>(a[0]), P<u32*>(a[1]), (u32)a[2], P<uint4*>(a[3]),
                                 (u32)a[4], (u32)a[5]);
        });
    } else if (k == "plm_gcm_ctr_decrypt" && nargs == 3) {
        run_grid(grid, [&a] {
            plm_gcm_ctr_decrypt(P<const u32*>(a[0]), P<const u32*>(a[1]), (u32)a[2]);
        });
    } else if (k == "plm_gcm_encrypt" && nargs == 4) {
        run_grid(grid, [&a] {
            plm_gcm_encrypt(P<const u32*>(a[0]), P<const u32*>(a[1]), (u32)a[2], P<uint4*>(a[3]));
        });
    } else {
        return -1;
    }
    return 0;
}
