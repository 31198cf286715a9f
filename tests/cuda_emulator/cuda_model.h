/* cuda_model.h: the CUDA execution model on the CPU, for the CUDA emulator (tests/cuda_emulator).

What this is
------------
The emulator's RawModule compiles the text of this header, followed by the very source that
minunet/cuda.py hands to NVRTC (common.cuh + a family's .cu), followed by one generated
`extern "C"` launcher per name expression, into a shared library with the host g++. This
header supplies everything the kernels use that is not C++: the CUDA keywords, the built-in
variables (threadIdx, blockIdx, blockDim, gridDim), __syncthreads, the warp shuffles, the
atomics, the bit-cast intrinsics and the math functions. It is test infrastructure: nothing
in minunet/ knows about it.

How a launch runs
-----------------
Blocks run one after another on the calling OS thread, in forward, reverse or shuffled
order (EMU_ORDER_*; a kernel whose result depends on the order of its blocks shows it).
The threads of a block are cooperative fibers: each has its own stack and runs until it
reaches __syncthreads(), a warp collective (__shfl_*_sync, __ballot_sync, __syncwarp) or its
end, and then switches back to the block's scheduler (a hand-written x86-64 context switch,
a few nanoseconds; no OS threads). When no fiber can run, the scheduler decides:
  - every thread of a warp named in a collective's mask waits at that collective: the
    values are exchanged and those threads run on;
  - every thread of the block waits at the same __syncthreads(): the barrier opens;
  - anything else (a thread exited, or waits elsewhere) is an ERROR naming the kernel, the
    barrier's file:line and the threads, where a GPU would hang or silently misbehave.
Because only one fiber runs at a time, atomics are trivially atomic.

How accesses are checked
------------------------
The library is compiled with `-fsanitize=thread`, which makes g++ call __tsan_read4(addr),
__tsan_write8(addr), ... before every load and store of the kernel code. libtsan is NOT
linked: this header defines those hooks itself (EMU_HOOK) and checks each access:
  - shared memory: every `__shared__` variable is a function-local static, which g++ puts
    in a `.bss._ZZ...` section; the emulator's linker script (emulator.ld) gathers all of
    them into one output section bracketed by __emu_shared_begin/_end. At each block's start
    that memory is filled with 0xff bytes (NaN in float and double) and a shadow word per 4
    bytes records the last writer and the readers in the current barrier epoch (the span
    between two __syncthreads). Two threads touching one word in one epoch, one of them
    writing, is a RACE; reading a word no thread of this block has written is an ERROR.
  - global memory: the launch registers the exact byte range of every array argument;
    an access outside all of them (and outside the fibers' stacks and this runtime's own
    state) is an OUT-OF-BOUNDS error naming the kernel, the thread, the block, and the
    nearest argument; a store through a range only passed as `const T*` is an error too.
    Each array the kernel may write has a shadow word per 4 bytes naming its last writer
    (block, epoch, thread): a block reading or writing a word another block wrote in this
    launch is an ERROR (the result would depend on the order blocks run in; atomics are
    exempt), and so is a thread touching a word another thread of its block wrote in the
    same barrier epoch.
An error stops the launch at once (the faulting access is not performed) and the launcher
returns its message, which the Python side raises as an exception.

__CUDA_ARCH__ is 900 (an H200) unless the options define it (-D__CUDA_ARCH__=500 compiles the
pre-sm_60 paths). __launch_bounds__ is accepted and not enforced.

Asynchronous copies and tensor cores
------------------------------------
kernels/common.cuh reaches cp.async, cvt.rna.tf32 and mma.sync only through five device
functions (async_copy, async_commit, async_wait, to_tf32, mma_tf32_16x8x8), and addresses
stored in device memory through a sixth (table_pointer), defined there unless
MINUNET_EMULATED_PTX is set. This header sets it and models exactly those six, at the end of
the file:
  - async_copy snapshots its source (bounds-checked like any read) and marks the destination
    words "in flight"; the bytes land in shared memory only when async_wait retires the
    copy's group, as the latest moment a GPU may complete it. Reading or writing a word with a
    copy in flight (a missing or too shallow async_wait), a copy retired without a barrier
    before other threads read it (an ordinary race, seen by the shadow), and a thread that ends
    with copies in flight are ERRORS.
  - mma_tf32_16x8x8 is a warp collective (WARP_MMA): all 32 lanes must reach it, their
    fragments are assembled in the PTX manual's layout, and each lane gets its part of the
    product of the TF32-rounded operands, summed in float.
  - table_pointer reads the address (a checked read of the table) and requires the n elements
    it names to lie inside one array whose address the host took (`a.data.ptr`: the launch
    lists them); it then registers exactly those bytes as one more array of the launch, writable
    only through a non-const T, so every later access is checked as an argument's would be.

Limits (documented, not hidden): no dynamic (`extern __shared__`) shared memory, and no limit
on the static amount; an index past one __shared__ array into the next is not a bounds error
(the race and never-written checks often catch it); the cross-block and race checks of global
memory work on 4-byte words; float arithmetic is the host's (no -ftz, no fused multiply-add
unless g++ contracts one); the warp collectives order no memory (as on Volta and later, only
__syncthreads does here); blocks never run concurrently, so a block that reads a word BEFORE
another block writes it shows only through the block order.
*/
#include <cmath>
#include <cstdarg>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <sys/mman.h>
#include <tuple>
#include <type_traits>
#include <utility>

#if !defined(__x86_64__)
#error "the CUDA emulator's context switch is written for x86-64"
#endif

// ---- CUDA keywords ------------------------------------------------------------------------
// Every kernel and device function becomes `inline`, so that each `__shared__` variable is a
// static local of an inline (COMDAT) function, placed in a .bss._ZZ* section (see the header).
#define __global__ inline
#define __device__ inline
#define __host__
#define __forceinline__ __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __shared__ static __attribute__((aligned(16)))
#define __launch_bounds__(...)
#define __CUDACC__ 1
#ifndef __CUDA_ARCH__
#define __CUDA_ARCH__ 900
#endif
#define EMU_HOOK extern "C" __attribute__((no_sanitize_thread, visibility("hidden")))
#define EMU_RT __attribute__((no_sanitize_thread))

struct dim3 {
    unsigned int x, y, z;
};
typedef dim3 uint3;

