// Decode attention over the paged KV pool, on the CPU, reading K/V pages in place.
//
// The torch path gathers every sequence's pages into a padded [B, L, kvh, d]
// copy per layer and then runs a masked SDPA; at 32 sequences that gather
// alone costs as much as the layer's GEMMs. Here each (sequence, kv head) task
// walks its block table and reads each key and value once, where it lies.
//
// Pool layout: [num_blocks, layers_per_page, 2, block_size, kv_heads, head_dim].
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

// DIM > 0 fixes head_dim at compile time (fully unrolled, one horizontal sum);
// DIM == 0 takes it from `d`.
template <int DIM, typename T>
inline float dot(const float* __restrict q, const T* __restrict k, int64_t d) {
  if constexpr (DIM > 0) d = DIM;
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < d; ++i) acc += q[i] * static_cast<float>(k[i]);
  return acc;
}

template <int DIM, typename T>
inline void axpy(float* __restrict y, float a, const T* __restrict x, int64_t d) {
  if constexpr (DIM > 0) d = DIM;
#pragma omp simd
  for (int64_t i = 0; i < d; ++i) y[i] += a * static_cast<float>(x[i]);
}

template <int DIM, typename T>
void decode(at::Tensor& out, const at::Tensor& q, const at::Tensor& kv, int64_t slot,
            const at::Tensor& rows, const at::Tensor& tables, const at::Tensor& seq_lens,
            const at::Tensor& first_pos, int64_t window, double scale) {
  const int64_t B = tables.size(0), W = tables.size(1);
  const int64_t H = q.size(1), D = q.size(2);
  const int64_t BS = kv.size(3), KVH = kv.size(4);
  const int64_t G = H / KVH;
  const int64_t s_blk = kv.stride(0), s_v = kv.stride(2), s_tok = kv.stride(3), s_head = kv.stride(4);
  const T* base = kv.data_ptr<T>() + slot * kv.stride(1);
  const T* qp = q.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int64_t q_row = q.stride(0), q_head = q.stride(1);
  const int64_t o_row = out.stride(0), o_head = out.stride(1);
  const int64_t* row = rows.data_ptr<int64_t>();
  const int64_t* tab = tables.data_ptr<int64_t>();
  const int64_t* lens = seq_lens.data_ptr<int64_t>();
  const int64_t* firsts = first_pos.data_ptr<int64_t>();
  const float sc = static_cast<float>(scale);

  // One task per sequence: its pages are read front to back, each token row
  // (all kv heads) once for K and once for V.
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(H * D), acc(H * D), scores, denom(H);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t len = lens[b], first = firsts[b];
      // Keys run from `first` (the table's first block) to len - 1; a window
      // trims the front further.
      const int64_t start = window > 0 ? std::max(first, len - window) : first;
      const int64_t n = len - start;
      scores.resize(H * n);
      for (int64_t h = 0; h < H; ++h)
        for (int64_t i = 0; i < D; ++i)
          qf[h * D + i] = static_cast<float>(qp[row[b] * q_row + h * q_head + i]) * sc;

      for (int64_t p = start; p < len; ++p) {
        const int64_t rel = p - first;
        const T* k = base + tab[b * W + rel / BS] * s_blk + (rel % BS) * s_tok;
        for (int64_t h = 0; h < H; ++h) scores[h * n + (p - start)] = dot<DIM>(qf.data() + h * D, k + (h / G) * s_head, D);
      }
      for (int64_t h = 0; h < H; ++h) {
        float* s = scores.data() + h * n;
        float m = s[0];
        for (int64_t i = 1; i < n; ++i) m = std::max(m, s[i]);
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < n; ++i) {
          s[i] = std::exp(s[i] - m);
          sum += s[i];
        }
        denom[h] = sum;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t p = start; p < len; ++p) {
        const int64_t rel = p - first;
        const T* v = base + tab[b * W + rel / BS] * s_blk + s_v + (rel % BS) * s_tok;
        for (int64_t h = 0; h < H; ++h) axpy<DIM>(acc.data() + h * D, scores[h * n + (p - start)], v + (h / G) * s_head, D);
      }
      for (int64_t h = 0; h < H; ++h) {
        T* o = op + row[b] * o_row + h * o_head;
        const float inv = 1.f / denom[h];
        for (int64_t i = 0; i < D; ++i) o[i] = static_cast<T>(acc[h * D + i] * inv);
      }
    }
  });
}

}  // namespace

