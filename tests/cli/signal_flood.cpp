// signal_flood PID SIGNAL SECONDS: sends SIGNAL to every thread of process PID (tgkill on each
// /proc/PID/task entry, re-read every round so threads started later are hit too) as fast as
// it can for SECONDS, or until the process is gone. Prints how many signals were delivered
// and to how many distinct threads. Exit 0 when at least one signal was delivered.
//
// What it is for: a signal handler that runs on a compute thread inside oneDNN 2.6.3's fp32
// AVX-512 GEMM corrupts the heap (common/signals.h); this is how the tests aim signals at
// those threads.
#include <dirent.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <set>
#include <string>
#include <vector>

namespace {

std::vector<pid_t> threads_of(pid_t pid) {
  std::vector<pid_t> out;
  const std::string dir = "/proc/" + std::to_string(pid) + "/task";
  DIR* d = opendir(dir.c_str());
  if (!d) return out;
  while (dirent* e = readdir(d))
    if (e->d_name[0] != '.') out.push_back(static_cast<pid_t>(std::atoi(e->d_name)));
  closedir(d);
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: signal_flood PID SIGNAL SECONDS\n");
    return 2;
  }
  const pid_t pid = static_cast<pid_t>(std::atoi(argv[1]));
  const int sig = std::atoi(argv[2]);
  const double seconds = std::atof(argv[3]);
  const auto end = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
  long sent = 0;
  std::set<pid_t> hit;
  while (std::chrono::steady_clock::now() < end) {
    const std::vector<pid_t> tids = threads_of(pid);
    if (tids.empty()) break;  // the process has ended
    for (int round = 0; round < 16; ++round)  // round robin: a pending signal is not queued twice
      for (pid_t tid : tids)
        if (syscall(SYS_tgkill, pid, tid, sig) == 0) {
          ++sent;
          hit.insert(tid);
        }
  }
  std::printf("signal_flood: %ld signals %d to %zu threads of pid %d\n", sent, sig, hit.size(), static_cast<int>(pid));
  return sent > 0 ? 0 : 1;
}
