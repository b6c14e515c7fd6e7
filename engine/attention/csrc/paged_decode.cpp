// Decode attention (and short prefill chunks) over the paged KV pool, on the
// CPU, reading K/V pages in place.
//
// The torch path gathers every sequence's pages into a padded [B, L, kvh, d]
// copy per layer and then runs a masked SDPA; at 32 sequences that gather
// alone costs as much as the layer's GEMMs. Here each (sequence, kv head) task
// walks its block table and reads each key and value once, where it lies.
// Long contexts are split further into key chunks so that one sequence keeps
// every core busy.
//
// Pool layout: [num_blocks, layers_per_page, 2, block_size, kv_heads, head_dim].
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

// Widening a cache element to float. The 16-bit forms are written so the
// compiler vectorises them (c10's own conversions do not, and run 10x slower):
// bf16 is the top half of a float; fp16 is rebuilt from its bits.
inline float widen(float x) { return x; }
inline float widen(double x) { return static_cast<float>(x); }
inline float widen(c10::BFloat16 x) {
  uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
inline float widen(c10::Half x) {
  // Branch-free (so it vectorises): the half's exponent and mantissa moved into
  // float position, rebiased by 2^(127-15) (denormals come out exact); Inf/NaN
  // keep an all-ones exponent.
  const uint32_t h = x.x, em = h & 0x7fffu;
  uint32_t bits = em << 13;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  f *= 0x1p112f;
  std::memcpy(&bits, &f, sizeof f);
  bits = (em >= 0x7c00u ? (bits | 0x7f800000u) : bits) | ((h & 0x8000u) << 16);
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// DIM > 0 fixes head_dim at compile time (fully unrolled, one horizontal sum);
// DIM == 0 takes it from `d`.
template <int DIM, typename T>
inline float dot(const float* __restrict q, const T* __restrict k, int64_t d) {
  if constexpr (DIM > 0) d = DIM;
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < d; ++i) acc += q[i] * widen(k[i]);
  return acc;
}

template <int DIM, typename T>
inline void axpy(float* __restrict y, float a, const T* __restrict x, int64_t d) {
  if constexpr (DIM > 0) d = DIM;
#pragma omp simd
  for (int64_t i = 0; i < d; ++i) y[i] += a * widen(x[i]);
}

// Keys per task. A batch-1 decode over a long context is split into chunks
// (flash-decoding), so every core has work; each chunk's partial softmax is
// merged afterwards. Short contexts stay one chunk: nothing to merge.
constexpr int64_t kChunk = 512;

// The score of a key a query does not see. Finite: the build uses
// -ffast-math, under which the compiler may assume no value is infinite.
constexpr float kUnseen = -1e30f;

// Softmax numerators of one score row in place: its max and the sum of
// exp(s - max). A row that sees no key (max kUnseen) becomes zeros.
inline void softmax_row(float* __restrict s, int64_t n, float& m_out, float& l_out) {
  float m = kUnseen;
  for (int64_t i = 0; i < n; ++i) m = std::max(m, s[i]);
  float sum = 0.f;
  if (m > kUnseen) {
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < n; ++i) {
      s[i] = std::exp(s[i] - m);
      sum += s[i];
    }
  } else {
    std::fill(s, s + n, 0.f);
  }
  m_out = m;
  l_out = sum;
}

// A task with this many query vectors (query rows x heads per kv head) runs as
// two small GEMMs (a decode too, when a kv head serves 8+ query heads): the per-key dot products of the decode path reduce across
// lanes once per (query, key) and ran at a quarter of the GEMM rate for the
// 20-40 row tail of a prefix hit.
constexpr int64_t kGemmRows = 8;

// Keys (or values) lo .. lo + n - 1 of one kv head, widened to float rows of D.
template <typename TKV>
void gather_rows(float* __restrict dst, const TKV* base, const int64_t* table, int64_t first, int64_t lo,
                 int64_t n, int64_t BS, int64_t s_blk, int64_t s_tok, int64_t D) {
  for (int64_t p = lo; p < lo + n; ++p) {
    const int64_t rel = p - first;
    const TKV* src = base + table[rel / BS] * s_blk + (rel % BS) * s_tok;
    float* d = dst + (p - lo) * D;
    if constexpr (std::is_same_v<TKV, float>) {
      std::memcpy(d, src, D * sizeof(float));
    } else {
#pragma omp simd
      for (int64_t i = 0; i < D; ++i) d[i] = widen(src[i]);
    }
  }
}

