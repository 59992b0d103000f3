// Continuous-batching scheduler: one token budget per step, chunked prefill, decodes and
// prefill chunks in one step, preemption by recompute, (priority, arrival) queue order.
// Mirrors helixflow/pool/reference/scheduler.py exactly; its docstring is the specification.
//
// Failure kinds: misuse throws std::invalid_argument (ValueError) or std::runtime_error
// (RuntimeError, calls out of order). Not thread-safe: one engine thread owns it.
#pragma once

#include <cstdint>
#include <deque>
#include <memory>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "helixflow/block_allocator.h"

namespace helixflow {

enum class FinishReason : uint8_t { kStop, kLength, kAbort };
const char* finish_reason_name(FinishReason reason);

struct RequestParams {
  int64_t max_tokens = 1;
  int64_t min_tokens = 0;
  std::vector<int64_t> eos_token_ids;   // checked to be in [0, 2**31) by add_request
  std::vector<int64_t> stop_token_ids;
  bool ignore_eos = false;
  int64_t priority = 0;
};

struct Request {
  int64_t request_id;
  std::vector<TokenId> token_ids;  // prompt, then output
  int64_t num_prompt_tokens;
  int64_t num_computed_tokens = 0;
  int64_t num_scheduled = 0;  // tokens scheduled in the open step
  int64_t arrival;
  RequestParams params;
  bool running = false;
  bool finished = false;
  int64_t num_preemptions = 0;

  int64_t num_tokens() const { return static_cast<int64_t>(token_ids.size()); }
  bool before(const Request& other) const {
    return params.priority != other.params.priority ? params.priority < other.params.priority
                                                    : arrival < other.arrival;
  }
};

struct SchedulerOutput {
  std::vector<int64_t> req_ids;
  std::vector<int32_t> num_scheduled_tokens;
  std::vector<int32_t> num_computed_tokens;
  int64_t total_num_scheduled_tokens = 0;
  std::vector<int64_t> preempted_ids;
  std::vector<BlockCopy> blocks_to_copy;
};

struct UpdateOutput {
  std::vector<int64_t> req_ids;
  std::vector<int32_t> token_ids;
  std::vector<std::pair<int64_t, FinishReason>> finished;
};

struct SchedulerStats {
  int64_t num_running;
  int64_t num_waiting;
  int64_t num_preemptions;
  double kv_cache_usage;
};

class BatchBuilder;

class Scheduler {
 public:
  Scheduler(int64_t num_blocks, int64_t block_size, int64_t max_num_batched_tokens = 2048,
            int64_t max_num_seqs = 256, int64_t max_model_len = 4096,
            bool enable_prefix_caching = true);

  BlockAllocator& allocator() { return allocator_; }
  int64_t block_size() const { return allocator_.block_size(); }
  int64_t max_num_batched_tokens() const { return max_num_batched_tokens_; }
  int64_t max_num_seqs() const { return max_num_seqs_; }
  int64_t max_model_len() const { return max_model_len_; }
  int64_t num_waiting() const { return static_cast<int64_t>(waiting_.size()); }
  int64_t num_running() const { return static_cast<int64_t>(running_.size()); }
  bool has_request(int64_t request_id) const { return requests_.count(request_id) != 0; }
  std::vector<int64_t> waiting_ids() const;
  std::vector<int64_t> running_ids() const;
  const Request& request(int64_t request_id) const;
  SchedulerStats stats() const;

  // Token ids arrive as int64 and are range-checked here.
  void add_request(int64_t request_id, const int64_t* prompt, size_t prompt_len,
                   RequestParams params);
  void abort(int64_t request_id);
  bool fork(int64_t parent_id, int64_t child_id);
  std::unique_ptr<SchedulerOutput> schedule();
  std::unique_ptr<UpdateOutput> update(const int64_t* sampled, size_t num_sampled);

 private:
  friend class BatchBuilder;
  Request& get(int64_t request_id) const;
  void preempt(Request* req);
  void insert_waiting(Request* req);
  void insert_running(Request* req);
  bool finish_check(const Request& req, TokenId token, FinishReason& reason) const;

  BlockAllocator allocator_;
  int64_t max_num_batched_tokens_;
  int64_t max_num_seqs_;
  int64_t max_model_len_;
  std::unordered_map<int64_t, std::unique_ptr<Request>> requests_;
  std::deque<Request*> waiting_;   // sorted by Request::before
  std::vector<Request*> running_;  // sorted by Request::before
  bool in_step_ = false;
  std::vector<Request*> step_;     // scheduled (then forked) in the open step
  size_t num_step_rows_ = 0;       // how many of step_ schedule() put there (the batch rows)
  std::vector<std::unique_ptr<Request>> aborted_in_step_;  // kept alive until update()
  int64_t num_arrivals_ = 0;
  int64_t num_preemptions_ = 0;
};

}  // namespace helixflow
