// Process-wide settings every entry point applies once, before any tensor work.
#pragma once

namespace shardtune {

// Raises glibc malloc's mmap and trim thresholds, and turns its mmap off, so large tensor
// blocks are reused instead of being returned to the kernel and faulted in again each step
// (REFERENCE.md: a ViT-B step ran 1.2x-4.6x slower without this; the eval forward at batch 64
// 1.4x without the last), and sets LibTorch's intra-op threads: the
// OMP_NUM_THREADS value if set, else the cores divided by the ranks on this node.
// Returns the thread count chosen.
int configure_runtime(int local_ranks = 1);

}  // namespace shardtune