// One (sequence, kv head, key chunk) task as S = Q K^T, masked, softmax
// numerators, acc = P V. qf holds the QG scaled query vectors (row-major, then
// head); row qg sits at key position pos0 + qg / G. base points at this kv
// head's first element in the layer's slot.
template <typename TKV>
void gemm_task(const float* qf, int64_t QG, int64_t G, const TKV* base, const int64_t* table, int64_t first,
               int64_t lo, int64_t n, int64_t pos0, int64_t window, int64_t BS, int64_t s_blk, int64_t s_v,
               int64_t s_tok, int64_t D, std::vector<float>& kc, std::vector<float>& vc, float* scores,
               float* m_out, float* l_out, float* acc) {
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  if (kc.empty()) {  // first GEMM task of this thread's range: decode-only steps never pay for these
    kc.resize(kChunk * D);
    vc.resize(kChunk * D);
  }
  gather_rows(kc.data(), base, table, first, lo, n, BS, s_blk, s_tok, D);
  gather_rows(vc.data(), base + s_v, table, first, lo, n, BS, s_blk, s_tok, D);
  at::Tensor S = at::from_blob(scores, {QG, n}, f32);
  at::mm_out(S, at::from_blob(const_cast<float*>(qf), {QG, D}, f32), at::from_blob(kc.data(), {n, D}, f32).t());
  for (int64_t qg = 0; qg < QG; ++qg) {
    float* s = scores + qg * n;
    const int64_t pos = pos0 + qg / G;
    // Causal: keys after the row's own position; a window: keys at or before pos - window.
    for (int64_t i = std::max<int64_t>(0, pos + 1 - lo); i < n; ++i) s[i] = kUnseen;
    if (window > 0)
      for (int64_t i = 0; i < std::min(n, pos - window + 1 - lo); ++i) s[i] = kUnseen;
    softmax_row(s, n, m_out[qg], l_out[qg]);
  }
  at::Tensor A = at::from_blob(acc, {QG, D}, f32);
  at::mm_out(A, S, at::from_blob(vc.data(), {n, D}, f32));
}

