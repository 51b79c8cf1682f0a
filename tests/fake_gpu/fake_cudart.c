/* A stand-in libcudart for the CPU machines' tests: the runtime calls the NCCL process
 * group makes, each succeeding without a GPU (streams and events are dummy handles). */
static int dummy;
int cudaGetDeviceCount(int* n) { *n = 1; return 0; }
int cudaSetDevice(int d) { return d == 0 ? 0 : 101; } /* cudaErrorInvalidDevice */
int cudaGetDevice(int* d) { *d = 0; return 0; }
int cudaStreamCreateWithFlags(void** s, unsigned f) { (void)f; *s = &dummy; return 0; }
int cudaStreamDestroy(void* s) { (void)s; return 0; }
int cudaStreamSynchronize(void* s) { (void)s; return 0; }
int cudaStreamWaitEvent(void* s, void* e, unsigned f) { (void)s; (void)e; (void)f; return 0; }
int cudaEventCreateWithFlags(void** e, unsigned f) { (void)f; *e = &dummy; return 0; }
int cudaEventRecord(void* e, void* s) { (void)e; (void)s; return 0; }
int cudaEventSynchronize(void* e) { (void)e; return 0; }
int cudaEventDestroy(void* e) { (void)e; return 0; }
const char* cudaGetErrorString(int e) { return e == 101 ? "invalid device ordinal (fake)" : "fake CUDA error"; }
