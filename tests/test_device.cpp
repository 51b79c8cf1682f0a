// The GPU path's rules, checked on the CPU: local rank, device and backend selection
// (common/device.h), the NCCL / CUDA runtime loader (distributed/nccl_api.h) against missing
// and fake libraries, and NCCL's ABI values (distributed/nccl_process_group.h).
#include <gtest/gtest.h>

#include <map>
#include <set>

#include "common/device.h"
#include "common/torch_device.h"
#include "distributed/nccl_api.h"
#include "distributed/nccl_process_group.h"
#include "peft/method.h"
#include "tests/tiny.h"

using namespace shardtune;

namespace {

EnvLookup env_of(std::map<std::string, std::string> vars) {
  return [vars = std::move(vars)](const char* name) -> const char* {
    auto it = vars.find(name);
    return it == vars.end() ? nullptr : it->second.c_str();
  };
}

// The message of the invalid_argument `f` throws ("" when it throws none).
template <typename F>
std::string error_of(F f) {
  try {
    f();
  } catch (const std::invalid_argument& e) {
    return e.what();
  }
  return "";
}

}  // namespace

// --- the local rank -----------------------------------------------------------------------

TEST(LocalRank, EachSourceInOrder) {
  struct Case {
    std::map<std::string, std::string> env;
    int shm_rank, shm_size;
    int rank, size;
    const char* from;
  };
  const Case cases[] = {
      {{}, 2, 4, 2, 4, "MPI_Comm_split_type"},
      {{{"SLURM_LOCALID", "3"}}, 0, 4, 3, 4, "SLURM_LOCALID"},
      {{{"OMPI_COMM_WORLD_LOCAL_RANK", "1"}}, 0, 2, 1, 2, "OMPI_COMM_WORLD_LOCAL_RANK"},
      {{{"OMPI_COMM_WORLD_LOCAL_RANK", "1"}, {"OMPI_COMM_WORLD_LOCAL_SIZE", "8"}}, 0, 2, 1, 8,
       "OMPI_COMM_WORLD_LOCAL_RANK"},
      // Open MPI's variable wins over Slurm's (mpirun inside an allocation sets both).
      {{{"OMPI_COMM_WORLD_LOCAL_RANK", "0"}, {"SLURM_LOCALID", "5"}}, 1, 6, 0, 6, "OMPI_COMM_WORLD_LOCAL_RANK"},
  };
  for (const auto& c : cases) {
    const LocalRank l = local_rank_from(env_of(c.env), c.shm_rank, c.shm_size);
    EXPECT_EQ(l.rank, c.rank) << c.from;
    EXPECT_EQ(l.size, c.size) << c.from;
    EXPECT_EQ(l.from, c.from);
  }
}

TEST(LocalRank, BadValuesNameTheVariable) {
  EXPECT_EQ(error_of([] { local_rank_from(env_of({{"OMPI_COMM_WORLD_LOCAL_RANK", "x1"}}), 0, 1); }),
            "OMPI_COMM_WORLD_LOCAL_RANK=x1 is not a local rank (a non-negative integer)");
  EXPECT_EQ(error_of([] { local_rank_from(env_of({{"SLURM_LOCALID", "-1"}}), 0, 1); }),
            "SLURM_LOCALID=-1 is not a local rank (a non-negative integer)");
  EXPECT_EQ(error_of([] { local_rank_from(env_of({{"SLURM_LOCALID", "4"}}), 0, 2); }),
            "SLURM_LOCALID=4 is not below the 2 rank(s) on this node");
}

// --- the device ----------------------------------------------------------------------------

TEST(ChooseDevice, Rules) {
  const LocalRank two_of_four{2, 4, "SLURM_LOCALID"};
  const DeviceFacts cpu_build{false, 0}, no_gpu{true, 0}, four_gpus{true, 4};
  EXPECT_EQ(choose_device("cpu", four_gpus, two_of_four).str(), "cpu");
  EXPECT_EQ(choose_device("auto", cpu_build, two_of_four).str(), "cpu");
  EXPECT_EQ(choose_device("auto", no_gpu, two_of_four).str(), "cpu");
  EXPECT_EQ(choose_device("auto", four_gpus, two_of_four).str(), "cuda:2");  // the local rank's GPU
  EXPECT_EQ(choose_device("cuda", four_gpus, two_of_four).str(), "cuda:2");
}

