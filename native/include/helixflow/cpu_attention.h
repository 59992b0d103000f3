// Paged decode attention on the CPU: one query token per sequence against its cached keys and
// values, read in place through the block table (no gather copy), GQA/MQA, optional sliding
// window. The CPU twin of kernels/decode_attention.py (same semantics as the torch reference
// in kernels/reference/attention.py); the engine's CPU path calls it for decode rows.
#pragma once

#include <cstdint>

namespace helixflow {

struct PagedDecodeArgs {
  // q: [num_seqs, num_heads, head_dim], rows and heads strided, head_dim contiguous.
  const float* q = nullptr;
  int64_t q_seq_stride = 0;
  int64_t q_head_stride = 0;
  // key_cache, value_cache: [num_blocks, block_size, num_kv_heads, head_dim], contiguous.
  const float* key_cache = nullptr;
  const float* value_cache = nullptr;
  int64_t num_blocks = 0;
  int64_t block_size = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t num_heads = 0;
  int64_t num_seqs = 0;
  // block_tables: [num_seqs, table_width] int32 (row stride table_stride); seq_lens: [num_seqs].
  const int32_t* block_tables = nullptr;
  int64_t table_width = 0;
  int64_t table_stride = 0;
  const int32_t* seq_lens = nullptr;
  float scale = 1.0f;
  int64_t sliding_window = 0;  // 0: none; else the query sees the last sliding_window keys
  // out: [num_seqs, num_heads, head_dim], written; a sequence of length 0 gets zeros.
  float* out = nullptr;
  int64_t out_seq_stride = 0;
  int64_t out_head_stride = 0;
};

// Throws std::invalid_argument for inconsistent sizes, a sequence longer than its table or a
// block id outside [0, num_blocks), before anything is written. Splits the (sequence, kv head)
// pairs over num_threads threads (the caller's thread included).
void paged_decode_attention(const PagedDecodeArgs& args, int num_threads);

}  // namespace helixflow
