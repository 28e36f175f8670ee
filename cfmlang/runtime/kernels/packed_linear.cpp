// Products of float32 rows with weights held as GGUF block codes (see packed_linear.py).
//
//   cfmlang::q4_1_linear(x [M, K] f32, rows [N, K/2 + 4 K/32] u8) -> [M, N] f32
//   cfmlang::q8_0_linear(x [M, K] f32, rows [N, K + 2 K/32] u8) -> [M, N] f32
//
// Each weight row is one run of bytes, read as one stream: its codes, then its blocks'
// float16 numbers. Q4_1: K/2 code bytes (byte j holds input j in its low nibble and input
// j + K/2 in its high one), then (d, m) per block of 32 inputs; Q8_0: K int8 codes, then d
// per block. A weight is rebuilt in float32 as fma(q, d, m) (Q4_1) or q * d (Q8_0): d * q
// is exact in float32 (11 + 8 bits), so the rebuilt weight is the correctly rounded
// d * q + m, the float32 value the model was converted to, bit for bit. The AVX-512 Q4_1
// loop rebuilds a block's 16 possible weights once (one fma over 0..15) and looks each
// code up in them (vpermps), which leaves one multiply-add per weight. Products
// accumulate in float32, 16 lanes per row, summed at the end: the same products as a
// float32 matrix product, in another order, the same for every thread count. Output rows
// are split over the threads; the weights are read once per 4 input rows. The AVX2 form
// (AVX2, FMA and F16C) rebuilds each weight with its own fma and sums 8 lanes per row;
// the portable form is plain C++ for the compiler to vectorize.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>
#if defined(__AVX512F__) && defined(__F16C__)
#include <immintrin.h>
#define CFM_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define CFM_AVX2 1
#endif

namespace {

constexpr int64_t kBlock = 32;
constexpr int64_t kMaxInputs = 65536;   // K of a packed layer (packing.MAX_PACKED_INPUTS)

// Bytes of one weight row of K inputs: Q4_1 codes (K/2) and (d, m) per block; Q8_0 codes (K) and d.
constexpr int64_t q4_1_row_bytes(int64_t K) { return K / 2 + 4 * (K / kBlock); }
constexpr int64_t q8_0_row_bytes(int64_t K) { return K + 2 * (K / kBlock); }

inline float half_at(const uint8_t* bytes) {
  uint16_t bits;
  std::memcpy(&bits, bytes, 2);
#if CFM_AVX512 || CFM_AVX2
  return _cvtsh_ss(bits);
#else
  return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
#endif
}

// The vector operations the Q4_1 kernels share, at the CPU's vector width.
#if CFM_AVX512
struct Lanes {
  using F = __m512;
  static constexpr int width = 16;
  static F zero() { return _mm512_setzero_ps(); }
  static F splat(float v) { return _mm512_set1_ps(v); }
  static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
  static F halves(const uint8_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  // `width` code bytes: their low and their high nibbles, as floats
  static void nibbles(const uint8_t* p, F& low, F& high) {
    const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    low = _mm512_cvtepi32_ps(_mm512_and_si512(q, _mm512_set1_epi32(15)));
    high = _mm512_cvtepi32_ps(_mm512_srli_epi32(q, 4));
  }
};
#elif CFM_AVX2
struct Lanes {
  using F = __m256;
  static constexpr int width = 8;
  static F zero() { return _mm256_setzero_ps(); }
  static F splat(float v) { return _mm256_set1_ps(v); }
  static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static void store(float* p, F v) { _mm256_storeu_ps(p, v); }
  static F halves(const uint8_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static void nibbles(const uint8_t* p, F& low, F& high) {
    const __m256i q = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    low = _mm256_cvtepi32_ps(_mm256_and_si256(q, _mm256_set1_epi32(15)));
    high = _mm256_cvtepi32_ps(_mm256_srli_epi32(q, 4));
  }
};
#endif

#if CFM_AVX512
// The blocks' float16 numbers of a row, as float32 (`count` of them, a multiple of 2).
inline void numbers_as_floats(const uint8_t* numbers, int64_t count, float* out) {
  int64_t i = 0;
  for (; i + 16 <= count; i += 16)
    Lanes::store(out + i, Lanes::halves(numbers + 2 * i));
  for (; i < count; ++i) out[i] = half_at(numbers + 2 * i);
}

constexpr int64_t kMaxBlocks = kMaxInputs / kBlock;

// out[r, n + o] for `rows` input rows and `outs` consecutive weight rows (Q4_1), both template
// arguments so that the accumulators stay in registers.
template <int rows, int outs>
void q4_1_rows(const float* x, int64_t K, const uint8_t* row, int64_t row_bytes, float* out, int64_t out_stride) {
  const int64_t half = K / 2, half_blocks = half / kBlock, blocks = K / kBlock;
  const __m512 levels = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  alignas(64) float numbers[outs][2 * kMaxBlocks];      // (d, m) per block
  for (int o = 0; o < outs; ++o) numbers_as_floats(row + o * row_bytes + half, 2 * blocks, numbers[o]);
  __m512 acc[rows][outs][2];
  for (int r = 0; r < rows; ++r)
    for (int o = 0; o < outs; ++o) acc[r][o][0] = acc[r][o][1] = _mm512_setzero_ps();
  for (int64_t b = 0; b < half_blocks; ++b) {
    __m512 tables[outs][2];           // the 16 weights each code stands for, per half of the row
    for (int o = 0; o < outs; ++o) {
      const float* low = numbers[o] + 2 * b;
      const float* high = numbers[o] + 2 * (b + half_blocks);
      tables[o][0] = _mm512_fmadd_ps(levels, _mm512_set1_ps(low[0]), _mm512_set1_ps(low[1]));
      tables[o][1] = _mm512_fmadd_ps(levels, _mm512_set1_ps(high[0]), _mm512_set1_ps(high[1]));
    }
    for (int64_t part = 0; part < 2; ++part) {
      const int64_t j = b * kBlock + part * 16;
      for (int o = 0; o < outs; ++o) {
        const __m512i codes = _mm512_cvtepu8_epi32(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + o * row_bytes + j)));
        const __m512 w_low = _mm512_permutexvar_ps(codes, tables[o][0]);          // uses the low 4 bits
        const __m512 w_high = _mm512_permutexvar_ps(_mm512_srli_epi32(codes, 4), tables[o][1]);
        for (int r = 0; r < rows; ++r) {
          acc[r][o][0] = _mm512_fmadd_ps(_mm512_loadu_ps(x + r * K + j), w_low, acc[r][o][0]);
          acc[r][o][1] = _mm512_fmadd_ps(_mm512_loadu_ps(x + r * K + half + j), w_high, acc[r][o][1]);
        }
      }
    }
  }
  for (int r = 0; r < rows; ++r)
    for (int o = 0; o < outs; ++o)
      out[r * out_stride + o] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][o][0], acc[r][o][1]));
}