TEST(ChooseDevice, ErrorsNameTheKey) {
  const LocalRank one{0, 1, "MPI_Comm_split_type"};
  EXPECT_EQ(error_of([&] { choose_device("gpu", {true, 1}, one); }), "parallel.device=gpu is not one of auto, cpu, cuda");
  EXPECT_NE(error_of([&] { choose_device("cuda", {false, 0}, one); })
                .find("parallel.device=cuda: this shardtune is built against a LibTorch without CUDA"),
            std::string::npos);
  EXPECT_NE(error_of([&] { choose_device("cuda", {true, 0}, one); })
                .find("parallel.device=cuda: no GPU is visible to this process"),
            std::string::npos);
}

TEST(ChooseDevice, TooManyRanksPerNode) {
  const std::string e = error_of([] { choose_device("cuda", {true, 2}, {1, 3, "OMPI_COMM_WORLD_LOCAL_RANK"}); });
  EXPECT_EQ(e, "parallel.device=cuda: 3 ranks on this node but 2 GPU(s): one GPU per rank (local rank 1 from "
               "OMPI_COMM_WORLD_LOCAL_RANK); start at most 2 ranks per node or set parallel.device=cpu");
  // auto does not fall back to the CPU on a GPU node with too few GPUs: that would be a surprise.
  EXPECT_NE(error_of([] { choose_device("auto", {true, 1}, {0, 2, "MPI_Comm_split_type"}); })
                .find("parallel.device=auto: 2 ranks on this node but 1 GPU(s)"),
            std::string::npos);
}

TEST(ChooseDevice, ThisBuild) {
  // What a CPU LibTorch build says when asked for cuda (the CUDA build takes the GPU path).
  if (torch_device::built_with_cuda()) GTEST_SKIP() << "LibTorch with CUDA: the GPU tests cover this build";
  EXPECT_EQ(torch_device::gpu_count(), 0);
  const DeviceFacts facts{torch_device::built_with_cuda(), torch_device::gpu_count()};
  EXPECT_NE(error_of([&] { choose_device("cuda", facts, {0, 1, "MPI_Comm_split_type"}); }).find("without CUDA"),
            std::string::npos);
  EXPECT_THROW(torch_device::name(0), std::logic_error);
}

// --- the backend ---------------------------------------------------------------------------

TEST(ChooseBackend, Rules) {
  const DeviceChoice cpu{}, gpu{DeviceKind::Cuda, 0};
  const std::string missing = "libnccl.so.2: cannot open shared object file: No such file or directory";
  EXPECT_EQ(choose_backend("auto", cpu, 4, missing), Backend::Mpi);
  EXPECT_EQ(choose_backend("auto", cpu, 4, ""), Backend::Mpi);
  EXPECT_EQ(choose_backend("auto", gpu, 4, ""), Backend::Nccl);
  EXPECT_EQ(choose_backend("auto", gpu, 1, missing), Backend::Mpi);  // a world of one moves nothing
  EXPECT_EQ(choose_backend("mpi", cpu, 4, ""), Backend::Mpi);
  EXPECT_EQ(choose_backend("mpi", gpu, 1, ""), Backend::Mpi);
  EXPECT_EQ(choose_backend("nccl", gpu, 2, ""), Backend::Nccl);
  EXPECT_EQ(backend_name(Backend::Nccl), "nccl");
  EXPECT_EQ(backend_name(Backend::Mpi), "mpi");
}