// out, q: [T, H, D]; rows[b] is the row of q/out that sequence b decodes;
// tables[b] lists its blocks from the one holding key position first_pos[b];
// it attends to keys first_pos[b] .. seq_lens[b] - 1 (the last `window` of them
// when window > 0).
void paged_decode_attention(at::Tensor out, at::Tensor q, at::Tensor kv_cache, int64_t slot,
                            at::Tensor rows, at::Tensor tables, at::Tensor seq_lens,
                            at::Tensor first_pos, int64_t window, double scale) {
  TORCH_CHECK(kv_cache.is_contiguous(), "kv_cache must be contiguous");
  TORCH_CHECK(q.stride(2) == 1 && out.stride(2) == 1, "q/out head_dim must be contiguous");
  TORCH_CHECK(q.scalar_type() == kv_cache.scalar_type() && out.scalar_type() == q.scalar_type(),
              "q, out and kv_cache must share a dtype");
  TORCH_CHECK(q.device().is_cpu() && kv_cache.device().is_cpu() && out.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(q.dim() == 3 && out.sizes() == q.sizes() && kv_cache.dim() == 6, "q/out [T, H, D], kv_cache 6-d");
  TORCH_CHECK(kv_cache.size(5) == q.size(2), "head_dim differs between q and kv_cache");
  TORCH_CHECK(q.size(1) % kv_cache.size(4) == 0, "heads must be a multiple of kv heads");
  TORCH_CHECK(slot >= 0 && slot < kv_cache.size(1), "slot out of range");
  const int64_t B = tables.size(0);
  TORCH_CHECK(rows.numel() == B && seq_lens.numel() == B && first_pos.numel() == B, "one row, length, start each");
  for (const at::Tensor* t : {&rows, &tables, &seq_lens, &first_pos})
    TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous(), "index tensors must be contiguous int64");
  {  // every row attends to at least one key, from a position its table covers
    const int64_t* lens = seq_lens.data_ptr<int64_t>();
    const int64_t* firsts = first_pos.data_ptr<int64_t>();
    const int64_t* row = rows.data_ptr<int64_t>();
    const int64_t BS = kv_cache.size(3), W = tables.size(1);
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK(firsts[b] >= 0 && firsts[b] % BS == 0 && firsts[b] < lens[b], "bad key range for row ", b);
      TORCH_CHECK((lens[b] - firsts[b] + BS - 1) / BS <= W, "block table too short for row ", b);
      TORCH_CHECK(row[b] >= 0 && row[b] < q.size(0), "row out of range");
      for (int64_t j = 0; j < (lens[b] - firsts[b] + BS - 1) / BS; ++j) {
        const int64_t block = tables.data_ptr<int64_t>()[b * W + j];
        TORCH_CHECK(block >= 0 && block < kv_cache.size(0), "block id out of range in row ", b);
      }
    }
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode_attention", [&] {
    switch (q.size(2)) {
      case 64: decode<64, scalar_t>(out, q, kv_cache, slot, rows, tables, seq_lens, first_pos, window, scale); break;
      case 128: decode<128, scalar_t>(out, q, kv_cache, slot, rows, tables, seq_lens, first_pos, window, scale); break;
      default: decode<0, scalar_t>(out, q, kv_cache, slot, rows, tables, seq_lens, first_pos, window, scale);
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "paged decode attention (CPU)");
}