template <int rows>
void q8_0_row(const float* x, int64_t K, const uint8_t* row, float* out, int64_t out_stride) {
  const uint8_t* numbers = row + K;
  __m512 acc[rows][2];
  for (int r = 0; r < rows; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t b = 0; b < K / kBlock; ++b) {
    const __m512 d = _mm512_set1_ps(half_at(numbers + 2 * b));
    const int64_t k = b * kBlock;
    const __m512 w0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k)))), d);
    const __m512 w1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k + 16)))), d);
    for (int r = 0; r < rows; ++r) {
      acc[r][0] = _mm512_fmadd_ps(_mm512_loadu_ps(x + r * K + k), w0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(_mm512_loadu_ps(x + r * K + k + 16), w1, acc[r][1]);
    }
  }
  for (int r = 0; r < rows; ++r) out[r * out_stride] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]));
}
#elif CFM_AVX2
inline float sum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

template <int rows, int outs>
void q4_1_rows(const float* x, int64_t K, const uint8_t* row, int64_t row_bytes, float* out, int64_t out_stride) {
  const int64_t half = K / 2, half_blocks = half / kBlock;
  __m256 acc[rows][outs];
  for (int r = 0; r < rows; ++r)
    for (int o = 0; o < outs; ++o) acc[r][o] = _mm256_setzero_ps();
  for (int64_t b = 0; b < half_blocks; ++b) {
    for (int o = 0; o < outs; ++o) {
      const uint8_t* codes = row + o * row_bytes;
      const uint8_t* low = codes + half + 4 * b;
      const uint8_t* high = codes + half + 4 * (b + half_blocks);
      const __m256 d_low = _mm256_set1_ps(half_at(low)), m_low = _mm256_set1_ps(half_at(low + 2));
      const __m256 d_high = _mm256_set1_ps(half_at(high)), m_high = _mm256_set1_ps(half_at(high + 2));
      for (int64_t part = 0; part < 4; ++part) {
        const int64_t j = b * kBlock + part * 8;
        __m256 q_low, q_high;
        Lanes::nibbles(codes + j, q_low, q_high);
        const __m256 w_low = Lanes::fma(q_low, d_low, m_low), w_high = Lanes::fma(q_high, d_high, m_high);
        for (int r = 0; r < rows; ++r)
          acc[r][o] = _mm256_fmadd_ps(_mm256_loadu_ps(x + r * K + half + j), w_high,
                                      _mm256_fmadd_ps(_mm256_loadu_ps(x + r * K + j), w_low, acc[r][o]));
      }
    }
  }
  for (int r = 0; r < rows; ++r)
    for (int o = 0; o < outs; ++o) out[r * out_stride + o] = sum8(acc[r][o]);
}

