/* A stand-in libnccl.so.2 for the CPU machines' tests: NCCL's C ABI (nccl.h), no GPU. It
 * records what the bootstrap hands ncclCommInitRank (fake_nccl_last_init) and fails on
 * request: FAKE_NCCL_FAIL=unique_id makes ncclGetUniqueId fail, =init ncclCommInitRank.
 * Collectives are not faked: the process group sends CPU tensors to MPI and has no CUDA
 * tensors here. Built with -DFAKE_NCCL_PARTIAL it exports two symbols only (the loader's
 * "symbol missing" path). */
#include <stdlib.h>
#include <string.h>

typedef struct { char internal[128]; } ncclUniqueId;

int ncclGetVersion(int* v) { *v = 21903; return 0; }
const char* ncclGetErrorString(int r) { return r == 5 ? "invalid usage (fake)" : "fake NCCL error"; }

#ifndef FAKE_NCCL_PARTIAL
static int fail(const char* what) {
  const char* f = getenv("FAKE_NCCL_FAIL");
  return f && strcmp(f, what) == 0;
}
static ncclUniqueId last_id;
static int last_nranks = -1, last_rank = -1, comms = 0;

int ncclGetUniqueId(ncclUniqueId* id) {
  if (fail("unique_id")) return 2;
  for (int i = 0; i < 128; ++i) id->internal[i] = (char)(i * 7 + 3);
  return 0;
}
int ncclCommInitRank(void** comm, int nranks, ncclUniqueId id, int rank) {
  if (fail("init")) return 5;
  last_id = id;
  last_nranks = nranks;
  last_rank = rank;
  ++comms;
  *comm = &last_id;
  return 0;
}
/* The last ncclCommInitRank's arguments, and how many communicators are alive. */
int fake_nccl_last_init(ncclUniqueId* id, int* nranks, int* rank) {
  *id = last_id;
  *nranks = last_nranks;
  *rank = last_rank;
  return comms;
}
int ncclAllReduce(void) { return 5; }
int ncclBroadcast(void) { return 5; }
int ncclAllGather(void) { return 5; }
int ncclReduceScatter(void) { return 5; }
int ncclSend(void) { return 5; }
int ncclRecv(void) { return 5; }
int ncclGroupStart(void) { return 0; }
int ncclGroupEnd(void) { return 0; }
int ncclCommGetAsyncError(void* c, int* r) { (void)c; *r = 0; return 0; }
int ncclCommAbort(void* c) { (void)c; --comms; return 0; }
int ncclCommDestroy(void* c) { (void)c; --comms; return 0; }
#endif
