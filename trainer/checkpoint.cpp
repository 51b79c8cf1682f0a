#include "trainer/checkpoint.h"

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>

#include "common/log.h"
#include "io/atomic_file.h"
#include "io/strict_json.h"
#include "models/checkpoint.h"
#include "peft/adapter_io.h"

namespace shardtune {

namespace fs = std::filesystem;

namespace {

constexpr int64_t kFormatVersion = 2;
constexpr const char* kManifest = "manifest.json";
constexpr const char* kOptimizer = "optimizer.safetensors";

using Named = std::vector<std::pair<std::string, torch::Tensor>>;

std::string optimizer_key(const torch::Tensor& p) { return c10::guts::to_string(p.unsafeGetTensorImpl()); }

// This stage's AdamW state by parameter name (parameters that never stepped have none).
Named optimizer_state(const StageModel& b, torch::optim::Optimizer* opt) {
  Named out;
  if (!opt) return out;
  auto& states = opt->state();
  for (const auto& [name, p] : b.peft.trainable) {
    auto it = states.find(optimizer_key(p));
    if (it == states.end()) continue;
    auto& s = static_cast<torch::optim::AdamWParamState&>(*it->second);
    out.emplace_back(name + ".exp_avg", s.exp_avg());
    out.emplace_back(name + ".exp_avg_sq", s.exp_avg_sq());
    out.emplace_back(name + ".step", torch::tensor({s.step()}, torch::kInt64));
  }
  return out;
}

// CRC-32 and size of a file, read in 1 MiB blocks. Throws naming the file when it cannot be read.
std::pair<uint64_t, uint64_t> crc_and_size(const fs::path& file) {
  std::ifstream in(file, std::ios::binary);
  if (!in) throw std::runtime_error(file.string() + ": cannot open: " + std::strerror(errno));
  std::vector<char> buf(1 << 20);
  uLong crc = crc32(0L, Z_NULL, 0);
  uint64_t size = 0;
  while (in) {
    in.read(buf.data(), static_cast<std::streamsize>(buf.size()));
    const auto n = static_cast<size_t>(in.gcount());
    crc = crc32(crc, reinterpret_cast<const Bytef*>(buf.data()), static_cast<uInt>(n));
    size += n;
  }
  if (in.bad()) throw std::runtime_error(file.string() + ": read failed: " + std::strerror(errno));
  return {crc, size};
}

// Every regular file under `dir` but the manifest, as paths relative to it, sorted.
std::vector<std::string> files_under(const fs::path& dir) {
  std::vector<std::string> out;
  for (const auto& e : fs::recursive_directory_iterator(dir))
    if (e.is_regular_file() && e.path().filename() != kManifest) out.push_back(fs::relative(e.path(), dir).string());
  std::sort(out.begin(), out.end());
  return out;
}

void write_manifest(const fs::path& dir, int64_t step) {
  json::Json files = json::Json::object();
  for (const auto& rel : files_under(dir)) {
    auto [crc, size] = crc_and_size(dir / rel);
    files[rel] = {{"bytes", size}, {"crc32", crc}};
  }
  const json::Json m = {{"format_version", kFormatVersion}, {"step", step}, {"files", files}};
  io::write_text_atomically((dir / kManifest).string(), json::dump(m, 2) + "\n");
}

// step_N directories under `root` (temporaries excluded), newest first.
std::vector<std::pair<int64_t, fs::path>> step_dirs(const fs::path& root) {
  std::vector<std::pair<int64_t, fs::path>> out;
  if (!fs::is_directory(root)) return out;
  for (const auto& e : fs::directory_iterator(root)) {
    const std::string name = e.path().filename().string();
    if (!e.is_directory() || name.rfind("step_", 0) != 0 || name.size() == 5 ||
        name.find_first_not_of("0123456789", 5) != std::string::npos)
      continue;
    out.emplace_back(std::stoll(name.substr(5)), e.path());
  }
  std::sort(out.begin(), out.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
  return out;
}

bool is_format1(const fs::path& dir) {
  if (fs::exists(dir / kManifest) || !fs::exists(dir / "trainer_state.json")) return false;
  for (const auto& e : fs::directory_iterator(dir))
    if (e.path().filename().string().rfind("optimizer", 0) == 0 && e.path().extension() == ".pt") return true;
  return false;
}

// Deletes finished checkpoints beyond the newest `keep`; the caller has just written and read
// back the newest, which is never among them. Only the manifest's presence is checked here (reading
// every older checkpoint again would cost a full fine-tuning run gigabytes a save).
void prune(const fs::path& root, int64_t keep) {
  int64_t complete = 0;
  for (const auto& [step, dir] : step_dirs(root)) {
    if (!fs::exists(dir / kManifest) && !is_format1(dir)) continue;  // left for the user to see
    if (++complete > std::max<int64_t>(1, keep)) {
      fs::remove_all(dir);
      spdlog::debug("removed the older checkpoint {}", dir.string());
    }
  }
}

int64_t load_format1_optimizer(const std::string& dir, torch::optim::Optimizer* opt, const json::Json& state,
                               const Mesh& mesh) {
  const int64_t pp = state.contains("pp") ? json::to_int64(state["pp"]) : 1;
  if (pp != mesh.dims.pp)
    throw std::invalid_argument(dir + ": checkpoint written with parallel.pp=" + std::to_string(pp) +
                                ", this run uses parallel.pp=" + std::to_string(mesh.dims.pp) +
                                " (a format-1 checkpoint holds the optimizer state per pipeline stage: resume it with "
                                "parallel.pp=" + std::to_string(pp) + ", or start afresh with output.resume=never)");
  if (opt) {
    const std::string f =
        dir + "/" + (pp == 1 ? std::string("optimizer.pt") : "optimizer_stage" + std::to_string(mesh.pp_rank()) + ".pt");
    if (!fs::exists(f)) throw std::invalid_argument(f + " is missing");
    torch::load(*opt, f);
  }
  return pp;
}

void load_optimizer(const std::string& dir, const StageModel& b, torch::optim::Optimizer* opt) {
  if (!opt) return;
  const std::string file = dir + "/" + kOptimizer;
  CheckpointReader r(file);
  auto& states = opt->state();
  for (const auto& [name, p] : b.peft.trainable) {
    if (!r.contains(name + ".exp_avg")) continue;  // it had not stepped yet
    auto s = std::make_unique<torch::optim::AdamWParamState>();
    for (const char* part : {".exp_avg", ".exp_avg_sq"}) {
      torch::Tensor t = r.read(name + part, torch::kFloat32);
      if (!p.device().is_cpu()) t = t.to(p.device());  // the state lives with its parameter
      if (t.sizes() != p.sizes())
        throw std::invalid_argument(file + ": " + name + part + " has shape " + shape_str(t.sizes().vec()) +
                                    ", the parameter has " + shape_str(p.sizes().vec()));
      std::string(part) == ".exp_avg" ? s->exp_avg(t) : s->exp_avg_sq(t);
    }
    s->step(r.read(name + ".step", torch::kInt64).item<int64_t>());
    states[optimizer_key(p)] = std::move(s);
  }
}

std::string host_name() {
  char h[256] = {};
  ::gethostname(h, sizeof(h) - 1);
  return h;
}

}  // namespace

// --- writing ------------------------------------------------------------------------------

void save_checkpoint(const RunSpec& spec, const StageModel& b, torch::optim::Optimizer* opt, int64_t step,
                     const Mesh& mesh) {
  const fs::path root = fs::path(spec.output.dir) / "checkpoints";
  const fs::path final_dir = root / ("step_" + std::to_string(step));
  const fs::path tmp = root / ("step_" + std::to_string(step) + ".tmp");
  // Gathered onto world rank 0 from every stage: the adapter and the optimizer state.
  auto adapter = gather_trainable(b, mesh);
  auto optim = gather_named(optimizer_state(b, opt), mesh);
  if (mesh.rank != 0) return;
  try {
    fs::remove_all(tmp);
    fs::create_directories(tmp);
    save_adapter((tmp / "adapter").string(), PeftState{spec.peft.method, adapter, {}}, spec.peft, spec.model);
    save_tensors((tmp / kOptimizer).string(), optim);
    save_tensors((tmp / "rng.safetensors").string(), {{"cpu", at::detail::getDefaultCPUGenerator().get_state()}});
    const json::Json state = {{"step", step}, {"method", spec.peft.method}, {"format_version", kFormatVersion}};
    io::write_text_atomically((tmp / "trainer_state.json").string(), json::dump(state, 2) + "\n");
    // Last: the checkpoint is complete once this is on disk. Its CRCs come from reading every
    // file back after its fsync, which is the check before anything older is pruned.
    write_manifest(tmp, step);
    fs::remove_all(final_dir);
    fs::rename(tmp, final_dir);
    io::fsync_directory(root.string());
  } catch (const std::exception& e) {
    std::error_code ignored;
    fs::remove_all(tmp, ignored);  // give a full disk its space back
    throw std::runtime_error("checkpoint " + final_dir.string() + " not written: " + e.what() +
                             " (the earlier checkpoints are intact)");
  }
  spdlog::info("checkpoint written: {}", final_dir.string());
  prune(root, spec.output.keep);
}

void remove_stale_temporaries(const std::string& output_dir) {
  const fs::path root = fs::path(output_dir) / "checkpoints";
  if (!fs::is_directory(root)) return;
  for (const auto& e : fs::directory_iterator(root)) {
    const std::string name = e.path().filename().string();
    if (name.rfind("step_", 0) == 0 && name.size() > 4 && name.compare(name.size() - 4, 4, ".tmp") == 0) {
      spdlog::info("removing {}, left by a run that stopped while writing it", e.path().string());
      fs::remove_all(e.path());
    }
  }
}

// --- reading ------------------------------------------------------------------------------

std::string verify_checkpoint(const std::string& dir_str) {
  const fs::path dir(dir_str);
  if (!fs::is_directory(dir)) return dir_str + " is not a directory";
  if (is_format1(dir)) return "";
  const fs::path manifest = dir / kManifest;
  if (!fs::exists(manifest)) return manifest.string() + " is missing (the checkpoint is incomplete)";
  try {
    const json::Json m = json::parse(io::read_text(manifest.string()));
    std::vector<std::string> listed;
    const json::Json& files = json::at(m, "files");
    if (!files.is_object()) return manifest.string() + ": \"files\" is not an object";
    for (const auto& [rel, f] : files.items()) {
      listed.push_back(rel);
      const fs::path file = dir / rel;
      if (!fs::exists(file)) return file.string() + " is missing";
      auto [crc, size] = crc_and_size(file);
      const uint64_t bytes = json::to_uint64(json::at(f, "bytes"));
      if (size != bytes)
        return file.string() + " has " + std::to_string(size) + " bytes, the manifest says " + std::to_string(bytes) +
               " (truncated?)";
      if (crc != json::to_uint64(json::at(f, "crc32"))) return file.string() + " does not match its CRC-32 in the manifest (corrupted)";
    }
    std::sort(listed.begin(), listed.end());
    for (const auto& rel : {std::string("trainer_state.json"), std::string(kOptimizer)})
      if (!std::binary_search(listed.begin(), listed.end(), rel)) return manifest.string() + " does not list " + rel;
  } catch (const std::exception& e) {
    return manifest.string() + ": " + e.what();
  }
  return "";
}

std::string resume_path(const RunSpec& spec, bool log) {
  if (spec.output.resume == "never") return "";
  if (spec.output.resume != "auto") {
    if (std::string bad = verify_checkpoint(spec.output.resume); !bad.empty())
      throw std::invalid_argument("output.resume=" + spec.output.resume + " is not a complete checkpoint: " + bad);
    return spec.output.resume;
  }
  for (const auto& [step, dir] : step_dirs(fs::path(spec.output.dir) / "checkpoints")) {
    std::string bad = verify_checkpoint(dir.string());
    if (bad.empty()) return dir.string();
    if (log) spdlog::warn("skipping checkpoint {}: {}; trying an older one", dir.string(), bad);
  }
  return "";
}

int64_t load_checkpoint(const std::string& dir, StageModel& b, torch::optim::Optimizer* opt, const RunSpec& spec,
                        const Mesh& mesh) {
  const json::Json state = json::read_file(dir + "/trainer_state.json");
  const std::string& method = json::to_string(json::at(state, "method"));
  if (method != spec.peft.method)
    throw std::invalid_argument(dir + ": checkpoint of peft.method=" + method +
                                ", this run uses peft.method=" + spec.peft.method);
  if (is_format1(dir)) {
    load_format1_optimizer(dir, opt, state, mesh);
  } else {
    load_optimizer(dir, b, opt);
  }
  load_adapter_weights(dir + "/adapter", b.peft,
                       keys_of_other_stages(StagePart::of(spec.model, mesh.pp_rank(), mesh.dims.pp), kAdapterKeyPrefix));
  at::Generator gen = at::detail::getDefaultCPUGenerator();  // a handle to the global generator
  gen.set_state(CheckpointReader(dir + "/rng.safetensors").read("cpu", torch::kUInt8));
  return json::to_int64(json::at(state, "step"));
}

// --- the output.dir lock --------------------------------------------------------------------

OutputDirLock::OutputDirLock(const std::string& dir) {
  const std::string path = dir + "/.lock";
  fd_ = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd_ < 0) throw std::runtime_error(path + ": cannot open: " + std::strerror(errno));
  if (::flock(fd_, LOCK_EX | LOCK_NB) != 0) {
    const int err = errno;
    std::string holder;
    char buf[512];
    ssize_t n = ::pread(fd_, buf, sizeof(buf) - 1, 0);
    if (n > 0) holder.assign(buf, static_cast<size_t>(n));
    while (!holder.empty() && (holder.back() == '\n' || holder.back() == ' ')) holder.pop_back();
    ::close(fd_);
    fd_ = -1;
    if (err == EWOULDBLOCK)
      throw std::runtime_error("output.dir=" + dir + " is in use by another run (" +
                               (holder.empty() ? std::string("holder unknown") : holder) +
                               "): wait for it to end or choose another output.dir");
    throw std::runtime_error(path + ": flock: " + std::strerror(err));
  }
  const std::time_t now = std::time(nullptr);
  char when[64];
  std::strftime(when, sizeof(when), "%Y-%m-%d %H:%M:%S %Z", std::localtime(&now));
  const std::string me = "pid " + std::to_string(::getpid()) + " on " + host_name() + " since " + when + "\n";
  if (::ftruncate(fd_, 0) != 0 || ::pwrite(fd_, me.data(), me.size(), 0) != static_cast<ssize_t>(me.size()))
    spdlog::warn("{}: cannot record the lock holder: {}", path, std::strerror(errno));
}

OutputDirLock::~OutputDirLock() {
  if (fd_ >= 0) ::close(fd_);  // closing releases the flock
}

}  // namespace shardtune