template <int rows>
void q8_0_row(const float* x, int64_t K, const uint8_t* row, float* out, int64_t out_stride) {
  const uint8_t* numbers = row + K;
  __m256 acc[rows];
  for (int r = 0; r < rows; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < K / kBlock; ++b) {
    const __m256 d = _mm256_set1_ps(half_at(numbers + 2 * b));
    for (int64_t part = 0; part < 4; ++part) {
      const int64_t k = b * kBlock + part * 8;
      const __m256 w = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
          _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + k)))), d);
      for (int r = 0; r < rows; ++r) acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(x + r * K + k), w, acc[r]);
    }
  }
  for (int r = 0; r < rows; ++r) out[r * out_stride] = sum8(acc[r]);
}
#else
// Portable form: the same weights and per-lane accumulation (16 lanes), left to the compiler.
template <int rows>
void q4_1_row(const float* x, int64_t K, const uint8_t* row, float* out, int64_t out_stride) {
  const int64_t half = K / 2, half_blocks = half / kBlock;
  const uint8_t* numbers = row + half;
  float acc[rows][16] = {};
  for (int64_t b = 0; b < half_blocks; ++b) {
    const uint8_t* low = numbers + 4 * b;
    const uint8_t* high = numbers + 4 * (b + half_blocks);
    const float d_low = half_at(low), m_low = half_at(low + 2), d_high = half_at(high), m_high = half_at(high + 2);
    for (int64_t i = 0; i < kBlock; ++i) {
      const int64_t j = b * kBlock + i;
      const float w_low = std::fma(static_cast<float>(row[j] & 15), d_low, m_low);
      const float w_high = std::fma(static_cast<float>(row[j] >> 4), d_high, m_high);
      for (int r = 0; r < rows; ++r)
        acc[r][i % 16] = std::fma(x[r * K + half + j], w_high, std::fma(x[r * K + j], w_low, acc[r][i % 16]));
    }
  }
  for (int r = 0; r < rows; ++r) {
    float sum = 0;
    for (int i = 0; i < 16; ++i) sum += acc[r][i];
    out[r * out_stride] = sum;
  }
}

template <int rows>
void q8_0_row(const float* x, int64_t K, const uint8_t* row, float* out, int64_t out_stride) {
  const uint8_t* numbers = row + K;
  float acc[rows][16] = {};
  for (int64_t k = 0; k < K; ++k) {
    const float w = static_cast<float>(static_cast<int8_t>(row[k])) * half_at(numbers + 2 * (k / kBlock));
    for (int r = 0; r < rows; ++r) acc[r][k % 16] = std::fma(x[r * K + k], w, acc[r][k % 16]);
  }
  for (int r = 0; r < rows; ++r) {
    float sum = 0;
    for (int i = 0; i < 16; ++i) sum += acc[r][i];
    out[r * out_stride] = sum;
  }
}
#endif

// Several consecutive weight rows, one after the other (where no form of its own shares work).
#if !CFM_AVX512 && !CFM_AVX2
template <int rows, int outs>
void q4_1_rows(const float* x, int64_t K, const uint8_t* row, int64_t row_bytes, float* out, int64_t out_stride) {
  for (int o = 0; o < outs; ++o) q4_1_row<rows>(x, K, row + o * row_bytes, out + o, out_stride);
}
#endif

