#include "helixflow/scheduler.h"

#include <algorithm>
#include <stdexcept>

namespace helixflow {

namespace {
constexpr int64_t kMaxTokenId = INT32_MAX;

bool before(const Request* a, const Request* b) { return a->before(*b); }

bool contains(const std::vector<int64_t>& ids, TokenId t) {
  return std::find(ids.begin(), ids.end(), t) != ids.end();
}

void check_token_ids(const char* name, const std::vector<int64_t>& ids) {
  for (int64_t t : ids) {
    if (t < 0 || t > kMaxTokenId) {
      throw std::invalid_argument(std::string(name) + " must hold token ids in [0, 2**31)");
    }
  }
}

void check_at_least_one(const char* name, int64_t value) {
  if (value < 1) {
    throw std::invalid_argument(std::string(name) + " must be >= 1, got " + std::to_string(value));
  }
}

// The scheduler's limits are checked before the allocator's sizes, as in the reference.
int64_t validated_num_blocks(int64_t num_blocks, int64_t max_num_batched_tokens,
                             int64_t max_num_seqs, int64_t max_model_len) {
  check_at_least_one("max_num_batched_tokens", max_num_batched_tokens);
  check_at_least_one("max_num_seqs", max_num_seqs);
  check_at_least_one("max_model_len", max_model_len);
  return num_blocks;
}
}  // namespace

const char* finish_reason_name(FinishReason reason) {
  switch (reason) {
    case FinishReason::kStop: return "stop";
    case FinishReason::kLength: return "length";
    case FinishReason::kAbort: return "abort";
  }
  return "unknown";
}

Scheduler::Scheduler(int64_t num_blocks, int64_t block_size, int64_t max_num_batched_tokens,
                     int64_t max_num_seqs, int64_t max_model_len, bool enable_prefix_caching)
    : allocator_(validated_num_blocks(num_blocks, max_num_batched_tokens, max_num_seqs,
                                      max_model_len),
                 block_size, enable_prefix_caching),
      max_num_batched_tokens_(max_num_batched_tokens), max_num_seqs_(max_num_seqs),
      max_model_len_(max_model_len) {
  running_.reserve(static_cast<size_t>(std::min<int64_t>(max_num_seqs, 1 << 16)));
}

std::vector<int64_t> Scheduler::waiting_ids() const {
  std::vector<int64_t> out;
  out.reserve(waiting_.size());
  for (const Request* r : waiting_) out.push_back(r->request_id);
  return out;
}

std::vector<int64_t> Scheduler::running_ids() const {
  std::vector<int64_t> out;
  out.reserve(running_.size());
  for (const Request* r : running_) out.push_back(r->request_id);
  return out;
}

Request& Scheduler::get(int64_t request_id) const {
  auto it = requests_.find(request_id);
  if (it == requests_.end()) {
    throw std::invalid_argument("unknown request " + std::to_string(request_id));
  }
  return *it->second;
}

const Request& Scheduler::request(int64_t request_id) const { return get(request_id); }

SchedulerStats Scheduler::stats() const {
  return SchedulerStats{num_running(), num_waiting(), num_preemptions_, allocator_.usage()};
}

void Scheduler::insert_waiting(Request* req) {
  waiting_.insert(std::upper_bound(waiting_.begin(), waiting_.end(), req, before), req);
}

void Scheduler::insert_running(Request* req) {
  running_.insert(std::upper_bound(running_.begin(), running_.end(), req, before), req);
}

void Scheduler::add_request(int64_t request_id, const int64_t* prompt, size_t prompt_len,
                            RequestParams params) {
  if (requests_.count(request_id)) {
    throw std::invalid_argument("request " + std::to_string(request_id) + " already exists");
  }
  if (prompt_len == 0) throw std::invalid_argument("prompt_token_ids is empty");
  for (size_t i = 0; i < prompt_len; ++i) {
    if (prompt[i] < 0 || prompt[i] > kMaxTokenId) {
      throw std::invalid_argument("prompt_token_ids must hold token ids in [0, 2**31)");
    }
  }
  check_token_ids("eos_token_ids", params.eos_token_ids);
  check_token_ids("stop_token_ids", params.stop_token_ids);
  if (params.max_tokens < 1) {
    throw std::invalid_argument("max_tokens must be >= 1, got " +
                                std::to_string(params.max_tokens));
  }
  if (params.min_tokens < 0 || params.min_tokens > params.max_tokens) {
    throw std::invalid_argument("min_tokens must be in [0, max_tokens=" +
                                std::to_string(params.max_tokens) + "], got " +
                                std::to_string(params.min_tokens));
  }
  const auto n = static_cast<int64_t>(prompt_len);
  if (n >= max_model_len_) {
    throw std::invalid_argument("prompt has " + std::to_string(n) +
                                " tokens but max_model_len is " + std::to_string(max_model_len_) +
                                ": no room to generate");
  }
  // The last token's KV is never computed, hence the - 1.
  const int64_t final_len = n + std::min(params.max_tokens, max_model_len_);
  const int64_t needed = cdiv(std::min(final_len, max_model_len_) - 1, block_size());
  if (needed > allocator_.num_blocks()) {
    throw std::invalid_argument("request needs " + std::to_string(needed) +
                                " KV blocks but the cache has " +
                                std::to_string(allocator_.num_blocks()));
  }
  auto req = std::make_unique<Request>();
  req->request_id = request_id;
  req->token_ids.assign(prompt, prompt + prompt_len);
  req->num_prompt_tokens = n;
  req->arrival = num_arrivals_++;
  req->params = std::move(params);
  Request* raw = req.get();
  requests_.emplace(request_id, std::move(req));
  insert_waiting(raw);
}

void Scheduler::abort(int64_t request_id) {
  auto it = requests_.find(request_id);
  if (it == requests_.end()) {
    throw std::invalid_argument("unknown request " + std::to_string(request_id));
  }
  Request* req = it->second.get();
  req->finished = true;
  if (req->running) {
    running_.erase(std::find(running_.begin(), running_.end(), req));
    allocator_.free(request_id);
  } else {
    waiting_.erase(std::find(waiting_.begin(), waiting_.end(), req));
  }
  if (in_step_) aborted_in_step_.push_back(std::move(it->second));
  requests_.erase(it);
}

bool Scheduler::fork(int64_t parent_id, int64_t child_id) {
  Request& parent = get(parent_id);
  if (!parent.running) {
    throw std::invalid_argument("request " + std::to_string(parent_id) + " is not running");
  }
  if (requests_.count(child_id)) {
    throw std::invalid_argument("request " + std::to_string(child_id) + " already exists");
  }
  if (num_running() >= max_num_seqs_) return false;
  auto child = std::make_unique<Request>(parent);
  child->request_id = child_id;
  child->arrival = num_arrivals_++;
  child->num_preemptions = 0;
  allocator_.fork(parent_id, child_id);
  Request* raw = child.get();
  requests_.emplace(child_id, std::move(child));
  insert_running(raw);
  if (in_step_ && parent.num_scheduled > 0) step_.push_back(raw);
  return true;
}

void Scheduler::preempt(Request* req) {
  allocator_.free(req->request_id);
  req->running = false;
  req->num_computed_tokens = 0;
  req->num_scheduled = 0;
  ++req->num_preemptions;
  ++num_preemptions_;
  insert_waiting(req);
}

std::unique_ptr<SchedulerOutput> Scheduler::schedule() {
  if (in_step_) {
    throw std::runtime_error("schedule() called twice: update() must close the previous step");
  }
  auto out = std::make_unique<SchedulerOutput>();
  int64_t budget = max_num_batched_tokens_;
  step_.clear();
  const size_t expected = std::min<size_t>(running_.size() + waiting_.size(),
                                           static_cast<size_t>(max_num_seqs_));
  out->req_ids.reserve(expected);
  out->num_scheduled_tokens.reserve(expected);
  out->num_computed_tokens.reserve(expected);

  auto add_row = [&](Request* req, int64_t num_new) {
    req->num_scheduled = num_new;
    step_.push_back(req);
    out->req_ids.push_back(req->request_id);
    out->num_scheduled_tokens.push_back(static_cast<int32_t>(num_new));
    out->num_computed_tokens.push_back(static_cast<int32_t>(req->num_computed_tokens));
    budget -= num_new;
  };

  for (size_t i = 0; i < running_.size() && budget > 0;) {
    Request* req = running_[i];
    const int64_t num_new = std::min(req->num_tokens() - req->num_computed_tokens, budget);
    const int64_t end = req->num_computed_tokens + num_new;
    bool self_preempted = false;
    while (!self_preempted && !allocator_.append_slots(req->request_id, req->num_computed_tokens,
                                                       end, out->blocks_to_copy)) {
      Request* victim = running_.back();  // lowest priority, newest
      running_.pop_back();
      preempt(victim);
      out->preempted_ids.push_back(victim->request_id);
      self_preempted = victim == req;
    }
    if (self_preempted) break;
    add_row(req, num_new);
    ++i;
  }

  while (out->preempted_ids.empty() && !waiting_.empty() && budget > 0 &&
         num_running() < max_num_seqs_) {
    Request* req = waiting_.front();
    const int64_t num_cached =
        allocator_.num_cached_prefix_tokens(req->token_ids.data(), req->token_ids.size());
    const int64_t num_new = std::min(req->num_tokens() - num_cached, budget);
    const auto got = allocator_.allocate(req->request_id, req->token_ids.data(),
                                         req->token_ids.size(), num_cached + num_new);
    if (!got) break;
    waiting_.pop_front();
    req->running = true;
    req->num_computed_tokens = *got;
    insert_running(req);
    add_row(req, num_new);
  }

  out->total_num_scheduled_tokens = max_num_batched_tokens_ - budget;
  num_step_rows_ = step_.size();
  in_step_ = true;
  return out;
}

bool Scheduler::finish_check(const Request& req, TokenId token, FinishReason& reason) const {
  const int64_t num_output = req.num_tokens() - req.num_prompt_tokens;
  const RequestParams& p = req.params;
  if (num_output >= p.min_tokens && ((!p.ignore_eos && contains(p.eos_token_ids, token)) ||
                                     contains(p.stop_token_ids, token))) {
    reason = FinishReason::kStop;
    return true;
  }
  if (num_output >= p.max_tokens || req.num_tokens() >= max_model_len_) {
    reason = FinishReason::kLength;
    return true;
  }
  return false;
}

std::unique_ptr<UpdateOutput> Scheduler::update(const int64_t* sampled, size_t num_sampled) {
  if (!in_step_) throw std::runtime_error("update() called without a scheduled step");
  if (num_sampled != step_.size()) {
    throw std::invalid_argument("expected " + std::to_string(step_.size()) +
                                " sampled token ids, got " + std::to_string(num_sampled));
  }
  for (size_t i = 0; i < num_sampled; ++i) {
    if (sampled[i] < 0 || sampled[i] > kMaxTokenId) {
      throw std::invalid_argument("sampled token ids must be in [0, 2**31)");
    }
  }
  in_step_ = false;
  auto out = std::make_unique<UpdateOutput>();
  out->req_ids.reserve(step_.size());
  out->token_ids.reserve(step_.size());
  for (size_t i = 0; i < step_.size(); ++i) {
    Request* req = step_[i];
    if (req->finished) continue;  // aborted during the step
    req->num_computed_tokens += req->num_scheduled;
    req->num_scheduled = 0;
    allocator_.cache_blocks(req->request_id, req->token_ids.data(), req->token_ids.size(),
                            req->num_computed_tokens);
    if (req->num_computed_tokens < req->num_tokens()) continue;  // prompt chunk
    const auto token = static_cast<TokenId>(sampled[i]);
    req->token_ids.push_back(token);
    out->req_ids.push_back(req->request_id);
    out->token_ids.push_back(token);
    FinishReason reason;
    if (finish_check(*req, token, reason)) {
      req->finished = true;
      out->finished.emplace_back(req->request_id, reason);
    }
  }
  if (!out->finished.empty()) {
    running_.erase(std::remove_if(running_.begin(), running_.end(),
                                  [](const Request* r) { return r->finished; }),
                   running_.end());
    for (const auto& [rid, reason] : out->finished) {
      allocator_.free(rid);
      requests_.erase(rid);
    }
  }
  step_.clear();
  aborted_in_step_.clear();
  return out;
}

}  // namespace helixflow
