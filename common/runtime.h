// Process-wide settings every entry point applies once, before any tensor work.
#pragma once

namespace shardtune {

// Raises glibc malloc's mmap and trim thresholds so large tensor blocks are reused instead
// of being returned to the kernel and faulted in again each step (REFERENCE.md: a ViT-B
// step ran 1.2x-4.6x slower without this), and sets LibTorch's intra-op threads: the
// OMP_NUM_THREADS value if set, else the cores divided by the ranks on this node.
// Returns the thread count chosen.
int configure_runtime(int local_ranks = 1);

// Once the model is loaded, before its steps or eval batches: glibc malloc stops using mmap,
// so blocks above its 32 MiB mmap ceiling are reused from the heap too (fp32 eval forward of
// ViT-B at batch 64: 11.5 s against 16.4 s a batch). MALLOC_MMAP_MAX_, if set, decides instead.
void reuse_large_blocks();

}  // namespace shardtune