template <int rows, int outs>
void q8_0_rows(const float* x, int64_t K, const uint8_t* row, int64_t row_bytes, float* out, int64_t out_stride) {
  for (int o = 0; o < outs; ++o) q8_0_row<rows>(x, K, row + o * row_bytes, out + o, out_stride);
}

// `row(r0, rows)` for the input rows [0, M), 4 at a time, then the 3, 2 or 1 left.
template <typename Row>
void input_rows(int64_t M, Row&& row) {
  int64_t r0 = 0;
  for (; r0 + 4 <= M; r0 += 4) row(r0, std::integral_constant<int, 4>{});
  switch (M - r0) {
    case 3: row(r0, std::integral_constant<int, 3>{}); break;
    case 2: row(r0, std::integral_constant<int, 2>{}); break;
    case 1: row(r0, std::integral_constant<int, 1>{}); break;
    default: break;
  }
}

// Weight rows are fetched into cache this many rows before they are used: the hardware
// prefetcher alone left the product at about half of the machine's read bandwidth.
constexpr int64_t kAhead = 4;

// out[r, n - begin] (row stride `out_stride`) = x[r] . weight row n, for the weight rows
// [begin, end) of `weights` and the input rows [0, M); two weight rows at a time (twice the
// independent sums), input rows 4 at a time (the weights rebuilt once per 4).
template <template <int, int> class One>
void weight_rows(const float* x, int64_t M, int64_t K, const uint8_t* weights, int64_t row_bytes, int64_t begin,
                 int64_t end, float* out, int64_t out_stride) {
  int64_t n = begin;
  for (; n + 2 <= end; n += 2) {
    if (n + 2 + kAhead <= end)
      for (int64_t byte = 0; byte < 2 * row_bytes; byte += 64)
        __builtin_prefetch(weights + (n + kAhead) * row_bytes + byte, 0, 3);
    input_rows(M, [&](int64_t r0, auto count) {
      One<decltype(count)::value, 2>::run(x + r0 * K, K, weights + n * row_bytes, row_bytes,
                                          out + r0 * out_stride + (n - begin), out_stride);
    });
  }
  if (n < end)
    input_rows(M, [&](int64_t r0, auto count) {
      One<decltype(count)::value, 1>::run(x + r0 * K, K, weights + n * row_bytes, row_bytes,
                                          out + r0 * out_stride + (n - begin), out_stride);
    });
}

// x [M, K] times every weight row of `rows` [N, row_bytes(K)].
template <template <int, int> class One>
at::Tensor product(const at::Tensor& x_in, const at::Tensor& rows_in, int64_t row_bytes, int64_t multiple,
                   const char* name) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat, name, ": x must be float32 [M, K]");
  TORCH_CHECK(rows_in.dim() == 2 && rows_in.scalar_type() == at::kByte, name, ": rows must be uint8 [N, bytes]");
  TORCH_CHECK(x_in.size(1) % multiple == 0 && rows_in.size(1) == row_bytes, name,
              ": x's K and the rows' width disagree (K must be a multiple of ", multiple, ")");
  TORCH_CHECK(x_in.size(1) <= kMaxInputs, name, ": at most ", kMaxInputs, " inputs");
  const auto x = x_in.contiguous(), rows = rows_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = rows.size(0);
  auto out = at::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const uint8_t* wp = rows.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    weight_rows<One>(xp, M, K, wp, row_bytes, begin, end, op + begin, N);
  });
  return out;
}

template <int rows, int outs> struct Q4_1 {
  static void run(const float* x, int64_t K, const uint8_t* row, int64_t row_bytes, float* out, int64_t s) {
    q4_1_rows<rows, outs>(x, K, row, row_bytes, out, s);
  }
};
template <int rows, int outs> struct Q8_0 {
  static void run(const float* x, int64_t K, const uint8_t* row, int64_t row_bytes, float* out, int64_t s) {
    q8_0_rows<rows, outs>(x, K, row, row_bytes, out, s);
  }
};

at::Tensor q4_1_linear(const at::Tensor& x, const at::Tensor& rows) {
  return product<Q4_1>(x, rows, q4_1_row_bytes(x.size(1)), 2 * kBlock, "q4_1_linear");
}

at::Tensor q8_0_linear(const at::Tensor& x, const at::Tensor& rows) {
  return product<Q8_0>(x, rows, q8_0_row_bytes(x.size(1)), kBlock, "q8_0_linear");
}

