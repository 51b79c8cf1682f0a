#include "ops/tuner.h"

#include <spdlog/spdlog.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>
#include <torch/version.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <exception>
#include <fstream>
#include <sstream>
#include <stdexcept>

#include "io/atomic_file.h"

namespace shardtune::ops {

namespace {

constexpr int kFormatVersion = 2;  // 2: stored keys name their candidates
// A candidate whose probe takes this many times the best probe is not timed further.
constexpr double kProbeCutoff = 4.0;

double seconds_of(const std::function<void()>& f) {
  const auto t0 = std::chrono::steady_clock::now();
  f();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

std::string cpuinfo_field(const std::string& field) {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind(field, 0) == 0) {
      auto colon = line.find(':');
      if (colon != std::string::npos) return line.substr(colon + (colon + 1 < line.size() ? 2 : 1));
    }
  return "unknown";
}

uint64_t fnv1a(const std::string& s) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
  return h;
}

std::string hex(uint64_t v) {
  std::ostringstream o;
  o << std::hex << v;
  return o.str();
}

void make_dirs(const std::string& dir) {
  for (size_t pos = 1; pos != std::string::npos;) {
    pos = dir.find('/', pos + 1);
    ::mkdir(dir.substr(0, pos).c_str(), 0755);
  }
}

// An exclusive flock on `path` for a scope (none when `path` is empty or cannot be opened):
// the ranks of a node that share a cache measure one at a time, so they do not time each
// other's work, and each key is measured once and then adopted by all.
class FileLock {
 public:
  explicit FileLock(const std::string& path) {
    if (path.empty()) return;
    fd_ = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd_ >= 0 && ::flock(fd_, LOCK_EX) != 0) {
      ::close(fd_);
      fd_ = -1;
    }
  }
  ~FileLock() {
    if (fd_ >= 0) ::close(fd_);  // releases the lock
  }
  FileLock(const FileLock&) = delete;
  FileLock& operator=(const FileLock&) = delete;

 private:
  int fd_ = -1;
};

}  // namespace

Tuner::Tuner(std::string cache_file, int repetitions)
    : cache_file_(std::move(cache_file)), repetitions_(std::max(1, repetitions)) {}

std::string Tuner::host_identity() {
  return cpuinfo_field("model name") + "; flags " + hex(fnv1a(cpuinfo_field("flags"))) + "; libtorch " +
         TORCH_VERSION;
}

std::string Tuner::resolve_cache_dir(const std::string& dir) {
  if (dir == "-") return "";
  if (!dir.empty()) return dir;
  if (const char* x = std::getenv("XDG_CACHE_HOME"); x && *x) return std::string(x) + "/shardtune";
  if (const char* home = std::getenv("HOME"); home && *home) return std::string(home) + "/.cache/shardtune";
  return "";
}

std::string Tuner::cache_file_in(const std::string& dir) {
  return dir.empty() ? "" : dir + "/kernels-" + hex(fnv1a(host_identity())) + ".json";
}

void Tuner::load_locked() {
  if (cache_file_.empty()) return;
  std::ifstream in(cache_file_);
  if (!in) return;  // no cache yet
  try {
    nlohmann::json j = nlohmann::json::parse(in);
    if (j.value("format_version", 0) != kFormatVersion)
      throw std::runtime_error("format_version " + j.value("format_version", nlohmann::json()).dump() +
                               " is not " + std::to_string(kFormatVersion));
    const std::string host = j.at("host").get<std::string>();
    if (host != host_identity()) throw std::runtime_error("written for another host (" + host + ")");
    std::map<std::string, Choice> read;
    for (const auto& [key, v] : j.at("choices").items()) {
      Choice c;
      c.pick = v.at("pick").get<std::string>();
      for (const auto& [name, us] : v.at("us").items()) c.us[name] = us.get<double>();
      c.cached = true;
      read[key] = c;
    }
    // What this process already uses stays; the file adds the rest.
    for (auto& [key, c] : read) choices_.emplace(key, c);
  } catch (const std::exception& e) {
    if (!warned_) spdlog::warn("ignoring the kernel-choice cache {}: {}", cache_file_, e.what());
    warned_ = true;
  }
}