// TQ: the dtype of q and out (the model's); TKV: the cache's (--kv-cache-dtype).
// Sequence b has nq[b] query rows, rows[b] .. rows[b] + nq[b] - 1, the last at
// key position lens[b] - 1 (a decode is one row; a short prefill chunk, such
// as the tail of a prefix hit, several): causal within them, all reading each
// key once per task.
template <int DIM, typename TQ, typename TKV>
void decode(at::Tensor& out, const at::Tensor& q, const at::Tensor& kv, int64_t slot,
            const at::Tensor& rows, const at::Tensor& num_queries, const at::Tensor& tables,
            const at::Tensor& seq_lens, const at::Tensor& first_pos, int64_t window, double scale) {
  const int64_t B = tables.size(0), W = tables.size(1);
  const int64_t H = q.size(1), D = q.size(2);
  const int64_t BS = kv.size(3), KVH = kv.size(4);
  const int64_t G = H / KVH;
  const int64_t s_blk = kv.stride(0), s_v = kv.stride(2), s_tok = kv.stride(3), s_head = kv.stride(4);
  const TKV* base = kv.data_ptr<TKV>() + slot * kv.stride(1);
  const TQ* qp = q.data_ptr<TQ>();
  TQ* op = out.data_ptr<TQ>();
  const int64_t q_row = q.stride(0), q_head = q.stride(1);
  const int64_t o_row = out.stride(0), o_head = out.stride(1);
  const int64_t* row = rows.data_ptr<int64_t>();
  const int64_t* nqs = num_queries.data_ptr<int64_t>();
  const int64_t* tab = tables.data_ptr<int64_t>();
  const int64_t* lens = seq_lens.data_ptr<int64_t>();
  const int64_t* firsts = first_pos.data_ptr<int64_t>();
  const float sc = static_cast<float>(scale);

  // Keys run from `first` (the table's first block) to len - 1; a window
  // trims the front to what the earliest query sees. Tasks are (sequence,
  // kv head, chunk); a task's partial results are per (query row, head).
  std::vector<int64_t> start(B), chunks(B), task_base(B + 1, 0), part_base(B + 1, 0);
  int64_t max_nq = 1;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t earliest = lens[b] - nqs[b];
    start[b] = window > 0 ? std::max(firsts[b], earliest - window + 1) : firsts[b];
    chunks[b] = (lens[b] - start[b] + kChunk - 1) / kChunk;
    task_base[b + 1] = task_base[b] + KVH * chunks[b];
    part_base[b + 1] = part_base[b] + KVH * chunks[b] * nqs[b] * G;
    max_nq = std::max(max_nq, nqs[b]);
  }
  const int64_t tasks = task_base[B];
  // Per task, query row and head of its group: running max, denominator, and
  // the unnormalised output row.
  std::vector<float> part_m(part_base[B]), part_l(part_base[B]), part_acc(part_base[B] * D);

  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(max_nq * G * D), scores(max_nq * G * kChunk), kc, vc;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = std::upper_bound(task_base.begin(), task_base.end(), t) - task_base.begin() - 1;
      const int64_t local = t - task_base[b];
      const int64_t kvh = local / chunks[b], chunk = local % chunks[b];
      const int64_t lo = start[b] + chunk * kChunk, hi = std::min(lens[b], lo + kChunk), n = hi - lo;
      const int64_t first = firsts[b], nq = nqs[b], pos0 = lens[b] - nq;
      const int64_t QG = nq * G;  // query vectors in this task: row-major, then head
      for (int64_t r = 0; r < nq; ++r)
        for (int64_t g = 0; g < G; ++g)
          for (int64_t i = 0; i < D; ++i)
            qf[(r * G + g) * D + i] = widen(qp[(row[b] + r) * q_row + (kvh * G + g) * q_head + i]) * sc;

      const int64_t pt = part_base[b] + (kvh * chunks[b] + chunk) * QG;
      float* m_out = part_m.data() + pt;
      float* l_out = part_l.data() + pt;
      float* acc = part_acc.data() + pt * D;
      if (QG >= kGemmRows) {
        gemm_task<TKV>(qf.data(), QG, G, base + kvh * s_head, tab + b * W, first, lo, n, pos0, window, BS, s_blk,
                       s_v, s_tok, D, kc, vc, scores.data(), m_out, l_out, acc);
        continue;
      }
      for (int64_t p = lo; p < hi; ++p) {
        const int64_t rel = p - first;
        const TKV* k = base + tab[b * W + rel / BS] * s_blk + (rel % BS) * s_tok + kvh * s_head;
        for (int64_t r = 0; r < nq; ++r) {
          const int64_t pos = pos0 + r;
          const bool seen = p <= pos && (window <= 0 || p > pos - window);
          for (int64_t g = 0; g < G; ++g)
            scores[(r * G + g) * kChunk + (p - lo)] = seen ? dot<DIM>(qf.data() + (r * G + g) * D, k, D) : kUnseen;
        }
      }
      for (int64_t qg = 0; qg < QG; ++qg) {
        float* s = scores.data() + qg * kChunk;
        softmax_row(s, n, m_out[qg], l_out[qg]);
      }
      std::fill(acc, acc + QG * D, 0.f);
      for (int64_t p = lo; p < hi; ++p) {
        const int64_t rel = p - first;
        const TKV* v = base + tab[b * W + rel / BS] * s_blk + s_v + (rel % BS) * s_tok + kvh * s_head;
        for (int64_t qg = 0; qg < QG; ++qg) {
          if (!(m_out[qg] > kUnseen)) continue;
          const float w = scores[qg * kChunk + (p - lo)];
          if (w != 0.f) axpy<DIM>(acc + qg * D, w, v, D);
        }
      }
    }
  });

  // Merge each (sequence, kv head)'s chunks, query row by query row: rescale
  // to the common max (every row sees at least its own key, so it is finite).
  at::parallel_for(0, B * KVH, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> o(D);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / KVH, kvh = bh % KVH, QG = nqs[b] * G;
      const int64_t p0 = part_base[b] + kvh * chunks[b] * QG;
      for (int64_t qg = 0; qg < QG; ++qg) {
        float m = kUnseen;
        for (int64_t c = 0; c < chunks[b]; ++c) m = std::max(m, part_m[p0 + c * QG + qg]);
        float denom = 0.f;
        std::fill(o.begin(), o.end(), 0.f);
        for (int64_t c = 0; c < chunks[b]; ++c) {
          const int64_t pt = p0 + c * QG + qg;
          if (!(part_m[pt] > kUnseen)) continue;
          const float w = std::exp(part_m[pt] - m);
          denom += w * part_l[pt];
          const float* a = part_acc.data() + pt * D;
          for (int64_t i = 0; i < D; ++i) o[i] += w * a[i];
        }
        const int64_t r = qg / G, g = qg % G;
        TQ* dst = op + (row[b] + r) * o_row + (kvh * G + g) * o_head;
        const float inv = 1.f / denom;
        for (int64_t i = 0; i < D; ++i) dst[i] = static_cast<TQ>(o[i] * inv);
      }
    }
  });
}

