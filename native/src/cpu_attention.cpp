// Paged decode attention on the CPU (see cpu_attention.h).
//
// Work item = (sequence, kv head): the G = num_heads / num_kv_heads query heads that share the
// kv head walk the sequence's blocks together, so each key and value row is read once for all
// of them. Per block: G x block_size scores, then one online-softmax rescale (running max m,
// running sum l) and the weighted sum of the block's values into G fp32 accumulators.
#include "helixflow/cpu_attention.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace helixflow {
namespace {

// NOTE: multiversioned so the D-length loops vectorize for the CPU at hand (one binary for
// every x86-64 machine); other architectures build the portable version only.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__SANITIZE_ADDRESS__)
#define HELIXFLOW_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define HELIXFLOW_CLONES
#endif

// NOTE: 16 independent partial sums: a single running sum is a serial chain the compiler may
// not reorder (no -ffast-math), so it would neither vectorize nor pipeline.
inline float dot(const float* a, const float* b, int64_t n) {
  float part[16] = {};
  int64_t d = 0;
  for (; d + 16 <= n; d += 16) {
    for (int j = 0; j < 16; ++j) part[j] += a[d + j] * b[d + j];
  }
  float sum = 0.0f;
  for (; d < n; ++d) sum += a[d] * b[d];
  for (float p : part) sum += p;
  return sum;
}

HELIXFLOW_CLONES
void attend_items(const PagedDecodeArgs& a, int64_t first, int64_t last) {
  const int64_t D = a.head_dim;
  const int64_t G = a.num_heads / a.num_kv_heads;
  const int64_t bs = a.block_size;
  const int64_t row = a.num_kv_heads * D;  // stride between tokens in a block
  std::vector<float> acc(static_cast<size_t>(G * D));
  std::vector<float> m(static_cast<size_t>(G));
  std::vector<float> l(static_cast<size_t>(G));
  std::vector<float> scores(static_cast<size_t>(G * bs));
  for (int64_t item = first; item < last; ++item) {
    const int64_t s = item / a.num_kv_heads;
    const int64_t h = item % a.num_kv_heads;
    const int64_t len = a.seq_lens[s];
    const int64_t start = a.sliding_window > 0 ? std::max<int64_t>(0, len - a.sliding_window) : 0;
    std::fill(acc.begin(), acc.end(), 0.0f);
    std::fill(m.begin(), m.end(), -std::numeric_limits<float>::infinity());
    std::fill(l.begin(), l.end(), 0.0f);
    const float* q = a.q + s * a.q_seq_stride + h * G * a.q_head_stride;
    const int32_t* table = a.block_tables + s * a.table_stride;
    for (int64_t t0 = start - start % bs; t0 < len; t0 += bs) {
      const int64_t lo = std::max(t0, start) - t0;
      const int64_t hi = std::min(len - t0, bs);
      const int64_t base = static_cast<int64_t>(table[t0 / bs]) * bs * row + h * D;
      const float* kb = a.key_cache + base;
      const float* vb = a.value_cache + base;
      if (t0 + bs < len) {
        // NOTE: the next block is elsewhere in memory; its rows are requested now so they
        // arrive while this block is computed (the hardware prefetcher cannot guess the jump).
        const int64_t next = static_cast<int64_t>(table[t0 / bs + 1]) * bs * row + h * D;
        for (int64_t t = 0; t < std::min(len - t0 - bs, bs); ++t) {
          for (int64_t d = 0; d < D; d += 16) {
            __builtin_prefetch(a.key_cache + next + t * row + d);
            __builtin_prefetch(a.value_cache + next + t * row + d);
          }
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        const float* qg = q + g * a.q_head_stride;
        float* sg = scores.data() + g * bs;
        float block_max = m[g];
        for (int64_t t = lo; t < hi; ++t) {
          sg[t] = dot(qg, kb + t * row, D) * a.scale;
          block_max = std::max(block_max, sg[t]);
        }
        const float corr = std::exp(m[g] - block_max);  // exp(-inf) = 0 on the first block
        float* ag = acc.data() + g * D;
        for (int64_t d = 0; d < D; ++d) ag[d] *= corr;
        float sum = 0.0f;
        for (int64_t t = lo; t < hi; ++t) {
          const float p = std::exp(sg[t] - block_max);
          sum += p;
          const float* v = vb + t * row;
          for (int64_t d = 0; d < D; ++d) ag[d] += p * v[d];
        }
        l[g] = l[g] * corr + sum;
        m[g] = block_max;
      }
    }
    float* out = a.out + s * a.out_seq_stride + h * G * a.out_head_stride;
    for (int64_t g = 0; g < G; ++g) {
      const float inv = l[g] > 0.0f ? 1.0f / l[g] : 0.0f;  // no keys: zeros
      const float* ag = acc.data() + g * D;
      float* og = out + g * a.out_head_stride;
      for (int64_t d = 0; d < D; ++d) og[d] = ag[d] * inv;
    }
  }
}

void check(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument(what);
}

void validate(const PagedDecodeArgs& a) {
  check(a.q && a.key_cache && a.value_cache && a.block_tables && a.seq_lens && a.out,
        "paged_decode_attention: a null buffer");
  check(a.num_seqs >= 0 && a.head_dim > 0 && a.block_size > 0 && a.num_blocks > 0,
        "paged_decode_attention: sizes must be positive");
  check(a.num_kv_heads > 0 && a.num_heads % a.num_kv_heads == 0 && a.num_heads > 0,
        "paged_decode_attention: num_heads must be a positive multiple of num_kv_heads");
  for (int64_t s = 0; s < a.num_seqs; ++s) {
    const int64_t len = a.seq_lens[s];
    if (len < 0 || len > a.table_width * a.block_size) {
      throw std::invalid_argument("paged_decode_attention: seq_lens[" + std::to_string(s) +
                                  "] = " + std::to_string(len) + " does not fit its " +
                                  std::to_string(a.table_width) + "-block table");
    }
    const int64_t start =
        a.sliding_window > 0 ? std::max<int64_t>(0, len - a.sliding_window) : 0;
    for (int64_t b = start / a.block_size; b * a.block_size < len; ++b) {
      const int64_t block = a.block_tables[s * a.table_stride + b];
      if (block < 0 || block >= a.num_blocks) {
        throw std::invalid_argument("paged_decode_attention: block_tables[" + std::to_string(s) +
                                    ", " + std::to_string(b) + "] = " + std::to_string(block) +
                                    " is not a block of the cache (" +
                                    std::to_string(a.num_blocks) + " blocks)");
      }
    }
  }
}

}  // namespace

void paged_decode_attention(const PagedDecodeArgs& args, int num_threads) {
  validate(args);
  const int64_t items = args.num_seqs * args.num_kv_heads;
  const int64_t threads = std::clamp<int64_t>(num_threads, 1, std::max<int64_t>(1, items));
#ifdef _OPENMP
  // NOTE: OpenMP, so the work runs on the process's one OpenMP pool, which torch's CPU ops
  // use too: its workers are awake (spinning) right after a torch op, and no second pool
  // competes with them for the cores.
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t t = 0; t < threads; ++t) {
    const int64_t per = (items + threads - 1) / threads;
    attend_items(args, std::min(items, t * per), std::min(items, (t + 1) * per));
  }
#else
  if (threads == 1) {
    attend_items(args, 0, items);
    return;
  }
  std::vector<std::thread> pool;
  pool.reserve(static_cast<size_t>(threads - 1));
  const int64_t per = (items + threads - 1) / threads;
  for (int64_t i = 1; i < threads; ++i) {
    const int64_t first = std::min(items, i * per);
    const int64_t last = std::min(items, first + per);
    pool.emplace_back([&args, first, last] { attend_items(args, first, last); });
  }
  attend_items(args, 0, std::min(items, per));
  for (auto& t : pool) t.join();
#endif
}

}  // namespace helixflow
