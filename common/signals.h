// Stop signals (SIGTERM, SIGINT, SIGUSR1, SIGHUP), received on one dedicated thread.
//
// Why not a signal handler: a handler runs on whichever thread the kernel picks, and a
// compute thread can be inside oneDNN 2.6.3's fp32 AVX-512 JIT GEMM (Debian's libdnnl inside
// LibTorch 1.13), which for K > 84 points rsp into a workspace it got from malloc
// (src/cpu/x64/gemm/f32/jit_avx512_common_gemm_f32.cpp ~1455-1467). The kernel then writes the
// signal frame below rsp, over the malloc chunk in front of the workspace, and a later free()
// aborts ("corrupted size vs. prev_size"). Upstream oneDNN #4845, fixed in v3.12 (PR #4855).
// Every frozen fp32 GEMM of a real ViT (K >= 768) takes that path. So the signals are blocked
// in the main thread before any other thread exists (MPI's, OpenMP's, oneDNN's inherit the
// mask) and taken with sigwait() on a thread that never computes. Open MPI's own handlers are
// for faults only (its opal_signal list: SIGABRT, SIGBUS, SIGFPE, SIGSEGV, to print a
// backtrace): those run on the faulting thread by nature, when the process is already lost.
//
// What a signal does:
//   graceful mode (train): the first SIGTERM / SIGUSR1 / SIGHUP / SIGINT sets stop_requested()
//     (the loop finishes the step, checkpoints and exits 0); a second SIGINT ends the process
//     at once with exit code 130 (Ctrl-C twice); further SIGTERM / SIGUSR1 / SIGHUP are ignored.
//   otherwise (predict, merge, ...): the process ends at once with 128 + the signal number, as
//     it would by the default action.
#pragma once

namespace shardtune {

// Blocks the stop signals in the calling thread and starts the receiving thread. Call it
// first thing in main, before anything starts a thread; calling it again does nothing.
void start_signal_thread();

// Whether the first stop signal only requests a stop (true) or ends the process (false).
void set_graceful_stop(bool graceful);

// Set by the first stop signal in graceful mode.
bool stop_requested();

// The signal that requested the stop (0 if none).
int stop_signal();

}  // namespace shardtune
