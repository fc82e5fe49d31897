// The CUDA kernels of selective_scan_cuda.cu compiled as C++ for CPU threads (cuda_emulation.h):
// built with -DLETHE_CUDA_EMULATION into torch.ops.lethe_cuda_emulated, for the test suite.
#include "selective_scan_cuda.cu"
