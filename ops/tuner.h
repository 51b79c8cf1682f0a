// Choosing among exact implementations of one computation by timing them on this host, once.
//
// The same CPU model name delivers very different GEMM rates on different hosts (REFERENCE.md:
// 195 against 361 GFLOP/s fp32 on a 4096^2 matmul; oneDNN's inner product 1.9x BLAS on one,
// slower on another), and bf16 GEMMs run 100x slower than fp32 ones where the CPU has no
// AVX-512 BF16 (LibTorch then falls back to its reference loop). So a kernel fixed at build
// time is wrong somewhere. The Tuner times each candidate at the first call with a new key
// (shape, dtype, direction, threads), keeps the fastest, and records it in a cache file per host
// (CPU model, its flags, LibTorch version), so a second run pays nothing. A cache that cannot be
// read, or one written for another host or format, is ignored with a warning and rewritten.
// Processes sharing a cache file (the ranks of a node) measure one at a time under a lock on
// it, and a key measured by one is adopted by the others: every rank, and every later run, of
// a host takes the same kernel for the same GEMM, so a resumed run is bit-identical.
#pragma once

#include <functional>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace shardtune::ops {

class Tuner {
 public:
  struct Candidate {
    std::string name;
    // Runs the computation once; `probe` true: on a small slice of the input (a first, cheap
    // look that drops candidates far slower than the best, e.g. a 100x slower bf16 GEMM).
    std::function<void(bool probe)> run;
  };
  struct Choice {
    std::string pick;
    std::map<std::string, double> us;  // median microseconds per call of each timed candidate
    bool cached = false;               // read from the cache file, not measured in this process
    bool used = false;                 // asked for by this process
  };

  // `cache_file` empty: nothing is read or written. `repetitions`: timed calls per candidate.
  Tuner(std::string cache_file, int repetitions);

  // The name of the fastest candidate for `key`: remembered, from the cache file, or measured
  // now. A candidate that throws is left out (its error at debug level); if all throw, the
  // first one's exception propagates. Thread-safe.
  std::string choose(const std::string& key, const std::vector<Candidate>& candidates);

  // The choices this process asked for, by key (as given to choose).
  std::map<std::string, Choice> choices() const;
  double seconds_measuring() const;  // wall time spent timing candidates in this process
  const std::string& cache_file() const { return cache_file_; }

  // A file name for this host's cache inside `dir`: kernels-<hash of the host's identity>.json.
  static std::string cache_file_in(const std::string& dir);
  // "" -> $XDG_CACHE_HOME/shardtune, else ~/.cache/shardtune; "-" -> "" (no cache).
  static std::string resolve_cache_dir(const std::string& dir);
  // CPU model, a hash of its flags, LibTorch's version: what a cached choice depends on
  // besides the key.
  static std::string host_identity();

 private:
  // Both under mutex_ and the cache file's lock: load adds the file's entries this process
  // lacks; save writes the file's entries plus this process's new ones (the first measurement
  // of a key wins, so every process sharing the cache uses the same kernel for it).
  void load_locked();
  // Stored keys are "<key> {<candidate>,<candidate>...}".
  static constexpr const char* kCandidatesOpen = " {";
  void save_locked();

  std::string cache_file_;
  int repetitions_;
  mutable std::mutex mutex_;
  bool warned_ = false;
  std::map<std::string, Choice> choices_;
  double seconds_ = 0;
};

}  // namespace shardtune::ops
