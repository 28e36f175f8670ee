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
// are split over the threads; the weights are read once per 4 input rows.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <cmath>
#include <cstring>
#include <type_traits>
#if defined(__AVX512F__) && defined(__F16C__)
#include <immintrin.h>
#define CFM_AVX512 1
#endif

namespace {

constexpr int64_t kBlock = 32;
constexpr int64_t kMaxInputs = 65536;   // K of a packed layer (packing.MAX_PACKED_INPUTS)

inline float half_at(const uint8_t* bytes) {
  uint16_t bits;
  std::memcpy(&bits, bytes, 2);
#if CFM_AVX512
  return _cvtsh_ss(bits);
#else
  return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
#endif
}

#if CFM_AVX512
// The blocks' float16 numbers of a row, as float32 (`count` of them, a multiple of 2).
inline void numbers_as_floats(const uint8_t* numbers, int64_t count, float* out) {
  int64_t i = 0;
  for (; i + 16 <= count; i += 16)
    _mm512_storeu_ps(out + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(numbers + 2 * i))));
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
#if !CFM_AVX512
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

// x [M, K] times every weight row of `rows` [N, row_bytes(K)]; `one(x, K, row, out, stride)`
// computes one output column for a template number of input rows.
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
    int64_t n = begin;
    for (; n + 2 <= end; n += 2) {        // two weight rows at a time: twice the independent sums
      if (n + 2 + kAhead <= end)
        for (int64_t byte = 0; byte < 2 * row_bytes; byte += 64) __builtin_prefetch(wp + (n + kAhead) * row_bytes + byte, 0, 3);
      input_rows(M, [&](int64_t r0, auto count) {
        One<decltype(count)::value, 2>::run(xp + r0 * K, K, wp + n * row_bytes, row_bytes, op + r0 * N + n, N);
      });
    }
    if (n < end)
      input_rows(M, [&](int64_t r0, auto count) {
        One<decltype(count)::value, 1>::run(xp + r0 * K, K, wp + n * row_bytes, row_bytes, op + r0 * N + n, N);
      });
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
  return product<Q4_1>(x, rows, x.size(1) / 2 + 4 * (x.size(1) / kBlock), 2 * kBlock, "q4_1_linear");
}

at::Tensor q8_0_linear(const at::Tensor& x, const at::Tensor& rows) {
  return product<Q8_0>(x, rows, x.size(1) + 2 * (x.size(1) / kBlock), kBlock, "q8_0_linear");
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
}

TORCH_LIBRARY_IMPL(CFM_OPS_NAMESPACE, CPU, m) {
  m.impl("q4_1_linear", &q4_1_linear);
  m.impl("q8_0_linear", &q8_0_linear);
}