TEST(ChooseBackend, ErrorsNameTheKeyAndTheLibrary) {
  const DeviceChoice cpu{}, gpu{DeviceKind::Cuda, 1};
  const std::string missing = "libnccl.so.2: cannot open shared object file: No such file or directory";
  EXPECT_EQ(error_of([&] { choose_backend("gloo", cpu, 1, ""); }), "parallel.backend=gloo is not one of auto, mpi, nccl");
  EXPECT_EQ(error_of([&] { choose_backend("nccl", cpu, 2, missing); }),
            "parallel.backend=nccl: libnccl.so.2 cannot be loaded (" + missing +
                "); put NCCL's lib/ on LD_LIBRARY_PATH or set parallel.backend=mpi");
  EXPECT_EQ(error_of([&] { choose_backend("nccl", cpu, 2, ""); }),
            "parallel.backend=nccl needs parallel.device=cuda (NCCL moves GPU memory); this rank runs on cpu");
  EXPECT_NE(error_of([&] { choose_backend("mpi", gpu, 2, ""); }).find("the MPI process group takes CPU tensors only"),
            std::string::npos);
  const std::string e = error_of([&] { choose_backend("auto", gpu, 2, missing); });
  EXPECT_NE(e.find("parallel.backend=auto"), std::string::npos) << e;
  EXPECT_NE(e.find("libnccl.so.2 cannot be loaded"), std::string::npos) << e;
}

// --- figures -------------------------------------------------------------------------------

TEST(Bf16Peak, Table) {
  EXPECT_EQ(bf16_peak_flops("NVIDIA H100 80GB HBM3").value_or(0), 989e12);
  EXPECT_EQ(bf16_peak_flops("NVIDIA H200").value_or(0), 989e12);
  EXPECT_EQ(bf16_peak_flops("NVIDIA H100 PCIe").value_or(0), 756e12);
  EXPECT_EQ(bf16_peak_flops("NVIDIA A100-SXM4-80GB").value_or(0), 312e12);
  EXPECT_FALSE(bf16_peak_flops("NVIDIA GeForce RTX 4090").has_value());
}

// --- the loader ----------------------------------------------------------------------------

TEST(NcclLoader, LibraryNotFound) {
  std::string error;
  EXPECT_EQ(load_nccl({"/nonexistent/libnccl.so.2", "libshardtune_no_such_nccl.so.2"}, &error), nullptr);
  EXPECT_NE(error.find("/nonexistent/libnccl.so.2: cannot open shared object file"), std::string::npos) << error;
  EXPECT_NE(error.find("libshardtune_no_such_nccl.so.2"), std::string::npos) << error;  // every name tried
  EXPECT_EQ(load_cudart({"/nonexistent/libcudart.so.12"}, &error), nullptr);
  EXPECT_NE(error.find("/nonexistent/libcudart.so.12"), std::string::npos) << error;
}

TEST(NcclLoader, SymbolMissing) {
  std::string error;
  EXPECT_EQ(load_nccl({FAKE_NCCL_PARTIAL}, &error), nullptr);
  EXPECT_EQ(error, std::string(FAKE_NCCL_PARTIAL) + ": symbol ncclGetUniqueId missing");
  // The next name is tried after one that lacks a symbol.
  auto api = load_nccl({FAKE_NCCL_PARTIAL, FAKE_NCCL}, &error);
  ASSERT_NE(api, nullptr) << error;
  EXPECT_EQ(api->path, FAKE_NCCL);
  EXPECT_EQ(api->version, 21903);
  EXPECT_THROW(api->check(5, "x"), std::runtime_error);
  try {
    api->check(5, "tp group allreduce");
  } catch (const std::runtime_error& e) {
    EXPECT_STREQ(e.what(), "tp group allreduce: NCCL error 5 (invalid usage (fake))");  // ncclGetErrorString's text
  }
  EXPECT_NO_THROW(api->check(0, "x"));
  auto cuda = load_cudart({FAKE_CUDART}, &error);
  ASSERT_NE(cuda, nullptr) << error;
  EXPECT_EQ(cuda->path, FAKE_CUDART);
}

TEST(NcclLoader, DefaultNames) {
  setenv("SHARDTUNE_NCCL_LIBRARY", "/opt/x/libnccl.so.2", 1);
  EXPECT_EQ(nccl_library_names(), std::vector<std::string>{"/opt/x/libnccl.so.2"});  // alone: the user's choice
  unsetenv("SHARDTUNE_NCCL_LIBRARY");
  EXPECT_EQ(nccl_library_names(), std::vector<std::string>{"libnccl.so.2"});
  EXPECT_EQ(cudart_library_names(),
            (std::vector<std::string>{"libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0", "libcudart.so"}));
}