namespace emu {

enum { RUNNABLE, AT_BARRIER, AT_WARP, DONE };
enum { WARP_SHFL, WARP_SHFL_UP, WARP_SHFL_DOWN, WARP_SHFL_XOR, WARP_BALLOT, WARP_SYNC, WARP_MMA };
enum { EMU_ORDER_FORWARD, EMU_ORDER_REVERSE, EMU_ORDER_SHUFFLE };
constexpr int MAX_THREADS = 1024, MAX_ARG_RANGES = 64, MAX_RANGES = MAX_ARG_RANGES + 1024;  // + table_pointer's
constexpr size_t STACK_BYTES = 64 * 1024;
constexpr int MAX_ASYNC = 128;  // async copies one thread may have in flight

struct AsyncCopy {  // one async_copy not yet retired: where it goes, its group, the bytes it read
    uintptr_t dst;
    int bytes, group;
    unsigned char data[16];
};

struct Thread {
    uint3 idx;
    int state;
    void* sp;
    const char* file;  // where it waits (barrier or warp collective)
    int line;
    int warp_kind, lane_arg, width;
    unsigned int mask;
    unsigned long long value, result;
};

struct Range {  // one array argument's bytes
    uintptr_t lo;
    size_t len;
    int writable, arg;
};

// What Python passes to a launcher (ctypes mirrors this layout in tests/cuda_emulator/cupy.py).
struct Launch {
    unsigned int grid[3], block[3];
    int order;
    unsigned long long seed;
    int nranges;
    Range ranges[MAX_ARG_RANGES];
    const char* kernel;
    char message[2048];
    const unsigned long long* exported;  // (address, bytes) of every array whose address the host took,
    int nexported;                       // sorted by address: where table_pointer may point
};

struct State {
    int in_fiber;
    uintptr_t shared_lo;
    size_t shared_len;
    int nranges;
    Range ranges[MAX_RANGES];
    uintptr_t stack_lo;
    size_t stack_len;
    uintptr_t extra_lo;
    size_t extra_len;
    Thread* cur;
    int cur_tid, nthreads;
    uint3 block_idx;
    dim3 block_dim, grid_dim;
    unsigned long long epoch, block_epoch;
    void* sched_sp;
    void (*body)(void*);
    void* body_ctx;
    int failed;
    int unwritten_read, unwritten_tid;  // a read of shared memory no thread of the block wrote
    size_t unwritten_byte;
    Launch* launch;
    unsigned long long* shadow;  // two words per 4 bytes of shared memory: last writer, readers
    unsigned long long* range_shadow[MAX_RANGES];  // per 4 bytes of a writable array: its last writer
    unsigned long long block_linear;
    Thread threads[MAX_THREADS];
    // async copies: per shared word, 1 + the tid whose copy into it is in flight (0: none)
    unsigned short* async_pending;
    int async_landing;  // set while a retired copy writes its bytes
    int async_count[MAX_THREADS], async_committed[MAX_THREADS];
    AsyncCopy async_copies[MAX_THREADS][MAX_ASYNC];
};
State g;

}  // namespace emu

#define threadIdx (emu::g.cur->idx)
#define blockIdx (emu::g.block_idx)
#define blockDim (emu::g.block_dim)
#define gridDim (emu::g.grid_dim)
#define warpSize 32

extern "C" char __emu_shared_begin[], __emu_shared_end[];

// ---- the context switch ---------------------------------------------------------------------
// emu_switch(&save, to): push the callee-saved registers and the SSE/x87 control words, save
// the stack pointer in *save, load `to`, pop the same set: returns into the other context.
extern "C" void emu_switch(void** save, void* to);
asm(R"(
.text
.p2align 4
.globl emu_switch
.hidden emu_switch
.type emu_switch,@function
emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
.size emu_switch, .-emu_switch
)");

