// Kernels that each break one rule the harness checks (and two that keep them all), run by
// name from tests/test_cuda_emulation.py: every check of the harness must be seen to fire.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>
#include <vector>

namespace cuda_emu_selftest {
namespace {

constexpr unsigned kFull = 0xffffffffu;

// Each lane's result of every shuffle mode at a few widths (values: the source lane).
__global__ void shuffle_modes(float* out) {
  const int lane = threadIdx.x & 31;
  const float v = float(lane);
  out[0 * 32 + lane] = __shfl_xor_sync(kFull, v, 1);
  out[1 * 32 + lane] = __shfl_xor_sync(kFull, v, 8, 8);
  out[2 * 32 + lane] = __shfl_down_sync(kFull, v, 1);
  out[3 * 32 + lane] = __shfl_down_sync(kFull, v, 3, 8);
  out[4 * 32 + lane] = __shfl_up_sync(kFull, v, 2, 16);
  out[5 * 32 + lane] = __shfl_sync(kFull, v, 3, 8);
  out[6 * 32 + lane] = __shfl_sync(kFull, v, 35);
}

// A block-wide sum through static shared memory, barriers between the passes: no report.
__global__ void block_sum(float* out) {
  __shared__ float buf[128];
  const int t = threadIdx.x;
  buf[t] = float(t + 1);
  __syncthreads();
  for (int half = 64; half > 0; half /= 2) {
    float x = 0.f;
    if (t < half) x = buf[t] + buf[t + half];
    __syncthreads();
    if (t < half) buf[t] = x;
    __syncthreads();
  }
  if (t == 0) out[blockIdx.x] = buf[0];
}

// Thread t rewrites its slot while its neighbour reads it, with no barrier between.
__global__ void shared_race(float* out) {
  __shared__ float buf[128];
  const int t = threadIdx.x;
  buf[t] = float(t);
  __syncthreads();
  out[t] = buf[(t + 1) % 128];
  buf[t] = float(t + 1);
}

// Reads shared memory that nothing wrote.
__global__ void uninitialised_shared(float* out) {
  __shared__ float buf[128];
  out[threadIdx.x] = buf[threadIdx.x];
}

// Two halves of the block wait at two different barriers.
__global__ void divergent_barrier(float* out) {
  if (threadIdx.x < 64) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1.f;
}

// Half the block leaves before the barrier the other half waits at.
__global__ void barrier_after_exit(float* out) {
  if (threadIdx.x >= 64) return;
  __syncthreads();
  out[threadIdx.x] = 1.f;
}

// Lane 31 is in the mask but never comes to the shuffle.
__global__ void shuffle_lane_missing(float* out) {
  const int lane = threadIdx.x & 31;
  float x = float(lane);
  if (lane < 31) x = __shfl_xor_sync(kFull, x, 1);
  out[threadIdx.x] = x;
}

// Lanes 0-15 shuffle among themselves but read lanes 16-31, outside their mask.
__global__ void shuffle_source_outside_mask(float* out) {
  const int lane = threadIdx.x & 31;
  float x = float(lane);
  if (lane < 16) x = __shfl_xor_sync(0x0000ffffu, x, 16);
  out[threadIdx.x] = x;
}

// Lanes of one warp shuffle at two different places.
__global__ void divergent_shuffle(float* out) {
  const int lane = threadIdx.x & 31;
  float x = float(lane);
  if (lane < 16) {
    x = __shfl_xor_sync(kFull, x, 1);
  } else {
    x = __shfl_xor_sync(kFull, x, 2);
  }
  out[threadIdx.x] = x;
}

// One float past the end of a global buffer.
__global__ void global_out_of_bounds(float* out, int n) { out[threadIdx.x] = out[n]; }

// One float past the end of the dynamic shared memory.
__global__ void shared_out_of_bounds(float* out, int n) {
  extern __shared__ float dyn[];
  dyn[threadIdx.x] = 1.f;
  __syncthreads();
  out[threadIdx.x] = dyn[n];
}

}  // namespace

// Runs self-test `name` on one block of `threads` threads; the output buffer, or a
// std::runtime_error with the launch's report.
std::vector<float> run(const std::string& name) {
  int threads = 128;
  std::vector<float> out(7 * 32, 0.f);
  float* o = out.data();
  const int n = int(out.size());
  if (name == "shuffle_modes") {
    shuffle_modes<<<1, 32>>>(o);
  } else if (name == "block_sum") {
    block_sum<<<2, threads>>>(o);
  } else if (name == "shared_race") {
    shared_race<<<1, threads>>>(o);
  } else if (name == "uninitialised_shared") {
    uninitialised_shared<<<1, threads>>>(o);
  } else if (name == "divergent_barrier") {
    divergent_barrier<<<1, threads>>>(o);
  } else if (name == "barrier_after_exit") {
    barrier_after_exit<<<1, threads>>>(o);
  } else if (name == "shuffle_lane_missing") {
    shuffle_lane_missing<<<1, 32>>>(o);
  } else if (name == "shuffle_source_outside_mask") {
    shuffle_source_outside_mask<<<1, 32>>>(o);
  } else if (name == "divergent_shuffle") {
    divergent_shuffle<<<1, 32>>>(o);
  } else if (name == "global_out_of_bounds") {
    global_out_of_bounds<<<1, 32>>>(o, n);
  } else if (name == "shared_out_of_bounds") {
    shared_out_of_bounds<<<1, 32, 32 * sizeof(float)>>>(o, 32);
  } else {
    throw std::invalid_argument("unknown self-test " + name);
  }
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(cudaGetErrorString(err));
  return out;
}

}  // namespace cuda_emu_selftest