template <typename TQ, typename TKV>
void decode_dim(at::Tensor& out, const at::Tensor& q, const at::Tensor& kv, int64_t slot,
                const at::Tensor& rows, const at::Tensor& nq, const at::Tensor& tables, const at::Tensor& seq_lens,
                const at::Tensor& first_pos, int64_t window, double scale) {
  switch (q.size(2)) {
    case 64: decode<64, TQ, TKV>(out, q, kv, slot, rows, nq, tables, seq_lens, first_pos, window, scale); break;
    case 128: decode<128, TQ, TKV>(out, q, kv, slot, rows, nq, tables, seq_lens, first_pos, window, scale); break;
    default: decode<0, TQ, TKV>(out, q, kv, slot, rows, nq, tables, seq_lens, first_pos, window, scale);
  }
}

}  // namespace

// out, q: [T, H, D]; sequence b's query rows are rows[b] .. rows[b] +
// num_queries[b] - 1 of q/out, the last at key position seq_lens[b] - 1;
// tables[b] lists its blocks from the one holding key position first_pos[b];
// a row at position p attends to keys first_pos[b] .. p (the last `window` of
// them when window > 0).
void paged_decode_attention(at::Tensor out, at::Tensor q, at::Tensor kv_cache, int64_t slot,
                            at::Tensor rows, at::Tensor num_queries, at::Tensor tables, at::Tensor seq_lens,
                            at::Tensor first_pos, int64_t window, double scale) {
  TORCH_CHECK(kv_cache.is_contiguous(), "kv_cache must be contiguous");
  TORCH_CHECK(q.stride(2) == 1 && out.stride(2) == 1, "q/out head_dim must be contiguous");
  TORCH_CHECK(out.scalar_type() == q.scalar_type(), "q and out must share a dtype");
  TORCH_CHECK(kv_cache.scalar_type() == q.scalar_type() || kv_cache.scalar_type() == at::kHalf ||
                  kv_cache.scalar_type() == at::kBFloat16,
              "kv_cache must be q's dtype, float16 or bfloat16");
  TORCH_CHECK(q.device().is_cpu() && kv_cache.device().is_cpu() && out.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(q.dim() == 3 && out.sizes() == q.sizes() && kv_cache.dim() == 6, "q/out [T, H, D], kv_cache 6-d");
  TORCH_CHECK(kv_cache.size(5) == q.size(2), "head_dim differs between q and kv_cache");
  TORCH_CHECK(q.size(1) % kv_cache.size(4) == 0, "heads must be a multiple of kv heads");
  TORCH_CHECK(slot >= 0 && slot < kv_cache.size(1), "slot out of range");
  const int64_t B = tables.size(0);
  TORCH_CHECK(rows.numel() == B && num_queries.numel() == B && seq_lens.numel() == B && first_pos.numel() == B,
              "one row, query count, length, start each");
  for (const at::Tensor* t : {&rows, &num_queries, &tables, &seq_lens, &first_pos})
    TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous(), "index tensors must be contiguous int64");
  {  // every row attends to at least one key, from a position its table covers
    const int64_t* lens = seq_lens.data_ptr<int64_t>();
    const int64_t* firsts = first_pos.data_ptr<int64_t>();
    const int64_t* row = rows.data_ptr<int64_t>();
    const int64_t* nqs = num_queries.data_ptr<int64_t>();
    const int64_t BS = kv_cache.size(3), W = tables.size(1);
    for (int64_t b = 0; b < B; ++b) {
      // The earliest query must see a key its table covers (its own, at least).
      TORCH_CHECK(nqs[b] >= 1 && firsts[b] >= 0 && firsts[b] % BS == 0 && firsts[b] <= lens[b] - nqs[b],
                  "bad key range for row ", b);
      TORCH_CHECK((lens[b] - firsts[b] + BS - 1) / BS <= W, "block table too short for row ", b);
      TORCH_CHECK(row[b] >= 0 && row[b] + nqs[b] <= q.size(0), "row out of range");
      for (int64_t j = 0; j < (lens[b] - firsts[b] + BS - 1) / BS; ++j) {
        const int64_t block = tables.data_ptr<int64_t>()[b * W + j];
        TORCH_CHECK(block >= 0 && block < kv_cache.size(0), "block id out of range in row ", b);
      }
    }
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode_attention", [&] {
    using TQ = scalar_t;
    switch (kv_cache.scalar_type()) {
      case at::kHalf: decode_dim<TQ, c10::Half>(out, q, kv_cache, slot, rows, num_queries, tables, seq_lens, first_pos, window, scale); break;
      case at::kBFloat16: decode_dim<TQ, c10::BFloat16>(out, q, kv_cache, slot, rows, num_queries, tables, seq_lens, first_pos, window, scale); break;
      default: decode_dim<TQ, TQ>(out, q, kv_cache, slot, rows, num_queries, tables, seq_lens, first_pos, window, scale);
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "paged decode attention (CPU)");
}