namespace emu {

EMU_RT static void fail(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

// The current fiber stops for good: its stack is abandoned and the scheduler ends the launch.
EMU_RT [[noreturn]] static void abort_fiber() {
    g.in_fiber = 0;
    void* dead;
    emu_switch(&dead, g.sched_sp);
    __builtin_unreachable();
}

EMU_RT static void fail(const char* fmt, ...) {
    if (g.failed) return;
    g.failed = 1;
    int n = snprintf(g.launch->message, sizeof g.launch->message, "%s: ", g.launch->kernel);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(g.launch->message + n, sizeof g.launch->message - n, fmt, ap);
    va_end(ap);
}

EMU_RT static void fail_in_thread(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
EMU_RT static void fail_in_thread(const char* fmt, ...) {
    if (!g.failed) {
        char what[1024];
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(what, sizeof what, fmt, ap);
        va_end(ap);
        const Thread& t = *g.cur;
        fail("%s, by thread (%u,%u,%u) of block (%u,%u,%u)", what, t.idx.x, t.idx.y, t.idx.z,
             g.block_idx.x, g.block_idx.y, g.block_idx.z);
    }
    abort_fiber();
}

EMU_RT static void thread_name(char* out, size_t n, int tid) {
    const Thread& t = g.threads[tid];
    snprintf(out, n, "thread (%u,%u,%u)", t.idx.x, t.idx.y, t.idx.z);
}

// ---- shared memory: races and reads of unwritten words ------------------------------------
// shadow[2w] = epoch << 11 | writer tid; shadow[2w + 1] = epoch << 12 | several-readers << 11 | reader tid
EMU_RT static inline void shared_access(uintptr_t a, size_t n, bool write) {
    const size_t off = a - g.shared_lo;
    if (off + n > g.shared_len)
        fail_in_thread("out-of-bounds %s of %zu bytes at the end of shared memory", write ? "write" : "read", n);
    const unsigned long long tid = (unsigned long long)g.cur_tid, e = g.epoch;
    if (!g.async_landing)
        for (size_t w = off >> 2; w <= (off + n - 1) >> 2; ++w)
            if (g.async_pending[w]) {
                char other[64];
                thread_name(other, sizeof other, g.async_pending[w] - 1);
                fail_in_thread("%s of shared byte %zu while an async copy of %s into it is in flight (no "
                               "async_wait has retired it)", write ? "write" : "read", w * 4, other);
            }
    for (size_t w = off >> 2; w <= (off + n - 1) >> 2; ++w) {
        unsigned long long& W = g.shadow[2 * w];
        unsigned long long& R = g.shadow[2 * w + 1];
        const unsigned long long w_epoch = W >> 11, w_tid = W & 2047, r_epoch = R >> 12, r_tid = R & 2047;
        char other[64];
        if (write) {
            if (w_epoch == e && w_tid != tid) {
                thread_name(other, sizeof other, (int)w_tid);
                fail_in_thread("shared-memory race: write to shared byte %zu, which %s also wrote since the last "
                               "__syncthreads()", w * 4, other);
            }
            if (r_epoch == e && ((R & 2048) || r_tid != tid)) {
                thread_name(other, sizeof other, (int)r_tid);
                fail_in_thread("shared-memory race: write to shared byte %zu, which %s%s read since the last "
                               "__syncthreads()", w * 4, other, (R & 2048) ? " and others" : "");
            }
            W = e << 11 | tid;
        } else {
            if (w_epoch < g.block_epoch && !g.unwritten_read) {
                // reported when the epoch ends, unless a write by another thread in this epoch
                // shows the real bug first: a race
                g.unwritten_read = 1;
                g.unwritten_byte = w * 4;
                g.unwritten_tid = g.cur_tid;
            }
            if (w_epoch == e && w_tid != tid) {
                thread_name(other, sizeof other, (int)w_tid);
                fail_in_thread("shared-memory race: read of shared byte %zu, which %s wrote since the last "
                               "__syncthreads()", w * 4, other);
            }
            if (r_epoch == e) {
                if (r_tid != tid) R |= 2048;
            } else {
                R = e << 12 | tid;
            }
        }
    }
}

// ---- global memory: writes by two blocks, reads of another block's writes ------------------
// range_shadow[i][w] = (block + 1) << 32 | (epoch within the block) << 10 | tid of the last writer
EMU_RT static void block_name(char* out, size_t n, unsigned long long b) {
    snprintf(out, n, "block (%llu,%llu,%llu)", b % g.grid_dim.x, b / g.grid_dim.x % g.grid_dim.y,
             b / g.grid_dim.x / g.grid_dim.y);
}

EMU_RT static inline void global_access(int i, uintptr_t a, size_t n, bool write) {
    unsigned long long* shadow = g.range_shadow[i];
    const Range& r = g.ranges[i];
    const unsigned long long block = g.block_linear + 1, epoch = (g.epoch - g.block_epoch) & 0x3fffff;
    const unsigned long long me = block << 32 | epoch << 10 | (unsigned long long)g.cur_tid;
    char other[64];
    for (size_t w = (a - r.lo) >> 2; w <= (a + n - 1 - r.lo) >> 2; ++w) {
        const unsigned long long s = shadow[w];
        if (!s) {
            if (write) shadow[w] = me;
            continue;
        }
        if (s >> 32 != block) {
            block_name(other, sizeof other, (s >> 32) - 1);
            fail_in_thread("%s of byte %zu of argument %d, which %s wrote in this launch: the result depends on the "
                           "order in which blocks run", write ? "write" : "read", w * 4, r.arg, other);
        }
        if ((s >> 10 & 0x3fffff) == epoch && (s & 1023) != (unsigned long long)g.cur_tid) {
            thread_name(other, sizeof other, (int)(s & 1023));
            fail_in_thread("global-memory race: %s of byte %zu of argument %d, which %s of the same block wrote "
                           "since the last __syncthreads()", write ? "write" : "read", w * 4, r.arg, other);
        }
        if (write) shadow[w] = me;
    }
}

// ---- every access of the kernel code comes here --------------------------------------------
EMU_RT static int range_arg_at(uintptr_t a) {
    for (int i = 0; i < g.nranges; ++i)
        if (a - g.ranges[i].lo < g.ranges[i].len) return g.ranges[i].arg;
    return -1;
}

EMU_RT static size_t range_len_of(int arg) {
    for (int i = 0; i < g.nranges; ++i)
        if (g.ranges[i].arg == arg) return g.ranges[i].len;
    return 0;
}

EMU_RT static inline void access(const void* p, size_t n, bool write, bool atomic = false) {
    if (!g.in_fiber) return;
    const uintptr_t a = (uintptr_t)p;
    if (a - g.shared_lo < g.shared_len) return shared_access(a, n, write);
    bool read_only_hit = false;
    for (int i = 0; i < g.nranges; ++i) {
        const Range& r = g.ranges[i];
        if (a - r.lo < r.len && a + n - r.lo <= r.len) {
            if (!write || r.writable) {
                if (g.range_shadow[i] && !atomic) global_access(i, a, n, write);
                return;
            }
            read_only_hit = true;
        }
    }
    if (a - g.stack_lo < g.stack_len || a - (uintptr_t)&g < sizeof g || a - g.extra_lo < g.extra_len) return;
    if (read_only_hit)
        fail_in_thread("write of %zu bytes into argument %d, which the kernel takes as a const pointer", n,
                       range_arg_at(a));
    const uintptr_t shared_end = g.shared_lo + g.shared_len;
    if (a + 4096 >= g.shared_lo && a < shared_end + 4096)
        fail_in_thread("out-of-bounds %s of %zu bytes of shared memory, %lld bytes %s the __shared__ variables",
                       write ? "write" : "read", n,
                       a < g.shared_lo ? (long long)(g.shared_lo - a) : (long long)(a - shared_end),
                       a < g.shared_lo ? "before" : "past the end of");
    // name the argument whose bytes lie nearest
    long long best = -1;
    int best_arg = -1;
    const char* side = "";
    for (int i = 0; i < g.nranges; ++i) {
        const Range& r = g.ranges[i];
        long long d;
        const char* s;
        if (a < r.lo) { d = (long long)(r.lo - a); s = "before the start"; }
        else { d = (long long)(a - (r.lo + r.len)); s = "past the end"; }
        if (a >= r.lo && a < r.lo + r.len) { d = (long long)(a + n - (r.lo + r.len)); s = "straddling the end"; }
        if (best < 0 || d < best) { best = d; best_arg = r.arg; side = s; }
    }
    if (best_arg >= 0 && best < (1 << 20))
        fail_in_thread("out-of-bounds %s of %zu bytes, %lld bytes %s of argument %d (%zu bytes)",
                       write ? "write" : "read", n, best, side, best_arg, range_len_of(best_arg));
    fail_in_thread("out-of-bounds %s of %zu bytes at %p, far from every array argument, shared variable and stack",
                   write ? "write" : "read", n, p);
}

}  // namespace emu

// ---- the ThreadSanitizer entry points, defined here (libtsan is not linked) ----------------
#define EMU_TSAN_SIZED(n)                                                                  \
    EMU_HOOK void __tsan_read##n(void* p) { emu::access(p, n, false); }                    \
    EMU_HOOK void __tsan_write##n(void* p) { emu::access(p, n, true); }                    \
    EMU_HOOK void __tsan_unaligned_read##n(void* p) { emu::access(p, n, false); }          \
    EMU_HOOK void __tsan_unaligned_write##n(void* p) { emu::access(p, n, true); }          \
    EMU_HOOK void __tsan_volatile_read##n(void* p) { emu::access(p, n, false); }           \
    EMU_HOOK void __tsan_volatile_write##n(void* p) { emu::access(p, n, true); }
EMU_TSAN_SIZED(1)
EMU_TSAN_SIZED(2)
EMU_TSAN_SIZED(4)
EMU_TSAN_SIZED(8)
EMU_TSAN_SIZED(16)
EMU_HOOK void __tsan_read_range(void* p, size_t n) { if (n) emu::access(p, n, false); }
EMU_HOOK void __tsan_write_range(void* p, size_t n) { if (n) emu::access(p, n, true); }
EMU_HOOK void __tsan_func_entry(void*) {}
EMU_HOOK void __tsan_func_exit() {}
EMU_HOOK void __tsan_init() {}
EMU_HOOK void __tsan_vptr_read(void**) {}
EMU_HOOK void __tsan_vptr_update(void**, void*) {}

namespace emu {

// ---- waiting: barriers and warp collectives ------------------------------------------------
EMU_RT static void wait_here(int state, const char* file, int line) {
    Thread& t = *g.cur;
    t.state = state;
    t.file = file;
    t.line = line;
    g.in_fiber = 0;
    emu_switch(&t.sp, g.sched_sp);
    // resumed by the scheduler (which set g.cur and g.in_fiber again)
}

EMU_RT static void syncthreads(const char* file, int line) { wait_here(AT_BARRIER, file, line); }

template <typename T>
EMU_RT static T warp_op(int kind, unsigned int mask, T v, int lane_arg, int width, const char* file, int line) {
    static_assert(sizeof(T) <= 8, "warp collectives exchange values of at most 8 bytes");
    Thread& t = *g.cur;
    t.warp_kind = kind;
    t.mask = mask;
    t.lane_arg = lane_arg;
    t.width = width;
    t.value = 0;
    memcpy(&t.value, &v, sizeof(T));
    wait_here(AT_WARP, file, line);
    T r;
    memcpy(&r, &g.cur->result, sizeof(T));
    return r;
}

// One 16 x 8 x 8 TF32 mma of the warp whose lane 0 is thread lo: each lane's `value` points at
// its MmaFragments (see mma_tf32_16x8x8 at the end of this file); D = A B + C in the PTX
// manual's fragment layout, with g = lane / 4 and q = lane % 4.
struct MmaFragments {
    float d[4];
    unsigned a[4], b[2];
};

EMU_RT static float tf32_value(unsigned bits) {
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

EMU_RT static void mma_resolve(int lo) {
    float A[16][8], B[8][8], C[16][8];
    for (int lane = 0; lane < 32; ++lane) {
        const MmaFragments* m = (const MmaFragments*)(uintptr_t)g.threads[lo + lane].value;
        const int gr = lane / 4, q = lane % 4;
        A[gr][q] = tf32_value(m->a[0]);
        A[gr + 8][q] = tf32_value(m->a[1]);
        A[gr][q + 4] = tf32_value(m->a[2]);
        A[gr + 8][q + 4] = tf32_value(m->a[3]);
        B[q][gr] = tf32_value(m->b[0]);
        B[q + 4][gr] = tf32_value(m->b[1]);
        C[gr][2 * q] = m->d[0];
        C[gr][2 * q + 1] = m->d[1];
        C[gr + 8][2 * q] = m->d[2];
        C[gr + 8][2 * q + 1] = m->d[3];
    }
    for (int lane = 0; lane < 32; ++lane) {
        MmaFragments* m = (MmaFragments*)(uintptr_t)g.threads[lo + lane].value;
        const int gr = lane / 4, q = lane % 4;
        for (int e = 0; e < 4; ++e) {
            const int r = gr + 8 * (e >> 1), c = 2 * q + (e & 1);
            float acc = C[r][c];
            for (int k = 0; k < 8; ++k) acc += A[r][k] * B[k][c];
            m->d[e] = acc;
        }
    }
}

// ---- the scheduler -------------------------------------------------------------------------
EMU_RT static void fiber_main() {
    g.body(g.body_ctx);
    g.cur->state = DONE;
    g.in_fiber = 0;
    void* dead;
    emu_switch(&dead, g.sched_sp);
    __builtin_unreachable();
}

EMU_RT static void start_fiber(Thread& t, int tid) {
    // a fresh stack whose first `ret` enters fiber_main with the alignment of a call
    uintptr_t top = (g.stack_lo + (size_t)(tid + 1) * STACK_BYTES) & ~(uintptr_t)15;
    void** sp = (void**)top;
    *--sp = nullptr;                 // fiber_main's return address (it never returns)
    *--sp = (void*)&fiber_main;      // popped by emu_switch's ret
    for (int i = 0; i < 6; ++i) *--sp = nullptr;  // rbp rbx r12 r13 r14 r15
    --sp;
    unsigned int mxcsr;
    unsigned short fpucw;
    __asm__ volatile("stmxcsr %0" : "=m"(mxcsr));
    __asm__ volatile("fnstcw %0" : "=m"(fpucw));
    memcpy((char*)sp, &mxcsr, 4);
    memcpy((char*)sp + 4, &fpucw, 2);
    t.sp = sp;
    t.state = RUNNABLE;
}

EMU_RT static bool resolve_warp(int w, bool* resolved) {
    // the lanes of warp w: tids [32 w, min(32 w + 32, nthreads))
    const int lo = 32 * w, hi = lo + 32 < g.nthreads ? lo + 32 : g.nthreads;
    int first = -1;
    for (int t = lo; t < hi; ++t)
        if (g.threads[t].state == AT_WARP) { first = t; break; }
    if (first < 0) return true;
    const Thread& f = g.threads[first];
    char who[64];
    for (int lane = 0; lane < 32; ++lane) {
        if (!(f.mask >> lane & 1u)) continue;
        const int t = lo + lane;
        if (t >= hi) {
            fail("warp collective at %s:%d names lane %d of warp %d in its mask 0x%08x, but the block has no such "
                 "thread", f.file, f.line, lane, w, f.mask);
            return false;
        }
        const Thread& o = g.threads[t];
        thread_name(who, sizeof who, t);
        if (o.state != AT_WARP || o.line != f.line || o.file != f.file || o.warp_kind != f.warp_kind) {
            fail("warp collective at %s:%d (mask 0x%08x) is not reached by every lane of its mask: %s %s", f.file,
                 f.line, f.mask, who,
                 o.state == DONE ? "has exited" : o.state == AT_BARRIER ? "waits at a __syncthreads()" : "waits at another collective");
            return false;
        }
        if (o.mask != f.mask) {
            fail("warp collective at %s:%d: lanes disagree on the mask (0x%08x and 0x%08x)", f.file, f.line, f.mask,
                 o.mask);
            return false;
        }
    }
    if (!(f.mask >> (first - lo) & 1u)) {
        fail("warp collective at %s:%d: a lane calls it with a mask 0x%08x that leaves itself out", f.file, f.line,
             f.mask);
        return false;
    }
    if (f.warp_kind == WARP_MMA) {
        if (f.mask != 0xffffffffu) {
            fail("mma at %s:%d: every lane of the warp must take part (mask 0x%08x)", f.file, f.line, f.mask);
            return false;
        }
        mma_resolve(lo);
        for (int lane = 0; lane < 32; ++lane) g.threads[lo + lane].state = RUNNABLE;
        *resolved = true;
        return true;
    }
    unsigned int ballot = 0;
    if (f.warp_kind == WARP_BALLOT)
        for (int lane = 0; lane < 32; ++lane)
            if ((f.mask >> lane & 1u) && g.threads[lo + lane].value) ballot |= 1u << lane;
    for (int lane = 0; lane < 32; ++lane) {
        if (!(f.mask >> lane & 1u)) continue;
        Thread& t = g.threads[lo + lane];
        const int width = t.width, seg = lane & ~(width - 1);
        int src = lane;
        switch (t.warp_kind) {
            case WARP_SHFL: src = seg + (t.lane_arg & (width - 1)); break;
            case WARP_SHFL_UP: src = lane - t.lane_arg; if (src < seg) src = lane; break;
            case WARP_SHFL_DOWN: src = lane + t.lane_arg; if (src >= seg + width) src = lane; break;
            case WARP_SHFL_XOR: src = lane ^ t.lane_arg; if (src >= seg + width) src = lane; break;
            default: break;
        }
        if (t.warp_kind == WARP_BALLOT) {
            t.result = ballot;
        } else {
            if (!(f.mask >> src & 1u)) {
                fail("warp shuffle at %s:%d: lane %d reads lane %d, which is not in the mask 0x%08x", f.file, f.line,
                     lane, src, f.mask);
                return false;
            }
            t.result = g.threads[lo + src].value;
        }
    }
    for (int lane = 0; lane < 32; ++lane)
        if (f.mask >> lane & 1u) g.threads[lo + lane].state = RUNNABLE;
    *resolved = true;
    return true;
}

EMU_RT static bool check_unwritten_reads() {
    if (!g.unwritten_read) return true;
    const Thread& t = g.threads[g.unwritten_tid];
    fail("read of shared byte %zu, which no thread of this block has written, by thread (%u,%u,%u) of block "
         "(%u,%u,%u)", g.unwritten_byte, t.idx.x, t.idx.y, t.idx.z, g.block_idx.x, g.block_idx.y, g.block_idx.z);
    return false;
}

EMU_RT static bool run_block() {
    g.unwritten_read = 0;
    ++g.epoch;
    g.block_epoch = g.epoch;
    memset((void*)g.shared_lo, 0xff, g.shared_len);  // poison: NaN in float and double
    memset(g.async_pending, 0, (g.shared_len / 4 + 1) * sizeof(unsigned short));
    memset(g.async_count, 0, sizeof g.async_count);
    memset(g.async_committed, 0, sizeof g.async_committed);
    const dim3 b = g.block_dim;
    for (int tid = 0; tid < g.nthreads; ++tid) {
        Thread& t = g.threads[tid];
        t.idx = uint3{(unsigned)tid % b.x, (unsigned)tid / b.x % b.y, (unsigned)tid / (b.x * b.y)};
        start_fiber(t, tid);
    }
    for (;;) {
        for (int tid = 0; tid < g.nthreads; ++tid) {
            Thread& t = g.threads[tid];
            if (t.state != RUNNABLE) continue;
            g.cur = &t;
            g.cur_tid = tid;
            g.in_fiber = 1;
            emu_switch(&g.sched_sp, t.sp);
            g.in_fiber = 0;
            if (g.failed) return false;
        }
        bool resolved = false;
        for (int w = 0; w * 32 < g.nthreads; ++w)
            if (!resolve_warp(w, &resolved)) return false;
        if (resolved) continue;
        int done = 0, first_bar = -1, first_done = -1;
        for (int tid = 0; tid < g.nthreads; ++tid) {
            const Thread& t = g.threads[tid];
            if (t.state == DONE) {
                ++done;
                if (first_done < 0) first_done = tid;
            } else if (first_bar < 0) {
                first_bar = tid;
            }
        }
        if (!check_unwritten_reads()) return false;
        if (done == g.nthreads) {
            for (int tid = 0; tid < g.nthreads; ++tid)
                if (g.async_count[tid]) {
                    char who[64];
                    thread_name(who, sizeof who, tid);
                    fail("%s ended with %d async copies in flight (never retired by async_wait)", who,
                         g.async_count[tid]);
                    return false;
                }
            return true;
        }
        const Thread& f = g.threads[first_bar];
        char who[64], who2[64];
        thread_name(who, sizeof who, first_bar);
        if (first_done >= 0) {
            thread_name(who2, sizeof who2, first_done);
            fail("__syncthreads() at %s:%d is reached by %d of the block's %d threads (%s waits there; %s has "
                 "exited): on a GPU this hangs or corrupts the block",
                 f.file, f.line, g.nthreads - done, g.nthreads, who, who2);
            return false;
        }
        for (int tid = 0; tid < g.nthreads; ++tid) {
            const Thread& t = g.threads[tid];
            if (t.line != f.line || t.file != f.file) {
                thread_name(who2, sizeof who2, tid);
                fail("threads of one block wait at different __syncthreads(): %s at %s:%d, %s at %s:%d", who, f.file,
                     f.line, who2, t.file, t.line);
                return false;
            }
        }
        ++g.epoch;  // the barrier opens
        for (int tid = 0; tid < g.nthreads; ++tid) g.threads[tid].state = RUNNABLE;
    }
}

EMU_RT static int run_grid(Launch* L) {
    g.launch = L;
    g.failed = 0;
    L->message[0] = 0;
    const dim3 grid{L->grid[0], L->grid[1], L->grid[2]}, block{L->block[0], L->block[1], L->block[2]};
    const unsigned long long nthreads = (unsigned long long)block.x * block.y * block.z;
    if (nthreads == 0 || nthreads > MAX_THREADS || block.z > 64 || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
        grid.y > 65535 || grid.z > 65535 || grid.x > 2147483647u) {
        fail("invalid launch configuration: grid (%u,%u,%u), block (%u,%u,%u)", grid.x, grid.y, grid.z, block.x,
             block.y, block.z);
        return 1;
    }
    if (!g.stack_lo) {
        void* p = mmap(nullptr, STACK_BYTES * MAX_THREADS, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (p == MAP_FAILED) { fail("cannot map the fibers' stacks"); return 1; }
        g.stack_lo = (uintptr_t)p;
        g.stack_len = STACK_BYTES * MAX_THREADS;
    }
    if (!g.shadow) {
        g.shared_lo = (uintptr_t)__emu_shared_begin;
        g.shared_len = (size_t)(__emu_shared_end - __emu_shared_begin);
        g.shadow = (unsigned long long*)calloc(2 * (g.shared_len / 4 + 1), sizeof(unsigned long long));
        g.async_pending = (unsigned short*)calloc(g.shared_len / 4 + 1, sizeof(unsigned short));
    }
    g.nranges = L->nranges;
    memcpy(g.ranges, L->ranges, sizeof(Range) * (size_t)L->nranges);
    for (int i = 0; i < g.nranges; ++i) {  // a last-writer shadow per array the kernel may write
        g.range_shadow[i] = nullptr;
        bool writable = false;
        for (int j = 0; j < g.nranges; ++j)
            if (g.ranges[j].lo == g.ranges[i].lo && g.ranges[j].len == g.ranges[i].len) writable |= g.ranges[j].writable;
        if (!writable || !g.ranges[i].len) continue;
        for (int j = 0; j < i && !g.range_shadow[i]; ++j)  // arguments that alias share one shadow
            if (g.ranges[j].lo == g.ranges[i].lo && g.ranges[j].len == g.ranges[i].len) g.range_shadow[i] = g.range_shadow[j];
        if (!g.range_shadow[i])
            g.range_shadow[i] = (unsigned long long*)calloc(g.ranges[i].len / 4 + 2, sizeof(unsigned long long));
    }
    g.grid_dim = grid;
    g.block_dim = block;
    g.nthreads = (int)nthreads;
    const unsigned long long nblocks = (unsigned long long)grid.x * grid.y * grid.z;
    unsigned long long rng = L->seed * 0x9E3779B97F4A7C15ull + 1;
    unsigned long long* order = nullptr;
    if (L->order == EMU_ORDER_SHUFFLE) {
        order = (unsigned long long*)malloc(sizeof(unsigned long long) * nblocks);
        for (unsigned long long i = 0; i < nblocks; ++i) order[i] = i;
        for (unsigned long long i = nblocks; i > 1; --i) {  // Fisher-Yates with xorshift64
            rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17;
            const unsigned long long j = rng % i, tmp = order[i - 1];
            order[i - 1] = order[j];
            order[j] = tmp;
        }
    }
    int rc = 0;
    for (unsigned long long k = 0; k < nblocks; ++k) {
        const unsigned long long b = order ? order[k] : L->order == EMU_ORDER_REVERSE ? nblocks - 1 - k : k;
        g.block_idx = uint3{(unsigned)(b % grid.x), (unsigned)(b / grid.x % grid.y), (unsigned)(b / grid.x / grid.y)};
        g.block_linear = b;
        if (!run_block()) { rc = 1; break; }
    }
    free(order);
    for (int i = 0; i < g.nranges; ++i) {
        bool shared_with_earlier = false;
        for (int j = 0; j < i; ++j) shared_with_earlier |= g.range_shadow[j] == g.range_shadow[i];
        if (!shared_with_earlier) free(g.range_shadow[i]);
        g.range_shadow[i] = nullptr;
    }
    g.nranges = 0;
    g.extra_lo = 0;
    g.extra_len = 0;
    return rc;
}

// ---- launching a kernel: arguments from Python, parameter types from the function ----------
template <typename A>
EMU_RT void describe(char* out) {  // "p" / "P" (const) + pointee, or a scalar: kind letter + bytes
    typedef typename std::remove_cv<A>::type T;
    if (std::is_pointer<T>::value) {
        typedef typename std::remove_pointer<T>::type E;
        typedef typename std::remove_cv<E>::type U;
        const char c = std::is_const<E>::value ? 'P' : 'p';
        const char k = std::is_floating_point<U>::value ? 'f' : std::is_same<U, bool>::value ? 'b'
                       : std::is_signed<U>::value ? 'i' : std::is_unsigned<U>::value ? 'u' : 'v';
        snprintf(out, 16, "%c%c%d", c, k, std::is_void<U>::value ? 0 : (int)sizeof(typename std::conditional<std::is_void<U>::value, char, U>::type));
    } else {
        const char k = std::is_floating_point<T>::value ? 'f' : std::is_same<T, bool>::value ? 'b'
                       : std::is_signed<T>::value ? 'i' : std::is_unsigned<T>::value ? 'u' : 's';
        snprintf(out, 16, "%c%d", k, (int)sizeof(T));
    }
}

template <typename... A>
EMU_RT int signature(void (*)(A...), char* out, int n) {
    char parts[sizeof...(A) + 1][16] = {};
    int i = 0;
    ((describe<A>(parts[i++])), ...);
    int used = 0;
    out[0] = 0;
    for (int k = 0; k < (int)sizeof...(A); ++k)
        used += snprintf(out + used, used < n ? n - used : 0, k ? ",%s" : "%s", parts[k]);
    return used < n ? 0 : 1;
}

template <typename A>
EMU_RT A read_arg(void* p) {
    A v;
    memcpy((void*)&v, p, sizeof(A));
    return v;
}

template <typename... A>
struct Call {
    void (*kernel)(A...);
    std::tuple<A...> args;
};

template <typename... A>
void call_body(void* c) {  // runs in every fiber: the kernel with this launch's arguments
    Call<A...>* call = (Call<A...>*)c;
    std::apply(call->kernel, call->args);
}

template <typename... A, size_t... I>
EMU_RT int launch_impl(Launch* L, void (*kernel)(A...), void** args, std::index_sequence<I...>) {
    Call<A...> call{kernel, std::tuple<A...>(read_arg<A>(args[I])...)};
    g.body = &call_body<A...>;
    g.body_ctx = &call;
    g.extra_lo = (uintptr_t)&call;
    g.extra_len = sizeof call;
    return run_grid(L);
}

template <typename... A>
EMU_RT int launch(Launch* L, void (*kernel)(A...), void** args) {
    return launch_impl(L, kernel, args, std::index_sequence_for<A...>{});
}

}  // namespace emu

// ---- CUDA built-ins the kernels call -------------------------------------------------------
#define __syncthreads() emu::syncthreads(__FILE__, __LINE__)
#define __syncwarp(...) emu::warp_op<int>(emu::WARP_SYNC, emu_mask_or_full(__VA_ARGS__), 0, 0, 32, __FILE__, __LINE__)
#define __shfl_sync(mask, v, lane, ...) emu::warp_op(emu::WARP_SHFL, mask, v, lane, emu_width(__VA_ARGS__), __FILE__, __LINE__)
#define __shfl_up_sync(mask, v, d, ...) emu::warp_op(emu::WARP_SHFL_UP, mask, v, d, emu_width(__VA_ARGS__), __FILE__, __LINE__)
#define __shfl_down_sync(mask, v, d, ...) emu::warp_op(emu::WARP_SHFL_DOWN, mask, v, d, emu_width(__VA_ARGS__), __FILE__, __LINE__)
#define __shfl_xor_sync(mask, v, m, ...) emu::warp_op(emu::WARP_SHFL_XOR, mask, v, m, emu_width(__VA_ARGS__), __FILE__, __LINE__)
#define __ballot_sync(mask, pred) emu::warp_op<unsigned int>(emu::WARP_BALLOT, mask, (pred) ? 1u : 0u, 0, 32, __FILE__, __LINE__)
inline int emu_width() { return 32; }
inline int emu_width(int w) { return w; }
inline unsigned int emu_mask_or_full() { return 0xffffffffu; }
inline unsigned int emu_mask_or_full(unsigned int m) { return m; }

// atomics: one fiber runs at a time, so a plain read-modify-write is atomic; the access is
// bounds-checked like any other, and exempt from the race and cross-block checks
namespace emu {
EMU_RT static inline void atomic_access(const void* p, size_t n) {
    const uintptr_t a = (uintptr_t)p;
    if (g.in_fiber && !(a - g.shared_lo < g.shared_len)) access(p, n, true, true);
}
}  // namespace emu
#define EMU_ATOMIC_ADD(T)                                                                   \
    EMU_RT inline T atomicAdd(T* p, T v) { emu::atomic_access(p, sizeof(T)); T old = *p; *p = old + v; return old; }
EMU_ATOMIC_ADD(int)
EMU_ATOMIC_ADD(unsigned int)
EMU_ATOMIC_ADD(unsigned long long)
EMU_ATOMIC_ADD(float)
EMU_ATOMIC_ADD(double)
#define EMU_ATOMIC_CAS_EXCH(T)                                                              \
    EMU_RT inline T atomicCAS(T* p, T expected, T v) {                                      \
        emu::atomic_access(p, sizeof(T)); T old = *p; if (old == expected) *p = v; return old; } \
    EMU_RT inline T atomicExch(T* p, T v) { emu::atomic_access(p, sizeof(T)); T old = *p; *p = v; return old; }
EMU_ATOMIC_CAS_EXCH(int)
EMU_ATOMIC_CAS_EXCH(unsigned int)
EMU_ATOMIC_CAS_EXCH(unsigned long long)
EMU_RT inline int atomicMax(int* p, int v) { emu::atomic_access(p, 4); int old = *p; if (v > old) *p = v; return old; }
EMU_RT inline int atomicMin(int* p, int v) { emu::atomic_access(p, 4); int old = *p; if (v < old) *p = v; return old; }

// bit casts
inline float __int_as_float(int v) { float f; memcpy(&f, &v, 4); return f; }
inline float __uint_as_float(unsigned int v) { float f; memcpy(&f, &v, 4); return f; }
inline int __float_as_int(float f) { int v; memcpy(&v, &f, 4); return v; }
inline unsigned int __float_as_uint(float f) { unsigned int v; memcpy(&v, &f, 4); return v; }
inline double __longlong_as_double(long long v) { double d; memcpy(&d, &v, 8); return d; }
inline long long __double_as_longlong(double d) { long long v; memcpy(&v, &d, 8); return v; }

// CUDA's min/max overloads (the math functions come from <cmath>)
#define EMU_MINMAX(T)                                   \
    inline T min(T a, T b) { return b < a ? b : a; }    \
    inline T max(T a, T b) { return a < b ? b : a; }
EMU_MINMAX(int)
EMU_MINMAX(unsigned int)
EMU_MINMAX(long long)
EMU_MINMAX(unsigned long long)
EMU_MINMAX(float)
EMU_MINMAX(double)
inline float __expf(float v) { return expf(v); }
inline float __logf(float v) { return logf(v); }
inline float rsqrtf(float v) { return 1.0f / sqrtf(v); }
inline double rsqrt(double v) { return 1.0 / sqrt(v); }
inline float __fdividef(float a, float b) { return a / b; }

// ---- vector types ----------------------------------------------------------------------------
#define __align__(n) __attribute__((aligned(n)))
struct __attribute__((aligned(16))) float4 { float x, y, z, w; };
struct __attribute__((aligned(16))) double2 { double x, y; };
struct __attribute__((aligned(16))) uint4 { unsigned int x, y, z, w; };
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
inline double2 make_double2(double x, double y) { return double2{x, y}; }

// ---- the models of common.cuh's PTX wrappers (see "Asynchronous copies and tensor cores") ----
#define MINUNET_EMULATED_PTX 1

template <int BYTES>
EMU_RT inline void async_copy(void* dst, const void* src) {
    using namespace emu;
    static_assert(BYTES == 4 || BYTES == 8 || BYTES == 16, "cp.async copies 4, 8 or 16 bytes");
    const uintptr_t d = (uintptr_t)dst;
    if (d - g.shared_lo >= g.shared_len) fail_in_thread("async_copy: destination %p is not shared memory", dst);
    if (d % BYTES || (uintptr_t)src % BYTES)
        fail_in_thread("async_copy: a %d-byte copy needs %d-byte aligned addresses (%p <- %p)", BYTES, BYTES, dst, src);
    access(src, BYTES, false);
    access(dst, BYTES, true);  // the issuing thread's write, race-checked now; the bytes land later
    const int tid = g.cur_tid;
    if (g.async_count[tid] == MAX_ASYNC) fail_in_thread("async_copy: more than %d copies in flight", MAX_ASYNC);
    AsyncCopy& c = g.async_copies[tid][g.async_count[tid]++];
    c.dst = d;
    c.bytes = BYTES;
    c.group = -1;  // uncommitted
    memcpy(c.data, src, BYTES);
    for (uintptr_t w = (d - g.shared_lo) >> 2; w <= (d - g.shared_lo + BYTES - 1) >> 2; ++w)
        g.async_pending[w] = (unsigned short)(tid + 1);
}

EMU_RT inline void async_commit() {
    using namespace emu;
    const int tid = g.cur_tid, group = ++g.async_committed[tid];
    for (int i = 0; i < g.async_count[tid]; ++i)
        if (g.async_copies[tid][i].group < 0) g.async_copies[tid][i].group = group;
}

template <int PENDING>
EMU_RT inline void async_wait() {
    using namespace emu;
    const int tid = g.cur_tid;
    int kept = 0;
    for (int i = 0; i < g.async_count[tid]; ++i) {
        const AsyncCopy c = g.async_copies[tid][i];
        if (c.group >= 0 && c.group <= g.async_committed[tid] - PENDING) {
            for (uintptr_t w = (c.dst - g.shared_lo) >> 2; w <= (c.dst - g.shared_lo + c.bytes - 1) >> 2; ++w)
                g.async_pending[w] = 0;
            g.async_landing = 1;
            access((void*)c.dst, c.bytes, true);
            g.async_landing = 0;
            memcpy((void*)c.dst, c.data, c.bytes);
        } else {
            g.async_copies[tid][kept++] = c;
        }
    }
    g.async_count[tid] = kept;
}

// to nearest, ties away from zero, at the 13th bit: cvt.rna.tf32.f32 (NaN and infinity pass)
EMU_RT inline unsigned to_tf32(float v) {
    unsigned u;
    memcpy(&u, &v, 4);
    if ((u & 0x7f800000u) != 0x7f800000u) u = (u + 0x1000u) & 0xffffe000u;
    return u;
}

#define mma_tf32_16x8x8(d, a, b) emu_mma_tf32(d, a, b, __FILE__, __LINE__)
EMU_RT inline void emu_mma_tf32(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2], const char* file,
                                int line) {
    emu::MmaFragments m{{d[0], d[1], d[2], d[3]}, {a[0], a[1], a[2], a[3]}, {b[0], b[1]}};
    emu::warp_op<unsigned long long>(emu::WARP_MMA, 0xffffffffu, (unsigned long long)(uintptr_t)&m, 0, 32, file, line);
    for (int e = 0; e < 4; ++e) d[e] = m.d[e];
}

template <typename T>
EMU_RT inline T* table_pointer(const long long* slot, long long n) {
    using namespace emu;
    access(slot, sizeof *slot, false);
    const uintptr_t a = (uintptr_t)*slot;
    if (!a) return nullptr;
    const size_t bytes = (size_t)n * sizeof(T);
    const bool writable = !std::is_const<T>::value;
    const Launch* L = g.launch;
    int lo = 0, hi = L->nexported - 1, found = -1;  // the last exported array starting at or before a
    while (lo <= hi) {
        const int mid = (lo + hi) / 2;
        if (L->exported[2 * mid] <= a) { found = mid; lo = mid + 1; }
        else hi = mid - 1;
    }
    if (n < 0 || found < 0 || a + bytes > L->exported[2 * found] + L->exported[2 * found + 1])
        fail_in_thread("table_pointer: %lld elements (%zu bytes) at %p, read from the table (argument %d), are not "
                       "inside one device array whose address the host took", n, bytes, (void*)a,
                       range_arg_at((uintptr_t)slot));
    for (int i = 0; i < g.nranges; ++i) {
        Range& r = g.ranges[i];
        if (r.lo != a || r.len != bytes) continue;
        if (writable && !r.writable) {  // first seen const, now written through: give it a shadow
            r.writable = 1;
            if (!g.range_shadow[i]) g.range_shadow[i] = (unsigned long long*)calloc(bytes / 4 + 2, sizeof(unsigned long long));
        }
        return (T*)a;
    }
    if (g.nranges == MAX_RANGES) fail_in_thread("table_pointer: more than %d arrays in one launch", MAX_RANGES);
    g.ranges[g.nranges] = Range{a, bytes, writable, range_arg_at((uintptr_t)slot)};
    g.range_shadow[g.nranges] = writable && bytes ? (unsigned long long*)calloc(bytes / 4 + 2, sizeof(unsigned long long)) : nullptr;
    ++g.nranges;
    return (T*)a;
}
