// Training checkpoints, independent of the mesh, and the lock on output.dir.
//
// output.dir/checkpoints/step_N/
//   adapter/                  adapter_model.safetensors + adapter_config.json (full tensors)
//   optimizer.safetensors     AdamW state of every trainable tensor, full, by parameter name:
//                             "<name>.exp_avg", "<name>.exp_avg_sq" (F32), "<name>.step" (I64 [1])
//   rng.safetensors           the CPU generator's state
//   trainer_state.json        step, method, format_version
//   manifest.json             written last: every other file with its size and CRC-32
// Nothing in it depends on (dp, tp, pp) or on the stage split, so a run stopped on one mesh
// resumes on any other valid mesh. A checkpoint is written into step_N.tmp and renamed once
// its manifest is on disk; resume trusts a directory only when every file matches the
// manifest, so a torn, truncated or corrupted checkpoint is never taken for a complete one.
//
// Older checkpoints (format 1: optimizer.pt or one optimizer_stageS.pt per pipeline stage, no
// manifest) still resume on a mesh with their parallel.pp.
#pragma once

#include <torch/torch.h>

#include <string>

#include "distributed/mesh.h"
#include "sharding/stage_model.h"
#include "trainer/trainer.h"

namespace shardtune {

// Writes checkpoints/step_`step` (all ranks call it; world rank 0 writes), reads every file
// back into its manifest, then deletes complete checkpoints older than the newest output.keep. On a failed write (a full
// disk, an I/O error) the partial directory is removed, the earlier checkpoints are left as
// they were, and std::runtime_error names the file and the OS's message.
void save_checkpoint(const RunSpec& spec, const StageModel& b, torch::optim::Optimizer* opt, int64_t step,
                     const Mesh& mesh);

// Removes checkpoints/step_N.tmp directories a killed run left (call it holding the lock).
void remove_stale_temporaries(const std::string& output_dir);

// The checkpoint output.resume asks for: "" for a fresh start (never, or auto with no complete
// checkpoint). auto takes the newest complete one, warning (when `log`) about each newer one it
// skips and why; an explicit PATH that fails verification throws std::invalid_argument naming
// the file.
std::string resume_path(const RunSpec& spec, bool log);

// Loads a checkpoint into this rank's stage and optimizer (all ranks call it). Returns its step.
int64_t load_checkpoint(const std::string& dir, StageModel& b, torch::optim::Optimizer* opt, const RunSpec& spec,
                        const Mesh& mesh);

// "" when `dir` is a complete checkpoint (every file as its manifest says), else what is wrong,
// naming the file. Format-1 checkpoints (no manifest) count as complete when their
// trainer_state.json and optimizer files exist.
std::string verify_checkpoint(const std::string& dir);

// An exclusive advisory lock (flock) on output.dir/.lock for the lifetime of the object, so two
// runs never write the same output.dir; the kernel releases it when the holder dies. The file
// names the holder (pid, host, start time). Throws std::runtime_error naming the directory and
// the holder when another process has it.
class OutputDirLock {
 public:
  explicit OutputDirLock(const std::string& dir);
  ~OutputDirLock();
  OutputDirLock(const OutputDirLock&) = delete;
  OutputDirLock& operator=(const OutputDirLock&) = delete;

 private:
  int fd_ = -1;
};

}  // namespace shardtune