// Items 0..count-1 grouped by key(i) in [0, keys) (a stable counting sort): key k's items are
// order[start[k], start[k + 1]), in ascending order.
struct Grouped {
  std::vector<int64_t> start, order;
};

template <typename Key>
Grouped group_by(int64_t count, int64_t keys, Key&& key) {
  Grouped grouped{std::vector<int64_t>(keys + 1, 0), std::vector<int64_t>(count)};
  for (int64_t i = 0; i < count; ++i) ++grouped.start[key(i) + 1];
  for (int64_t k = 0; k < keys; ++k) grouped.start[k + 1] += grouped.start[k];
  std::vector<int64_t> next(grouped.start.begin(), grouped.start.end() - 1);
  for (int64_t i = 0; i < count; ++i) grouped.order[next[key(i)]++] = i;
  return grouped;
}

// Routed FFNs (decode): only the chosen experts' weights are read.
//
//   cfmlang::q4_1_gather(x [M, K] f32, rows [E * width, row_bytes(K)] u8, index [M, C] i64, width)
//       -> [M, C * width]: for each token t and chosen expert c, x[t] times the `width`
//          consecutive Q4_1 weight rows of expert index[t, c] (its gate rows, then its up rows).
//
// The tasks (t, c) are grouped by expert, so that an expert chosen by several tokens of a
// batch has its rows read once per 4 of them, as in `product`. Each token's sums are the
// same whatever the batch: every input row has its own accumulators.
at::Tensor q4_1_gather(const at::Tensor& x_in, const at::Tensor& rows_in, const at::Tensor& index_in, int64_t width) {
  const auto x = x_in.contiguous(), rows = rows_in.contiguous(), index = index_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1), row_bytes = q4_1_row_bytes(K);
  TORCH_CHECK(x.scalar_type() == at::kFloat && K % (2 * kBlock) == 0 && K <= kMaxInputs && rows.dim() == 2
              && rows.scalar_type() == at::kByte && rows.size(1) == row_bytes && width > 0
              && rows.size(0) % width == 0, "q4_1_gather: x, rows and width disagree");
  TORCH_CHECK(index.dim() == 2 && index.size(0) == M && index.scalar_type() == at::kLong,
              "q4_1_gather: index must be int64 [M, C]");
  const int64_t C = index.size(1), experts = rows.size(0) / width, tasks = M * C;
  const int64_t* ip = index.data_ptr<int64_t>();
  for (int64_t i = 0; i < tasks; ++i) TORCH_CHECK(ip[i] >= 0 && ip[i] < experts, "q4_1_gather: expert out of range");
  const Grouped by_expert = group_by(tasks, experts, [&](int64_t i) { return ip[i]; });
  const std::vector<int64_t>& start = by_expert.start;
  std::vector<int64_t> chosen;
  for (int64_t e = 0; e < experts; ++e)
    if (start[e + 1] > start[e]) chosen.push_back(e);
  auto out = at::empty({M, C * width}, x.options());
  const float* xp = x.data_ptr<float>();
  const uint8_t* wp = rows.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, static_cast<int64_t>(chosen.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> inputs, sums;
    for (int64_t g = begin; g < end; ++g) {
      const int64_t e = chosen[g], first = start[e], count = start[e + 1] - first;
      inputs.resize(count * K);
      sums.resize(count * width);
      for (int64_t i = 0; i < count; ++i)
        std::memcpy(inputs.data() + i * K, xp + (by_expert.order[first + i] / C) * K, K * sizeof(float));
      weight_rows<Q4_1>(inputs.data(), count, K, wp, row_bytes, e * width, (e + 1) * width, sums.data(), width);
      for (int64_t i = 0; i < count; ++i)
        std::memcpy(op + by_expert.order[first + i] * width, sums.data() + i * width, width * sizeof(float));
    }
  });
  return out;
}

//   cfmlang::q4_1_columns(a [M, C * width] f32, codes [N, D/2] u8, numbers [B, 2, D] f16,
//                         block_of [N] i32, index [M, C] i64, width) -> [M, D]
//       out[t] = sum over chosen experts c and their neurons j of a[t, c * width + j] times
//       the down-projection column of neuron n = index[t, c] * width + j. A column is held
//       neuron by neuron: codes[n] (output h in the low nibble of byte h, output h + D/2 in
//       the high one) with the float16 (d, m) of the Q4_1 block the neuron belonged to in
//       the original weight (numbers[block_of[n], 0 / 1, h]): w = fma(q, d, m), bit for bit
//       the original weight.
//
// A token's chosen neurons are first ordered by block (a counting sort), so that each
// block's numbers are loaded once per group of outputs, not once per neuron. Outputs go in
// groups of kColumnChunks chunks of 16 in each half (their sums in registers) over the
// threads; every group sums its neurons in the same order whatever the number of threads.
constexpr int64_t kColumnChunks = 3;   // 6 groups for SmolLM2's 576 outputs: work for both cores

