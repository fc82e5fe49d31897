// The CUDA SSD kernels of ssd_cuda.cu compiled as C++ for CPU threads (cuda_emulation.h): built
// with -DLETHE_CUDA_EMULATION into torch.ops.lethe_ssd_cuda_emulated, for the test suite.
#include "ssd_cuda.cu"