void Tuner::save_locked() {
  if (cache_file_.empty()) return;
  nlohmann::json choices = nlohmann::json::object();
  // Keep what other processes (other ranks, other runs) added since this one read the file.
  try {
    std::ifstream in(cache_file_);
    if (in) {
      nlohmann::json old = nlohmann::json::parse(in);
      if (old.value("format_version", 0) == kFormatVersion && old.value("host", "") == host_identity())
        choices = old.at("choices");
    }
  } catch (const std::exception&) {
    // unreadable: rewritten below
  }
  for (const auto& [key, c] : choices_)
    if (!choices.contains(key)) choices[key] = {{"pick", c.pick}, {"us", c.us}};
  nlohmann::json j = {{"format_version", kFormatVersion}, {"host", host_identity()}, {"choices", choices}};
  try {
    io::write_text_atomically(cache_file_, j.dump(1) + "\n");
  } catch (const std::exception& e) {
    spdlog::warn("cannot write the kernel-choice cache: {}", e.what());
  }
}

std::string Tuner::choose(const std::string& plain_key, const std::vector<Candidate>& candidates) {
  if (candidates.empty()) throw std::logic_error("Tuner::choose(" + plain_key + "): no candidates");
  // The candidates' names are part of the stored key: a choice measured among other candidates
  // (an earlier build's, one without oneDNN's headers) is not this one's, and is measured again.
  std::string key = plain_key + kCandidatesOpen;
  for (size_t i = 0; i < candidates.size(); ++i) key += (i ? "," : "") + candidates[i].name;
  key += "}";
  std::lock_guard<std::mutex> lock(mutex_);
  auto known = [&]() -> const Candidate* {
    auto it = choices_.find(key);
    if (it == choices_.end()) return nullptr;
    for (const auto& c : candidates)
      if (c.name == it->second.pick) {
        it->second.used = true;
        return &c;
      }
    choices_.erase(it);  // a cached pick that is no longer a candidate: measure again
    return nullptr;
  };
  if (const Candidate* c = known()) return c->name;
  // A new key: under the cache's lock, see whether another process has measured it meanwhile.
  if (!cache_file_.empty()) make_dirs(cache_file_.substr(0, cache_file_.find_last_of('/')));
  FileLock file_lock(cache_file_.empty() ? "" : cache_file_ + ".lock");
  load_locked();
  if (const Candidate* c = known()) return c->name;
  const auto t_start = std::chrono::steady_clock::now();
  // Probe: one small call each; drop those far behind the best, and those that fail.
  std::vector<std::pair<const Candidate*, double>> probed;
  std::exception_ptr first_error;
  for (const auto& c : candidates) {
    try {
      c.run(true);  // untimed: a kernel's first call pays its set-up (oneDNN builds a primitive: ~40 ms)
      probed.emplace_back(&c, seconds_of([&] { c.run(true); }));
    } catch (const std::exception& e) {
      spdlog::debug("kernel candidate {} for {} failed: {}", c.name, key, e.what());
      if (!first_error) first_error = std::current_exception();
    }
  }
  if (probed.empty()) std::rethrow_exception(first_error);
  double best_probe = probed.front().second;
  for (const auto& p : probed) best_probe = std::min(best_probe, p.second);
  Choice choice;
  double best = 0;
  for (const auto& [c, probe] : probed) {
    if (probe > kProbeCutoff * best_probe && probed.size() > 1) {
      choice.us[c->name + " (probe)"] = probe * 1e6;
      continue;
    }
    c->run(false);  // warm-up: first-touch of outputs, oneDNN's primitive cache
    std::vector<double> times;
    for (int r = 0; r < repetitions_; ++r) times.push_back(seconds_of([&] { c->run(false); }));
    std::sort(times.begin(), times.end());
    const double median = times[times.size() / 2];
    choice.us[c->name] = median * 1e6;
    if (choice.pick.empty() || median < best) choice.pick = c->name, best = median;
  }
  seconds_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count();
  choice.used = true;
  choices_[key] = choice;
  save_locked();
  return choice.pick;
}

std::map<std::string, Tuner::Choice> Tuner::choices() const {
  std::lock_guard<std::mutex> lock(mutex_);
  std::map<std::string, Choice> used;
  for (const auto& [key, c] : choices_)
    if (c.used) used[key.substr(0, key.find(kCandidatesOpen))] = c;
  return used;
}

double Tuner::seconds_measuring() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return seconds_;
}

}  // namespace shardtune::ops