struct Chosen {
  std::vector<int64_t> neuron;
  std::vector<float> activation;
  std::vector<int64_t> block_start;     // neurons of block b: [block_start[b], block_start[b + 1])
};

Chosen by_block(const float* a, const int64_t* index, const int32_t* block_of, int64_t C, int64_t width,
                int64_t blocks) {
  const auto neuron = [&](int64_t i) { return index[i / width] * width + i % width; };   // i = c * width + j
  Grouped grouped = group_by(C * width, blocks, [&](int64_t i) { return block_of[neuron(i)]; });
  Chosen chosen{std::vector<int64_t>(C * width), std::vector<float>(C * width), std::move(grouped.start)};
  for (int64_t slot = 0; slot < C * width; ++slot) {
    chosen.neuron[slot] = neuron(grouped.order[slot]);
    chosen.activation[slot] = a[grouped.order[slot]];
  }
  return chosen;
}

// out[h0 + 16 i] and out[half + h0 + 16 i] for i < chunks, over every chosen neuron.
template <int chunks>
void column_group(const Chosen& chosen, const uint8_t* codes, const uint8_t* numbers, int64_t D, int64_t h0,
                  float* out) {
  const int64_t half = D / 2, blocks = static_cast<int64_t>(chosen.block_start.size()) - 1;
#if CFM_AVX512 || CFM_AVX2
  constexpr int vectors = chunks * 16 / Lanes::width;
  using F = Lanes::F;
  F low[vectors], high[vectors];
  for (int i = 0; i < vectors; ++i) low[i] = high[i] = Lanes::zero();
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t first = chosen.block_start[b], last = chosen.block_start[b + 1];
    if (first == last) continue;
    const uint8_t* scale = numbers + b * 2 * D * 2;
    const uint8_t* offset = scale + D * 2;
    F d_low[vectors], m_low[vectors], d_high[vectors], m_high[vectors];
    for (int i = 0; i < vectors; ++i) {
      const int64_t h = h0 + Lanes::width * i;
      d_low[i] = Lanes::halves(scale + 2 * h), m_low[i] = Lanes::halves(offset + 2 * h);
      d_high[i] = Lanes::halves(scale + 2 * (h + half)), m_high[i] = Lanes::halves(offset + 2 * (h + half));
    }
    for (int64_t s = first; s < last; ++s) {
      const uint8_t* row = codes + chosen.neuron[s] * half + h0;
      const F activation = Lanes::splat(chosen.activation[s]);
      for (int i = 0; i < vectors; ++i) {
        F q_low, q_high;
        Lanes::nibbles(row + Lanes::width * i, q_low, q_high);
        low[i] = Lanes::fma(activation, Lanes::fma(q_low, d_low[i], m_low[i]), low[i]);
        high[i] = Lanes::fma(activation, Lanes::fma(q_high, d_high[i], m_high[i]), high[i]);
      }
    }
  }
  for (int i = 0; i < vectors; ++i) {
    Lanes::store(out + h0 + Lanes::width * i, low[i]);
    Lanes::store(out + half + h0 + Lanes::width * i, high[i]);
  }
#else
  float low[chunks][16] = {}, high[chunks][16] = {};
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* scale = numbers + b * 2 * D * 2;
    const uint8_t* offset = scale + D * 2;
    for (int64_t s = chosen.block_start[b]; s < chosen.block_start[b + 1]; ++s) {
      const uint8_t* row = codes + chosen.neuron[s] * half;
      const float activation = chosen.activation[s];
      for (int i = 0; i < chunks; ++i)
        for (int lane = 0; lane < 16; ++lane) {
          const int64_t h = h0 + 16 * i + lane;
          const float w_low = std::fma(static_cast<float>(row[h] & 15), half_at(scale + 2 * h), half_at(offset + 2 * h));
          const float w_high = std::fma(static_cast<float>(row[h] >> 4), half_at(scale + 2 * (h + half)),
                                        half_at(offset + 2 * (h + half)));
          low[i][lane] = std::fma(activation, w_low, low[i][lane]);
          high[i][lane] = std::fma(activation, w_high, high[i][lane]);
        }
    }
  }
  for (int i = 0; i < chunks; ++i)
    for (int lane = 0; lane < 16; ++lane) {
      out[h0 + 16 * i + lane] = low[i][lane];
      out[half + h0 + 16 * i + lane] = high[i][lane];
    }