// --- NCCL's ABI ------------------------------------------------------------------------------

TEST(NcclAbi, ValuesOfNcclH) {
  EXPECT_EQ(sizeof(ncclUniqueId), 128u);
  const int v = 21903;
  EXPECT_EQ(nccl_dtype(torch::kUInt8, v), 1);
  EXPECT_EQ(nccl_dtype(torch::kInt64, v), 4);
  EXPECT_EQ(nccl_dtype(torch::kFloat16, v), 6);
  EXPECT_EQ(nccl_dtype(torch::kFloat32, v), 7);
  EXPECT_EQ(nccl_dtype(torch::kFloat64, v), 8);
  EXPECT_EQ(nccl_dtype(torch::kBFloat16, v), 9);
  EXPECT_THROW(nccl_dtype(torch::kBFloat16, 20903), std::invalid_argument);  // bf16 since 2.10
  EXPECT_EQ(error_of([] { nccl_dtype(torch::kInt32, 21903); }), "dtype Int is not supported by the NCCL group");
  bool div = true;
  EXPECT_EQ(nccl_op(ReduceOp::Sum, torch::kFloat32, v, &div), 0);
  EXPECT_FALSE(div);
  EXPECT_EQ(nccl_op(ReduceOp::Max, torch::kBFloat16, v, &div), 2);
  EXPECT_EQ(nccl_op(ReduceOp::Avg, torch::kFloat32, v, &div), 4);  // ncclAvg
  EXPECT_FALSE(div);
  EXPECT_EQ(nccl_op(ReduceOp::Avg, torch::kInt64, v, &div), 0);  // sum, then divide with truncation
  EXPECT_TRUE(div);
  EXPECT_EQ(nccl_op(ReduceOp::Avg, torch::kFloat32, 20903, &div), 0);  // no ncclAvg before 2.10
  EXPECT_TRUE(div);
}

// Where a real NCCL is installed (some CPU machines carry one with a CUDA toolkit), the table
// binds against it and the ABI's facts hold: every symbol, ncclResult_t's meanings, a 128-byte
// unique id made without a GPU.
TEST(NcclAbi, TheRealLibraryWhereInstalled) {
  std::string error;
  auto api = load_nccl({"libnccl.so.2"}, &error);
  if (!api) GTEST_SKIP() << "no libnccl.so.2 on this machine: " << error;
  EXPECT_GE(api->version, 21000) << api->path;
  EXPECT_STREQ(api->GetErrorString(0), "no error");
  EXPECT_NE(std::string(api->GetErrorString(4)).find("invalid argument"), std::string::npos);
  EXPECT_NE(std::string(api->GetErrorString(5)).find("invalid usage"), std::string::npos);
  ncclUniqueId id{};
  ASSERT_EQ(api->GetUniqueId(&id), 0);
  int nonzero = 0;
  for (char c : id.internal) nonzero += c != 0;
  EXPECT_GT(nonzero, 0);
}

// --- placement of a model ------------------------------------------------------------------

// The trainer moves a stage with Module::to (trainer/trainer.cpp, place_model) and keeps
// using the PEFT state's handles: right only if every trainable tensor of every method is a
// registered parameter or buffer of the model (Module::to moves exactly those, in place).
// (The meta device cannot stand in for cuda here: set_data refuses it.)
TEST(DevicePlacement, EveryMethodsTrainableTensorsAreTheModelsOwn) {
  for (const auto& method : MethodRegistry::instance().names()) {
    if (method == "none") continue;
    torch::manual_seed(0);
    VisionTransformer m(tiny_config());
    PeftConfig p;
    p.method = method;
    PeftState s = apply_peft(*m, p);
    std::set<const void*> owned;
    for (const auto& t : m->parameters()) owned.insert(t.unsafeGetTensorImpl());
    for (const auto& t : m->buffers()) owned.insert(t.unsafeGetTensorImpl());
    ASSERT_FALSE(s.trainable.empty()) << method;
    for (const auto& [name, t] : s.trainable)
      EXPECT_TRUE(owned.count(t.unsafeGetTensorImpl())) << method << ": " << name << " would stay on the CPU";
  }
}
