#include "common/signals.h"

#include <pthread.h>
#include <unistd.h>

#include <atomic>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <string>

#include "common/log.h"

namespace shardtune {

namespace {

std::atomic<bool> g_started{false};
std::atomic<bool> g_graceful{false};
std::atomic<int> g_stop_signal{0};

sigset_t stop_set() {
  sigset_t set;
  sigemptyset(&set);
  for (int s : {SIGTERM, SIGINT, SIGUSR1, SIGHUP}) sigaddset(&set, s);
  return set;
}

// Ends the process now: no destructors, no atexit handlers (another thread may be in the
// middle of anything). Under mpirun the launcher then ends the other ranks.
[[noreturn]] void exit_now(int sig, const char* why) {
  char line[160];
  const int n = std::snprintf(line, sizeof(line), "shardtune: %s (%s): exiting now with code %d\n", strsignal(sig), why,
                              128 + sig);
  if (n > 0) (void)!::write(STDERR_FILENO, line, static_cast<size_t>(n));
  ::_exit(128 + sig);
}

void* receive(void*) {
  const sigset_t set = stop_set();
  for (;;) {
    int sig = 0;
    if (sigwait(&set, &sig) != 0) continue;
    if (!g_graceful) exit_now(sig, "no stop point in this command");
    int expected = 0;
    if (g_stop_signal.compare_exchange_strong(expected, sig)) {
      if (spdlog::get("shardtune"))
        spdlog::warn("{}: finishing the step, then writing a checkpoint and exiting{}", strsignal(sig),
                     sig == SIGINT ? " (Ctrl-C again to stop at once)" : "");
    } else if (sig == SIGINT) {
      exit_now(sig, "second interrupt");
    }
  }
  return nullptr;
}

}  // namespace

void start_signal_thread() {
  if (g_started.exchange(true)) return;
  const sigset_t set = stop_set();
  if (int e = pthread_sigmask(SIG_BLOCK, &set, nullptr); e != 0)
    throw std::runtime_error(std::string("pthread_sigmask: ") + std::strerror(e));
  pthread_t thread;
  if (int e = pthread_create(&thread, nullptr, receive, nullptr); e != 0)
    throw std::runtime_error(std::string("cannot start the signal thread: ") + std::strerror(e));
  pthread_detach(thread);  // blocked in sigwait until the process ends
}

void set_graceful_stop(bool graceful) { g_graceful = graceful; }

bool stop_requested() { return g_stop_signal.load() != 0; }

int stop_signal() { return g_stop_signal.load(); }

}  // namespace shardtune