#endif
}

at::Tensor q4_1_columns(const at::Tensor& a_in, const at::Tensor& codes_in, const at::Tensor& numbers_in,
                        const at::Tensor& block_in, const at::Tensor& index_in, int64_t width) {
  const auto a = a_in.contiguous(), codes = codes_in.contiguous(), numbers = numbers_in.contiguous();
  const auto block_of = block_in.contiguous(), index = index_in.contiguous();
  const int64_t M = a.size(0), C = index.size(1), N = codes.size(0), D = 2 * codes.size(1), half = D / 2;
  TORCH_CHECK(a.scalar_type() == at::kFloat && a.dim() == 2 && a.size(1) == C * width && index.size(0) == M
              && index.scalar_type() == at::kLong && codes.scalar_type() == at::kByte
              && numbers.scalar_type() == at::kHalf && numbers.dim() == 3 && numbers.size(1) == 2
              && numbers.size(2) == D && block_of.scalar_type() == at::kInt && block_of.numel() == N
              && half % 16 == 0 && width > 0 && N % width == 0, "q4_1_columns: shapes or types disagree");
  const int64_t blocks = numbers.size(0);
  const int32_t* bp = block_of.data_ptr<int32_t>();
  for (int64_t n = 0; n < N; ++n) TORCH_CHECK(bp[n] >= 0 && bp[n] < blocks, "q4_1_columns: block out of range");
  const int64_t* ip = index.data_ptr<int64_t>();
  for (int64_t i = 0; i < M * C; ++i) TORCH_CHECK(ip[i] >= 0 && ip[i] < N / width, "q4_1_columns: expert out of range");
  auto out = at::empty({M, D}, a.options());
  const float* ap = a.data_ptr<float>();
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const uint8_t* np = reinterpret_cast<const uint8_t*>(numbers.data_ptr<at::Half>());
  float* op = out.data_ptr<float>();
  const int64_t groups = (half / 16 + kColumnChunks - 1) / kColumnChunks;
  for (int64_t t = 0; t < M; ++t) {
    const Chosen chosen = by_block(ap + t * C * width, ip + t * C, bp, C, width, blocks);
    at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
      for (int64_t g = begin; g < end; ++g) {
        const int64_t h0 = g * 16 * kColumnChunks, chunks = std::min<int64_t>(kColumnChunks, (half - h0) / 16);
        float* row_out = op + t * D;
        switch (chunks) {
          case 3: column_group<3>(chosen, cp, np, D, h0, row_out); break;
          case 2: column_group<2>(chosen, cp, np, D, h0, row_out); break;
          default: column_group<1>(chosen, cp, np, D, h0, row_out); break;
        }
      }
    });
  }
  return out;
}

}  // namespace

// The ops' namespace: `cfmlang`, or another name given at build time (the tests build the
// portable form beside the AVX-512 one under a second name).
#ifndef CFM_OPS_NAMESPACE
#define CFM_OPS_NAMESPACE cfmlang
#endif

TORCH_LIBRARY(CFM_OPS_NAMESPACE, m) {
  m.def("q4_1_linear(Tensor x, Tensor rows) -> Tensor");
  m.def("q8_0_linear(Tensor x, Tensor rows) -> Tensor");
  m.def("q4_1_gather(Tensor x, Tensor rows, Tensor index, int width) -> Tensor");
  m.def("q4_1_columns(Tensor a, Tensor codes, Tensor numbers, Tensor block_of, Tensor index, int width) -> Tensor");
}

TORCH_LIBRARY_IMPL(CFM_OPS_NAMESPACE, CPU, m) {
  m.impl("q4_1_linear", &q4_1_linear);
  m.impl("q8_0_linear", &q8_0_linear);
  m.impl("q4_1_gather", &q4_1_gather);
  m.impl("q4_1_columns", &q4_1_columns);
}
