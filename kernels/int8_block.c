/* edgesmith.QInvertedResidual: a MobileNetV2 block on onnxruntime's int8 grid, in one kernel.
 *
 * It computes exactly what onnxruntime computes for the block's QDQ graph (QLinearConv x3, and
 * QLinearAdd for the residual): uint8 activations, int8 weights with per-channel scales and no
 * zero point, int32 accumulation with the int32 bias, and requantization as onnxruntime's MLAS
 * does it: float(acc + bias) * (x_scale * w_scale[c] / y_scale), clamped, rounded half to even,
 * plus the zero point. The expanded tensor never leaves the cache: the image goes an output row
 * at a time through a ring of three expanded rows (each expanded once).
 *
 * Layout is NHWC, uint8 ([N, H, W, C] in, [N, OH, OW, O] out): consecutive blocks pass their
 * tensors on without a transpose; the graph pass puts one before a run of blocks and one after
 * it. The stem (a 3x3 expand) reads the image as it comes, NCHW: its patches are runs of the
 * channels' planes.
 *
 * Inputs:  X u8 [N,H,W,C] ([N,C,H,W] for a 3x3 expand); We i8 [E,C,k,k] (k 1, or 3: a network's stem), Be i32 [E], We_scale
 *          f32 [E]; Wd i8 [E,1,3,3], Bd i32 [E], Wd_scale [E]; Wp i8 [O,E,1,1], Bp i32 [O],
 *          Wp_scale [O]  (all but X initializers: packed once, at session creation)
 * Attrs:   stride (the depthwise's), expand_stride (a 3x3 expand's), residual (0|1),
 *          band_rows (output rows per step: the autotuned knob; 0 picks a default),
 *          residual_first (1: the Add's first input is the block's input), and the activations'
 *          grids: x_scale, x_zero, e_scale, e_zero (expanded), d_scale, d_zero (depthwise),
 *          p_scale, p_zero (projected), y_scale, y_zero (the residual sum's)
 *
 * Arithmetic: the 1x1 and the stem's 3x3 convs are u8 x s8 dot products of four (x86:
 * `vpdpbusd` of AVX-512 VNNI or AVX-VNNI, else AVX2's `vpmaddubsw` for 7-bit weights and
 * `vpmaddwd` for 8-bit ones; ARM: `sdot`, else `smull` and
 * `sadalp`; elsewhere plain C the compiler vectorises), their input zero point
 * folded into the bias (sum over k of x*w - x_zero * sum of w). The depthwise runs in float on
 * the expanded values less their zero point: every product and partial sum is an integer below
 * 2^24, so float is exact, and the kernel refuses a bias that could leave that range.
 */
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "edgesmith_ops.h"

/* float vectors of QW lanes for the depthwise and the requantization: the same code at both
 * x86 widths */
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define QVNNI 1
#define QW 16
typedef __m512 qf;
typedef __m512i qi;
#define QF_LOAD _mm512_loadu_ps
#define QF_SET1 _mm512_set1_ps
#define QF_ZERO _mm512_setzero_ps
#define QF_FMA _mm512_fmadd_ps
#define QF_ADD _mm512_add_ps
#define QF_MUL _mm512_mul_ps
#define QF_MAX _mm512_max_ps
#define QF_MIN _mm512_min_ps
#define QF_ROUND(f) _mm512_roundscale_ps(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define QF_STORE _mm512_storeu_ps
#define QF_FROM_I _mm512_cvtepi32_ps
#define QI_ROUND(f) _mm512_cvt_roundps_epi32(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define QI_ADD _mm512_add_epi32
#define QI_SET1 _mm512_set1_epi32
#define QI_LOAD(p) _mm512_loadu_si512(p)
#define QI_U8(p) _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p)))
/* QW int32 in [0, 255] stored as bytes */
static inline void qi_store_u8(uint8_t *to, qi v) { _mm_storeu_si128((__m128i *)to, _mm512_cvtusepi32_epi8(v)); }
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#if defined(__AVXVNNI__)
/* AVX-VNNI without AVX-512 (Alder Lake and later client cores, Intel N100): `vpdpbusd` on
 * 256 bits, VEX-encoded */
#define QYVNNI 1
#define DPBUSD256 _mm256_dpbusd_avx_epi32
#elif defined(__AVX512VNNI__) && defined(__AVX512VL__)
/* the same 256-bit instruction in its EVEX form: how a host with AVX-512 VNNI but no AVX-VNNI
 * runs this path's code (a build with AVX-512 VNNI otherwise takes the 512-bit path above) */
#define QYVNNI 1
#define DPBUSD256 _mm256_dpbusd_epi32
#else
#define QAVX2 1
#endif
#define QW 8
typedef __m256 qf;
typedef __m256i qi;
#define QF_LOAD _mm256_loadu_ps
#define QF_SET1 _mm256_set1_ps
#define QF_ZERO _mm256_setzero_ps
#define QF_FMA _mm256_fmadd_ps
#define QF_ADD _mm256_add_ps
#define QF_MUL _mm256_mul_ps
#define QF_MAX _mm256_max_ps
#define QF_MIN _mm256_min_ps
#define QF_ROUND(f) _mm256_round_ps(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define QF_STORE _mm256_storeu_ps
#define QF_FROM_I _mm256_cvtepi32_ps
#define QI_ROUND(f) _mm256_cvtps_epi32(f) /* onnxruntime leaves MXCSR at round to even */
#define QI_ADD _mm256_add_epi32
#define QI_SET1 _mm256_set1_epi32
#define QI_LOAD(p) _mm256_loadu_si256((const __m256i *)(p))
#define QI_U8(p) _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p)))
static inline void qi_store_u8(uint8_t *to, qi v) {
  __m128i w = _mm_packus_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  _mm_storel_epi64((__m128i *)to, _mm_packus_epi16(w, w));
}
#elif defined(__aarch64__)
#include <arm_neon.h>
#define QNEON 1
#define QW 4
typedef float32x4_t qf;
typedef int32x4_t qi;
#define QF_LOAD vld1q_f32
#define QF_SET1 vdupq_n_f32
#define QF_ZERO() vdupq_n_f32(0.0f)
#define QF_FMA(a, b, c) vfmaq_f32(c, a, b)
#define QF_ADD vaddq_f32
#define QF_MUL vmulq_f32
#define QF_MAX vmaxq_f32
#define QF_MIN vminq_f32
#define QF_ROUND vrndnq_f32
#define QF_STORE vst1q_f32
#define QF_FROM_I vcvtq_f32_s32
#define QI_ROUND vcvtnq_s32_f32
#define QI_ADD vaddq_s32
#define QI_SET1 vdupq_n_s32
#define QI_LOAD vld1q_s32
static inline qi qi_u8(const uint8_t *p) {
  uint8x8_t b = vreinterpret_u8_u32(vld1_dup_u32((const uint32_t *)p)); /* 4 bytes, any alignment */
  return vreinterpretq_s32_u32(vmovl_u16(vget_low_u16(vmovl_u8(b))));
}
#define QI_U8 qi_u8
static inline void qi_store_u8(uint8_t *to, qi v) {
  uint8x8_t b = vqmovn_u16(vcombine_u16(vqmovun_s32(v), vqmovun_s32(v)));
  vst1_lane_u32((uint32_t *)to, vreinterpret_u32_u8(b), 0);
}
#endif
#if defined(QVNNI) || defined(QYVNNI) || defined(QAVX2) || defined(QNEON)
#define QVEC 1
#endif

#define QL 16       /* output channels per vector of int32 */
#define QP 6        /* pixels per micro-tile: 6 x 4 accumulators of 16 lanes */
#define QV 4        /* vectors of output channels per micro-tile */
#define EXACT (1 << 24)
#define QMAX_CHANNELS 65536

typedef struct {
  int c, e, o, k, es, stride, residual, residual_first, band_rows;
  int kp, ep, op; /* the expand's reduction, expanded and output channels, padded */
  int x_zero, e_zero, d_zero, p_zero, y_zero;
  float add_a, add_b, add_fixed; /* QLinearAdd's ratios and fixed part, as MLAS computes them */
  int8_t *we, *wp;               /* panels (pack_panels) */
  int we_wide, wp_wide;          /* AVX2: panels widened to int16 (weights beyond 7 bits) */
  int32_t *be, *bp;              /* biases with the input zero point folded in */
  float *se, *sd, *sp;           /* requantization scales per channel (0 for padding) */
  float *wd, *bd;                /* depthwise taps [9][ep] and bias, as floats */
  struct Chunk *chunk;
  int split_alone; /* split calls whose tasks all ran on the calling thread; < 0: never again */
} QBlock;

static OrtStatus *qfail(const char *msg) { return api->CreateStatus(ORT_INVALID_ARGUMENT, msg); }

/* an initializer input of this element type and rank */
static OrtStatus *qconstant(const OrtKernelInfo *info, size_t index,
                            ONNXTensorElementDataType type, const void **data, int64_t *dims,
                            size_t rank) {
  int is_const = 0;
  const OrtValue *v = NULL;
  OrtStatus *st = api->KernelInfoGetConstantInput_tensor(info, index, &is_const, &v);
  if (st) return st;
  if (!is_const) return qfail("edgesmith.QInvertedResidual: weights must be initializers");
  OrtTensorTypeAndShapeInfo *shape;
  if ((st = api->GetTensorTypeAndShape(v, &shape))) return st;
  size_t got = 0;
  ONNXTensorElementDataType t;
  st = api->GetTensorElementType(shape, &t);
  if (!st) st = api->GetDimensionsCount(shape, &got);
  if (!st && (got != rank || t != type))
    st = qfail("edgesmith.QInvertedResidual: a weight has the wrong rank or type");
  if (!st) st = api->GetDimensions(shape, dims, rank);
  api->ReleaseTensorTypeAndShapeInfo(shape);
  return st ? st : api->GetTensorMutableData((OrtValue *)v, (void **)data);
}

static OrtStatus *attr_f(const OrtKernelInfo *info, const char *name, float *out) {
  return api->KernelInfoGetAttribute_float(info, name, out);
}

static OrtStatus *attr_i(const OrtKernelInfo *info, const char *name, int64_t lo, int64_t hi,
                         int *out) {
  int64_t v = 0;
  OrtStatus *st = api->KernelInfoGetAttribute_int64(info, name, &v);
  if (st) return st;
  if (v < lo || v > hi) return qfail("edgesmith.QInvertedResidual: an attribute is out of range");
  *out = (int)v;
  return NULL;
}

#if defined(QNEON) || defined(QYVNNI)
#define QV_PACK 1     /* panels 16 channels wide: tile_neon's and tile_dot4's */
#define WEIGHT_BYTES (size_t)1
#elif defined(QAVX2)
#define QV_PACK 1     /* panels one vector of 16 channels wide: tile_avx2's */
#define WEIGHT_BYTES (size_t)2
/* n packed int8 weights widened in place to int16 (the buffer holds 2n bytes) */
static void widen(int8_t *p, size_t n) {
  int16_t *to = (int16_t *)p;
  for (size_t i = n; i-- > 0;) to[i] = p[i];
}

/* whether n weights fit 7 bits (|w| <= 64, as the recipes' reduce_range makes them): then
 * `vpmaddubsw`'s pair sums, at most 255 x 64 x 2, cannot saturate */
static int seven_bit(const int8_t *w, size_t n) {
  for (size_t i = 0; i < n; i++)
    if (w[i] < -64 || w[i] > 64) return 0;
  return 1;
}
#else
#define QV_PACK QV
#define WEIGHT_BYTES (size_t)1
#endif

/* w [rows][k] int8 into zeroed panels: for each tile of nv <= QV vectors of output channels
 * from c0, a [k/4][nv*QL][4] panel at c0 * kp bytes: the micro-kernel reads it in order, four
 * k's of one channel being one 32-bit lane of `vpdpbusd` */
static void pack_panels(int8_t *p, const int8_t *w, int rows, int k, int kp, int padded) {
  for (int c0 = 0, nv; c0 < padded; c0 += nv * QL) {
    nv = (padded - c0) / QL < QV_PACK ? (padded - c0) / QL : QV_PACK;
    int8_t *panel = p + (size_t)c0 * kp;
    for (int c = 0; c < nv * QL && c0 + c < rows; c++)
      for (int j = 0; j < k; j++)
        panel[((size_t)(j / 4) * nv * QL + c) * 4 + j % 4] = w[(size_t)(c0 + c) * k + j];
  }
}

/* what the GEMM takes from each activation before multiplying (NEON: signed bytes) */
#ifdef QNEON
#define X_OFFSET 128
#else
#define X_OFFSET 0
#endif

static void qblock_free(QBlock *b) {
  if (!b) return;
  packed_free(b->chunk);
  free(b);
}

static void *qtake(char **at, size_t bytes) {
  void *p = *at;
  *at += ROUND_UP(bytes, (size_t)LINE);
  return p;
}

static OrtStatus *ORT_API_CALL qcreate(const OrtCustomOp *op, const OrtApi *a,
                                       const OrtKernelInfo *info, void **out) {
  (void)op; (void)a;
  QBlock *b = calloc(1, sizeof(QBlock));
  if (!b) return api->CreateStatus(ORT_FAIL, "edgesmith.QInvertedResidual: out of memory");
  OrtStatus *st = NULL;
  const int8_t *we, *wd, *wp;
  const int32_t *be, *bd, *bp;
  const float *swe, *swd, *swp;
  int64_t dwe[4], dbe[1], dse[1], dwd[4], dbd[1], dsd[1], dwp[4], dbp[1], dsp[1];
  float xs, es, ds, ps, ys = 1;
#define TRY(call) if (!st) st = (call)
  TRY(qconstant(info, 1, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8, (const void **)&we, dwe, 4));
  TRY(qconstant(info, 2, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32, (const void **)&be, dbe, 1));
  TRY(qconstant(info, 3, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, (const void **)&swe, dse, 1));
  TRY(qconstant(info, 4, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8, (const void **)&wd, dwd, 4));
  TRY(qconstant(info, 5, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32, (const void **)&bd, dbd, 1));
  TRY(qconstant(info, 6, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, (const void **)&swd, dsd, 1));
  TRY(qconstant(info, 7, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8, (const void **)&wp, dwp, 4));
  TRY(qconstant(info, 8, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32, (const void **)&bp, dbp, 1));
  TRY(qconstant(info, 9, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, (const void **)&swp, dsp, 1));
  TRY(attr_i(info, "stride", 1, 2, &b->stride));
  TRY(attr_i(info, "expand_stride", 1, 2, &b->es));
  TRY(attr_i(info, "residual", 0, 1, &b->residual));
  TRY(attr_i(info, "residual_first", 0, 1, &b->residual_first));
  TRY(attr_i(info, "band_rows", 0, 4096, &b->band_rows));
  TRY(attr_i(info, "x_zero", 0, 255, &b->x_zero));
  TRY(attr_i(info, "e_zero", 0, 255, &b->e_zero));
  TRY(attr_i(info, "d_zero", 0, 255, &b->d_zero));
  TRY(attr_i(info, "p_zero", 0, 255, &b->p_zero));
  TRY(attr_f(info, "x_scale", &xs));
  TRY(attr_f(info, "e_scale", &es));
  TRY(attr_f(info, "d_scale", &ds));
  TRY(attr_f(info, "p_scale", &ps));
  if (!st && b->residual) {
    TRY(attr_i(info, "y_zero", 0, 255, &b->y_zero));
    TRY(attr_f(info, "y_scale", &ys));
  }
#undef TRY
  if (st) {
    qblock_free(b);
    return st;
  }
  int e = (int)dwe[0], c = (int)dwe[1], o = (int)dwp[0];
  b->c = c, b->e = e, b->o = o, b->k = (int)dwe[2];
  if (e < 1 || c < 1 || o < 1 || e > QMAX_CHANNELS || c > QMAX_CHANNELS || o > QMAX_CHANNELS ||
      dwe[2] != dwe[3] || (b->k != 1 && b->k != 3) || (b->k == 1 && b->es != 1) ||
      dbe[0] != e || dse[0] != e || dwd[0] != e || dwd[1] != 1 || dwd[2] != 3 || dwd[3] != 3 ||
      dbd[0] != e || dsd[0] != e || dwp[1] != e || dwp[2] != 1 || dwp[3] != 1 || dbp[0] != o ||
      dsp[0] != o || (b->residual && (o != c || b->stride != 1 || b->k != 1)) ||
      !(xs > 0) || !(es > 0) || !(ds > 0) || !(ps > 0) || !(ys > 0) || !isfinite(xs * es * ds * ps * ys)) {
    qblock_free(b);
    return qfail("edgesmith.QInvertedResidual: weights, scales or attributes do not make a block");
  }
  int kin = c * b->k * b->k;
  b->kp = ROUND_UP(kin, 4), b->ep = ROUND_UP(e, QL), b->op = ROUND_UP(o, QL);
  /* the depthwise in float is exact while |acc + bias| < 2^24: 9 taps of at most 255 * 128 */
  for (int i = 0; i < e; i++)
    if (bd[i] > EXACT - 9 * 255 * 128 || bd[i] < -(EXACT - 9 * 255 * 128)) {
      qblock_free(b);
      return qfail("edgesmith.QInvertedResidual: a depthwise bias is too large for exact float");
    }
  size_t bytes = WEIGHT_BYTES * ((size_t)b->ep * b->kp + (size_t)b->op * b->ep) + 16 * (size_t)LINE +
                 sizeof(int32_t) * (b->ep + b->op) + sizeof(float) * (3 * b->ep + b->op + 9 * b->ep);
  char *at = packed_alloc(bytes, &b->chunk);
  if (!at) {
    qblock_free(b);
    return api->CreateStatus(ORT_FAIL, "edgesmith.QInvertedResidual: out of memory");
  }
  b->we = qtake(&at, WEIGHT_BYTES * b->ep * b->kp), b->wp = qtake(&at, WEIGHT_BYTES * b->op * b->ep);
  b->be = qtake(&at, sizeof(int32_t) * b->ep), b->bp = qtake(&at, sizeof(int32_t) * b->op);
  b->se = qtake(&at, sizeof(float) * b->ep), b->sd = qtake(&at, sizeof(float) * b->ep);
  b->sp = qtake(&at, sizeof(float) * b->op);
  b->wd = qtake(&at, sizeof(float) * 9 * b->ep), b->bd = qtake(&at, sizeof(float) * b->ep);
  /* k runs channel, row, column (the weights' order: a 3x3 patch is runs of 3 bytes of the
   * image's planes), padded to kp */
  int8_t *wk = calloc((size_t)e * b->kp, 1);
  if (!wk) {
    qblock_free(b);
    return api->CreateStatus(ORT_FAIL, "edgesmith.QInvertedResidual: out of memory");
  }
  for (int i = 0; i < e; i++) memcpy(wk + (size_t)i * b->kp, we + (size_t)i * kin, kin);
  pack_panels(b->we, wk, e, b->kp, b->kp, b->ep);
  free(wk);
  pack_panels(b->wp, wp, o, e, b->ep, b->op);
#ifdef QAVX2
  b->we_wide = !seven_bit(we, (size_t)e * kin), b->wp_wide = !seven_bit(wp, (size_t)o * e);
  if (b->we_wide) widen(b->we, (size_t)b->ep * b->kp);
  if (b->wp_wide) widen(b->wp, (size_t)b->op * b->ep);
#endif
  /* every accumulator, its products' sum (at most 255 x 128 each) plus the folded bias, must
   * fit in int32: onnxruntime's would wrap */
  int too_deep = 0;
  for (int i = 0; i < e; i++) {
    int64_t sum = 0;
    for (int j = 0; j < kin; j++) sum += we[(size_t)i * kin + j];
    int64_t folded = (int64_t)be[i] - (int64_t)(b->x_zero - X_OFFSET) * sum;
    too_deep |= llabs(folded) + (int64_t)kin * 255 * 128 > INT32_MAX;
    b->be[i] = (int32_t)folded;
    b->se[i] = xs * swe[i] / es; /* as QLinearConv computes its output scales */
    b->sd[i] = es * swd[i] / ds;
    b->bd[i] = (float)bd[i];
    for (int t = 0; t < 9; t++) b->wd[t * b->ep + i] = (float)wd[i * 9 + t];
  }
  for (int i = 0; i < o; i++) {
    int64_t sum = 0;
    for (int j = 0; j < e; j++) sum += wp[(size_t)i * e + j];
    int64_t folded = (int64_t)bp[i] - (int64_t)(b->d_zero - X_OFFSET) * sum;
    too_deep |= llabs(folded) + (int64_t)e * 255 * 128 > INT32_MAX;
    b->bp[i] = (int32_t)folded;
    b->sp[i] = ds * swp[i] / ps;
  }
  if (too_deep) {
    qblock_free(b);
    return qfail("edgesmith.QInvertedResidual: a reduction too deep for int32 accumulators");
  }
  if (b->residual) { /* QLinearAdd: A, B the Add's inputs in order */
    float sa = b->residual_first ? xs : ps, sb = b->residual_first ? ps : xs;
    int za = b->residual_first ? b->x_zero : b->p_zero, zb = b->residual_first ? b->p_zero : b->x_zero;
    b->add_a = sa / ys, b->add_b = sb / ys;
    float part_b = b->add_b * (float)zb; /* MLAS's fixed part, its multiply-add fused */
    b->add_fixed = (float)b->y_zero - fmaf(b->add_a, (float)za, part_b);
  }
  *out = b;
  return NULL;
}

/* ---- one output row ---- */

/* What a GEMM tile's results become: the expanded values less their zero point, as floats
 * (the depthwise's input), or uint8 on the output grid, with the residual added */
typedef struct {
  const int32_t *bias;
  const float *scale;
  int zero;
  float *as_float;         /* [pixel][ld] floats, or NULL: */
  uint8_t *as_u8;          /* [pixel][ld] uint8 */
  long ld;
  int per_row;             /* > 0: pixels are rows of per_row, each row_ld apart (the */
  long row_ld;             /*      expanded rows' zero border pixels lie between) */
  const uint8_t *residual; /* [pixel][res_ld] the block's input, or NULL */
  long res_ld;
  const QBlock *b;
} Epilogue;

static inline int requant_scalar(int32_t acc, float scale, int zero) {
  float f = (float)acc * scale;
  float lo = (float)(0 - zero), hi = (float)(255 - zero);
  f = f < lo ? lo : (f > hi ? hi : f);
  return (int)nearbyintf(f) + zero;
}

/* as MLAS's QLinearAdd (x86): B times its ratio onto the fixed part, then A's, each fused */
static inline int add_scalar(const QBlock *b, int x, int p) {
  float va = (float)(b->residual_first ? x : p), vb = (float)(b->residual_first ? p : x);
  float v = fmaf(va, b->add_a, fmaf(vb, b->add_b, b->add_fixed));
  int r = (int)nearbyintf(v);
  return r < 0 ? 0 : (r > 255 ? 255 : r);
}

#ifdef QVEC
/* QW sums of channels c.. for one pixel (bias not yet added) to where the epilogue says */
static inline __attribute__((always_inline)) void requant_store(const Epilogue *ep, qi acc, qi bias,
                                                                qf scale, int c, long off,
                                                                long pixel) {
  qf f = QF_MUL(QF_FROM_I(QI_ADD(acc, bias)), scale);
  f = QF_MIN(QF_MAX(f, QF_SET1((float)(0 - ep->zero))), QF_SET1((float)(255 - ep->zero)));
  if (ep->as_float) {
    QF_STORE(ep->as_float + off + c, QF_ROUND(f));
    return;
  }
  qi q = QI_ADD(QI_ROUND(f), QI_SET1(ep->zero));
  if (ep->residual) { /* QLinearAdd: the fixed part plus each input times its ratio */
    const QBlock *b = ep->b;
    qf x = QF_FROM_I(QI_U8(ep->residual + pixel * ep->res_ld + c)), y = QF_FROM_I(q);
    qf va = b->residual_first ? x : y, vb = b->residual_first ? y : x;
    qf v = QF_FMA(vb, QF_SET1(b->add_b), QF_SET1(b->add_fixed)); /* B first, as MLAS */
    v = QF_FMA(va, QF_SET1(b->add_a), v);
    q = QI_ROUND(QF_MIN(QF_MAX(v, QF_ZERO()), QF_SET1(255.0f)));
  }
  qi_store_u8(ep->as_u8 + off + c, q);
}

/* each pixel's output offset in a tile */
static inline __attribute__((always_inline)) void tile_offsets(const Epilogue *ep, int p0,
                                                               long off[QP]) {
  if (!ep->per_row) {
    _Pragma("GCC unroll 8") for (int p = 0; p < QP; p++) off[p] = (p0 + p) * ep->ld;
    return;
  }
  long row = p0 / ep->per_row, col = p0 % ep->per_row; /* one division a tile, not one a pixel */
  _Pragma("GCC unroll 8") for (int p = 0; p < QP; p++) {
    off[p] = row * ep->row_ld + col * ep->ld;
    if (++col == ep->per_row) col = 0, row++;
  }
}

/* A tile's sums, sums[p][j] the QW channels n0 + j * QW.. of pixel p0 + p (`rows` pixels, the
 * first m real), requantized to where the epilogue says. Inlined with constant rows and
 * vectors, so the sums stay registers, never an array in memory. */
#define SUMS 4 /* vectors of sums a tile holds per pixel, at most */
static inline __attribute__((always_inline)) void
tile_store(const Epilogue *ep, qi sums[][SUMS], int rows, int vectors, int m, int p0, int n0) {
  const Epilogue e = *ep; /* a copy the byte stores cannot alias: its fields stay registers */
  long off[QP];
  tile_offsets(&e, p0, off);
  _Pragma("GCC unroll 4") for (int j = 0; j < vectors; j++) {
    int c = n0 + j * QW;
    qi bias = QI_LOAD(e.bias + c);
    qf scale = QF_LOAD(e.scale + c);
    _Pragma("GCC unroll 8") for (int p = 0; p < rows; p++) {
      if (p >= m) break;
      requant_store(&e, sums[p][j], bias, scale, c, off[p], p0 + p);
    }
  }
}
#endif

#ifdef QVNNI
static inline __attribute__((always_inline)) void
tile_vnni(const uint8_t *a, long lda, const int8_t *panel, int kq, int nv, int m, int p0, int n0,
          const Epilogue *ep) {
  _Static_assert(QV <= SUMS, "a VNNI tile's vectors are its sums");
  __m512i acc[QP][SUMS];
  _Pragma("GCC unroll 8") for (int p = 0; p < QP; p++)
    _Pragma("GCC unroll 4") for (int j = 0; j < nv; j++) acc[p][j] = _mm512_setzero_si512();
  for (int q = 0; q < kq; q++) {
    __m512i w[QV];
    _Pragma("GCC unroll 4") for (int j = 0; j < nv; j++)
      w[j] = _mm512_loadu_si512(panel + ((size_t)q * nv + j) * QL * 4);
    _Pragma("GCC unroll 8") for (int p = 0; p < QP; p++) {
      __m512i x = _mm512_set1_epi32(*(const int32_t *)(a + p * lda + 4 * q));
      _Pragma("GCC unroll 4") for (int j = 0; j < nv; j++)
        acc[p][j] = _mm512_dpbusd_epi32(acc[p][j], x, w[j]);
    }
  }
  tile_store(ep, acc, QP, nv, m, p0, n0);
}
#endif

#if defined(QYVNNI) || defined(QAVX2)
/* Four u8 x s8 products per int32 lane on 256 bits: AVX-VNNI's `vpdpbusd`; on AVX2 with 7-bit
 * weights (|w| <= 64) `vpmaddubsw`, whose int16 pair sums then cannot saturate (255 x 127 x 2
 * would not fit; 255 x 64 x 2 does), and `vpmaddwd` by ones. 16 registers: 6 pixels x 16
 * channels (two vectors of 8) take 12 accumulators, the panel's two weight vectors and the
 * broadcast pixel one each. */
#ifdef QYVNNI
#define DOT4(acc, x, w) DPBUSD256(acc, x, w)
#else
#define DOT4(acc, x, w) \
  _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(x, w), _mm256_set1_epi16(1)))
#endif
static inline __attribute__((always_inline)) void
tile_dot4(const uint8_t *a, long lda, const int8_t *panel, int kq, int m, int p0, int n0,
          const Epilogue *ep) {
  __m256i acc[QP][SUMS];
  _Pragma("GCC unroll 8") for (int p = 0; p < QP; p++)
    _Pragma("GCC unroll 2") for (int j = 0; j < 2; j++) acc[p][j] = _mm256_setzero_si256();
  for (int q = 0; q < kq; q++) {
    const int8_t *w = panel + (size_t)q * QL * 4;
    __m256i w0 = _mm256_loadu_si256((const __m256i *)w);
    __m256i w1 = _mm256_loadu_si256((const __m256i *)(w + 32));
    _Pragma("GCC unroll 8") for (int p = 0; p < QP; p++) {
      __m256i x = _mm256_set1_epi32(*(const int32_t *)(a + p * lda + 4 * q));
      acc[p][0] = DOT4(acc[p][0], x, w0);
      acc[p][1] = DOT4(acc[p][1], x, w1);
    }
  }
  tile_store(ep, acc, QP, 2, m, p0, n0);
}
#endif

#ifdef QAVX2
/* 8-bit weights: widened to int16 at packing, activations as they are loaded, and vpmaddwd,
 * whose pairs are exact in int32. Each channel's sum comes in two lanes (k 0-1 and 2-3 of a
 * group of four), added pairwise at the end. 3 pixels x 16 channels: 12 accumulators of 16. */
#define QPA 3
static inline __attribute__((always_inline)) void
tile_avx2(const uint8_t *a, long lda, const int16_t *panel, int kq, int m, int p0, int n0,
          const Epilogue *ep) {
  __m256i acc[QPA][4];
  _Pragma("GCC unroll 4") for (int p = 0; p < QPA; p++)
    _Pragma("GCC unroll 4") for (int j = 0; j < 4; j++) acc[p][j] = _mm256_setzero_si256();
  for (int q = 0; q < kq; q++) {
    const int16_t *w = panel + (size_t)q * QL * 4;
    _Pragma("GCC unroll 4") for (int p = 0; p < QPA; p++) {
      __m256i x = _mm256_cvtepu8_epi16(_mm_set1_epi32(*(const int32_t *)(a + p * lda + 4 * q)));
      _Pragma("GCC unroll 4") for (int j = 0; j < 4; j++)
        acc[p][j] = _mm256_add_epi32(acc[p][j], _mm256_madd_epi16(
            x, _mm256_loadu_si256((const __m256i *)(w + j * 16))));
    }
  }
  __m256i sums[QP][SUMS];    /* each channel's two lanes added: channels 0-7, then 8-15 */
  _Pragma("GCC unroll 4") for (int p = 0; p < QPA; p++)
    _Pragma("GCC unroll 2") for (int h = 0; h < 2; h++)
      sums[p][h] = _mm256_permute4x64_epi64(_mm256_hadd_epi32(acc[p][2 * h], acc[p][2 * h + 1]),
                                            _MM_SHUFFLE(3, 1, 2, 0));
  tile_store(ep, sums, QPA, 2, m, p0, n0);
}
#endif

#ifdef QNEON
/* NEON multiplies signed bytes: the activations go in as x - 128 (x ^ 0x80) and 128 * sum(w) is
 * folded into the bias (qcreate). With the dot-product extension (Cortex-A76, A78, Orin:
 * `sdot`) one instruction sums four products per lane; without it (the Pi 4's Cortex-A72)
 * `smull` makes int16 products (at most 128 * 128: no overflow) and `sadalp` adds their pairs
 * into int32, each channel's sum in two lanes added pairwise at the end. 16 channels a tile. */
#define QPN 3
static inline __attribute__((always_inline)) void
tile_neon(const uint8_t *a, long lda, const int8_t *panel, int kq, int m, int p0, int n0,
          const Epilogue *ep) {
#ifdef __ARM_FEATURE_DOTPROD
  int32x4_t acc[QP][SUMS];
  _Pragma("GCC unroll 4") for (int p = 0; p < QPN; p++)
    _Pragma("GCC unroll 4") for (int j = 0; j < 4; j++) acc[p][j] = vdupq_n_s32(0);
  for (int q = 0; q < kq; q++) {
    const int8_t *w = panel + (size_t)q * QL * 4;
    int8x16_t wv[4];
    _Pragma("GCC unroll 4") for (int j = 0; j < 4; j++) wv[j] = vld1q_s8(w + 16 * j);
    _Pragma("GCC unroll 4") for (int p = 0; p < QPN; p++) {
      uint32_t four;
      memcpy(&four, a + p * lda + 4 * q, 4);
      int8x16_t x = vreinterpretq_s8_u32(vdupq_n_u32(four ^ 0x80808080u));
      _Pragma("GCC unroll 4") for (int j = 0; j < 4; j++) acc[p][j] = vdotq_s32(acc[p][j], wv[j], x);
    }
  }
#else
  int32x4_t pairs[QPN][8];
  _Pragma("GCC unroll 4") for (int p = 0; p < QPN; p++)
    _Pragma("GCC unroll 8") for (int j = 0; j < 8; j++) pairs[p][j] = vdupq_n_s32(0);
  for (int q = 0; q < kq; q++) {
    const int8_t *w = panel + (size_t)q * QL * 4;
    int8x16_t wv[4];
    _Pragma("GCC unroll 4") for (int j = 0; j < 4; j++) wv[j] = vld1q_s8(w + 16 * j);
    _Pragma("GCC unroll 4") for (int p = 0; p < QPN; p++) {
      uint32_t four;
      memcpy(&four, a + p * lda + 4 * q, 4);
      int8x16_t x = vreinterpretq_s8_u32(vdupq_n_u32(four ^ 0x80808080u));
      _Pragma("GCC unroll 4") for (int j = 0; j < 4; j++) {
        pairs[p][2 * j] = vpadalq_s16(pairs[p][2 * j], vmull_s8(vget_low_s8(wv[j]), vget_low_s8(x)));
        pairs[p][2 * j + 1] = vpadalq_s16(pairs[p][2 * j + 1], vmull_high_s8(wv[j], x));
      }
    }
  }
  int32x4_t acc[QP][SUMS];
  _Pragma("GCC unroll 4") for (int p = 0; p < QPN; p++)
    _Pragma("GCC unroll 4") for (int j = 0; j < 4; j++) /* [c0 k01, c0 k23, c1 .., c1 ..] -> c0, c1 */
      acc[p][j] = vpaddq_s32(pairs[p][2 * j], pairs[p][2 * j + 1]);
#endif
  tile_store(ep, acc, QPN, 4, m, p0, n0);
}
#endif

/* out = requant(a [m][lda] u8 x panels (n padded channels, kp deep)), m pixels; `a` may be
 * read up to a whole tile of pixels past m (the buffers have the slack) */
static void gemm(const uint8_t *a, long lda, int m, const int8_t *panels, int wide, int kp,
                 int n, const Epilogue *ep) {
  (void)wide;
#ifdef QVNNI
  for (int c0 = 0, nv; c0 < n; c0 += nv * QL) {
    nv = (n - c0) / QL < QV ? (n - c0) / QL : QV;
    const int8_t *panel = panels + (size_t)c0 * kp;
    for (int p0 = 0; p0 < m; p0 += QP) {
      int mp = m - p0 < QP ? m - p0 : QP;
      const uint8_t *ap = a + p0 * lda;
      /* a constant nv: the accumulators stay in registers */
#if QV >= 4
      if (nv == 4) tile_vnni(ap, lda, panel, kp / 4, 4, mp, p0, c0, ep);
      else
#endif
      if (nv == 3) tile_vnni(ap, lda, panel, kp / 4, 3, mp, p0, c0, ep);
      else if (nv == 2) tile_vnni(ap, lda, panel, kp / 4, 2, mp, p0, c0, ep);
      else tile_vnni(ap, lda, panel, kp / 4, 1, mp, p0, c0, ep);
    }
  }
#elif defined(QNEON)
  for (int c0 = 0; c0 < n; c0 += QL)
    for (int p0 = 0; p0 < m; p0 += QPN)
      tile_neon(a + p0 * lda, lda, panels + (size_t)c0 * kp, kp / 4, m - p0 < QPN ? m - p0 : QPN,
                p0, c0, ep);
#elif defined(QYVNNI) || defined(QAVX2)
  if (!wide) {      /* AVX-VNNI's weights never are */
    for (int c0 = 0; c0 < n; c0 += QL)
      for (int p0 = 0; p0 < m; p0 += QP)
        tile_dot4(a + p0 * lda, lda, panels + (size_t)c0 * kp, kp / 4,
                  m - p0 < QP ? m - p0 : QP, p0, c0, ep);
    return;
  }
#ifdef QAVX2
  const int16_t *widened = (const int16_t *)panels;   /* packed as int16 (qcreate) */
  for (int c0 = 0; c0 < n; c0 += QL)
    for (int p0 = 0; p0 < m; p0 += QPA)
      tile_avx2(a + p0 * lda, lda, widened + (size_t)c0 * kp, kp / 4,
                m - p0 < QPA ? m - p0 : QPA, p0, c0, ep);
#endif
#else
  for (int c0 = 0, nv; c0 < n; c0 += nv * QL) {
    nv = (n - c0) / QL < QV ? (n - c0) / QL : QV;
    const int8_t *panel = panels + (size_t)c0 * kp;
    for (int p = 0; p < m; p++) {
      int32_t acc[QV * QL] = {0};
      for (int q = 0; q < kp / 4; q++)
        for (int j = 0; j < nv * QL; j++)
          for (int t = 0; t < 4; t++)
            acc[j] += (int32_t)a[p * lda + 4 * q + t] * panel[((size_t)q * nv * QL + j) * 4 + t];
      for (int j = 0; j < nv * QL; j++) {
        int c = c0 + j, v = requant_scalar(acc[j] + ep->bias[c], ep->scale[c], ep->zero);
        long at = ep->per_row ? p / ep->per_row * ep->row_ld + p % ep->per_row * ep->ld
                              : p * ep->ld;
        if (ep->as_float) {
          ep->as_float[at + c] = (float)(v - ep->zero);
          continue;
        }
        if (ep->residual) v = add_scalar(ep->b, ep->residual[p * ep->res_ld + c], v);
        ep->as_u8[at + c] = (uint8_t)v;
      }
    }
  }
#endif
}

#ifdef QVEC
/* a depthwise sum (bias included) requantized to uint8, QW channels */
static inline void dw_store(qf acc, qf scale, qf lo, qf hi, qi zero, uint8_t *to) {
  qf f = QF_MIN(QF_MAX(QF_MUL(acc, scale), lo), hi);
  qi_store_u8(to, QI_ADD(QI_ROUND(f), zero));
}
#endif

/* depthwise 3x3 over one output row, channels c_lo..c_hi: rows[3] expanded rows (pixel-major,
 * a pixel ld floats from the next, its first float channel `base`; one zero pixel on either
 * side; a row outside the image is all zeros), into d [ow][ep] u8; a vector of channels at a
 * time, its taps, bias and scale loaded once for the row */
static void depthwise_row(const QBlock *b, const float *const rows[3], int ow, uint8_t *d,
                          int c_lo, int c_hi, int ld, int base) {
  const int ep = b->ep, s = b->stride, zero = b->d_zero;
  const float *r0 = rows[0], *r1 = rows[1], *r2 = rows[2];
#ifdef QVEC
  for (int c = c_lo; c < c_hi; c += QW) {
    qf k[9];
    for (int t = 0; t < 9; t++) k[t] = QF_LOAD(b->wd + t * ep + c);
    const qf bias = QF_LOAD(b->bd + c), scale = QF_LOAD(b->sd + c);
    const qf lo = QF_SET1((float)-zero), hi = QF_SET1((float)(255 - zero));
    const qi zv = QI_SET1(zero);
    /* two chains of taps per pixel, two pixels at a time: the sums are integers below 2^24,
     * exact in any order, and four chains keep the FMA units busy instead of waiting on one */
    int x = 0;
    for (; x + 1 < ow; x += 2) {
      size_t at = (size_t)x * s * ld + (c - base), at2 = at + (size_t)s * ld;
      qf a0 = bias, a1 = QF_ZERO(), b0 = bias, b1 = QF_ZERO();
      _Pragma("GCC unroll 9") for (int t = 0; t < 9; t++) {   /* even taps on one chain */
        const float *r = (t < 3 ? r0 : t < 6 ? r1 : r2) + (size_t)(t % 3) * ld;
        if (t % 2 == 0) {
          a0 = QF_FMA(QF_LOAD(r + at), k[t], a0);
          b0 = QF_FMA(QF_LOAD(r + at2), k[t], b0);
        } else {
          a1 = QF_FMA(QF_LOAD(r + at), k[t], a1);
          b1 = QF_FMA(QF_LOAD(r + at2), k[t], b1);
        }
      }
      dw_store(QF_ADD(a0, a1), scale, lo, hi, zv, d + (size_t)x * ep + c);
      dw_store(QF_ADD(b0, b1), scale, lo, hi, zv, d + (size_t)(x + 1) * ep + c);
    }
    for (; x < ow; x++) {
      size_t at = (size_t)x * s * ld + (c - base);
      qf acc = bias;
      for (int t = 0; t < 9; t++)
        acc = QF_FMA(QF_LOAD((t < 3 ? r0 : t < 6 ? r1 : r2) + at + (t % 3) * ld), k[t], acc);
      dw_store(acc, scale, lo, hi, zv, d + (size_t)x * ep + c);
    }
  }
#else
  for (int x = 0; x < ow; x++)
    for (int j = c_lo; j < c_hi; j++) {
      size_t at = (size_t)x * s * ld + (j - base);
      float acc = b->bd[j];
      const float *k = b->wd + j;
      acc += r0[at] * k[0] + r0[at + ld] * k[ep] + r0[at + 2 * ld] * k[2 * ep];
      acc += r1[at] * k[3 * ep] + r1[at + ld] * k[4 * ep] + r1[at + 2 * ld] * k[5 * ep];
      acc += r2[at] * k[6 * ep] + r2[at + ld] * k[7 * ep] + r2[at + 2 * ld] * k[8 * ep];
      int32_t whole = (int32_t)acc; /* exact: an integer below 2^24 */
      d[(size_t)x * ep + j] = (uint8_t)requant_scalar(whole, b->sd[j], zero);
    }
#endif
}

/* ---- a call ---- */

typedef struct {
  const QBlock *b;
  const uint8_t *x;
  uint8_t *y;
  int h, w, eh, ew, oh, ow, parts, band; /* parts: row ranges per image, one task each;
                                           band: output rows per step */
  int failed;
} QWork;

/* The block's input as the kernel reads it. A 1x1 expand: pixels of kp channels (zero
 * padded), plus a tile of pixels of slack. A 3x3 expand (the stem, whose input is the image in
 * NCHW): each channel's plane with a border of one pixel of the input's zero point (onnxruntime
 * pads with it, and the folded bias cancels it). */
static size_t staged_bytes(const QBlock *b, int h, int w) {
  return b->k == 1 ? ROUND_UP((size_t)h * w + QP, (size_t)LINE) * b->kp
                   : (size_t)(h + 2) * (w + 2) * b->c;
}

/* input rows lo..hi (inclusive, within the image) of image x into xp */
static void stage_input(const QBlock *b, const uint8_t *x, int h, int w, int lo, int hi,
                        uint8_t *xp) {
  if (b->k == 1 && b->kp == b->c) {
    memcpy(xp + (size_t)lo * w * b->kp, x + (size_t)lo * w * b->c, (size_t)(hi - lo + 1) * w * b->c);
  } else if (b->k == 1) {
    for (size_t p = (size_t)lo * w; p < (size_t)(hi + 1) * w; p++) {
      memcpy(xp + p * b->kp, x + p * b->c, b->c);
      memset(xp + p * b->kp + b->c, 0, b->kp - b->c);
    }
  }
  if (b->k == 1) {
    memset(xp + (size_t)(hi + 1) * w * b->kp, 0, (size_t)QP * b->kp); /* the tiles' slack */
    return;
  }
  size_t row = (size_t)w + 2, plane = (size_t)(h + 2) * row;
  for (int ch = 0; ch < b->c; ch++)
    for (int pr = lo; pr <= hi + 2; pr++) { /* padded rows: input row pr - 1 */
      uint8_t *to = xp + ch * plane + pr * row;
      if (pr == 0 || pr == h + 1) {
        memset(to, b->x_zero, row);
        continue;
      }
      to[0] = to[row - 1] = (uint8_t)b->x_zero;
      memcpy(to + 1, x + ((size_t)ch * h + pr - 1) * w, w);
    }
}

/* scratch bytes a task of bands of r output rows needs: the staged input, the stem's patches,
 * the band's expanded rows (and a row of zeros), its depthwise results and its output */
static size_t qscratch_bytes(const QBlock *b, int h, int w, int ew, int ow, int r) {
  size_t rows = (size_t)r * b->stride + 2, row = (size_t)(ew + 2) * b->ep * sizeof(float);
  size_t patch = b->k == 3 ? (rows * ew + QP) * b->kp : 0;
  size_t drow = ((size_t)r * ow + QP) * b->ep, orow = (size_t)r * ow * b->op;
  return staged_bytes(b, h, w) + patch + (rows + 1) * row + drow + orow + 8 * (size_t)LINE;
}

/* expanded rows ey0.. (count of them) into rows of (ew + 2) pixels from `to` (each row's
 * first and last pixels zero: the depthwise's pad), in one GEMM over all their pixels */
static void expand_rows(const QBlock *b, const uint8_t *xp, int h, int w, int ew, int ey0,
                        int count, uint8_t *patch, float *to) {
  size_t row = (size_t)(ew + 2) * b->ep;
  for (int i = 0; i < count; i++) {
    memset(to + i * row, 0, b->ep * sizeof(float));
    memset(to + i * row + (size_t)(ew + 1) * b->ep, 0, b->ep * sizeof(float));
  }
  Epilogue ep = {b->be, b->se, b->e_zero, to + b->ep, NULL, b->ep, ew, (long)row, NULL, 0, b};
  if (b->k == 1) {
    gemm(xp + (size_t)ey0 * w * b->kp, b->kp, count * ew, b->we, b->we_wide, b->kp, b->ep, &ep);
    return;
  }
  /* the stem: a patch per pixel from the bordered planes, k = channel, row, column */
  size_t in_row = (size_t)w + 2, plane = (size_t)(h + 2) * in_row;
  for (int i = 0; i < count; i++)
    for (int x = 0; x < ew; x++) {
      uint8_t *p = patch + ((size_t)i * ew + x) * b->kp;
      const uint8_t *from = xp + (size_t)(ey0 + i) * b->es * in_row + (size_t)x * b->es;
      for (int ch = 0; ch < b->c; ch++, from += plane, p += 9) {
        memcpy(p, from, 3); /* constant sizes: moves, not calls */
        memcpy(p + 3, from + in_row, 3);
        memcpy(p + 6, from + 2 * in_row, 3);
      }
      memset(p, 0, b->kp - 9 * b->c);
    }
  gemm(patch, b->kp, count * ew, b->we, b->we_wide, b->kp, b->ep, &ep);
}

static void ORT_API_CALL run_part(void *work, size_t index) {
  QWork *job = work;
  const QBlock *b = job->b;
  int h = job->h, w = job->w, ew = job->ew, eh = job->eh, oh = job->oh, ow = job->ow;
  int r = job->band, st = b->stride;
  Scratch *sc = scratch_for(qscratch_bytes(b, h, w, ew, ow, r) / sizeof(float) + 1);
  if (!sc) {
    __atomic_store_n(&job->failed, 1, __ATOMIC_RELAXED);
    return;
  }
  sc->call = 0; /* the float kernel's rows are not kept across this */
  size_t image = index / job->parts, part = index % job->parts;
  int per = (oh + job->parts - 1) / job->parts, oy0 = (int)part * per;
  int oy1 = oy0 + per < oh ? oy0 + per : oh;
  if (oy0 >= oy1) return;
  const uint8_t *x = job->x + image * (size_t)h * w * b->c;
  uint8_t *y = job->y + image * (size_t)oh * ow * b->o;
  size_t rows = (size_t)r * st + 2, row = (size_t)(ew + 2) * b->ep;
  char *at = (char *)sc->data;
  uint8_t *xp = qtake(&at, staged_bytes(b, h, w));
  uint8_t *patch = b->k == 3 ? qtake(&at, (rows * ew + QP) * b->kp) : NULL;
  float *ebuf = qtake(&at, rows * row * sizeof(float)), *zeros = qtake(&at, row * sizeof(float));
  uint8_t *drow = qtake(&at, ((size_t)r * ow + QP) * b->ep);
  uint8_t *orow = qtake(&at, (size_t)r * ow * b->op);
  /* the input rows this part reads */
  int ey_lo = oy0 * st - 1 < 0 ? 0 : oy0 * st - 1;
  int ey_hi = (oy1 - 1) * st + 1 < eh - 1 ? (oy1 - 1) * st + 1 : eh - 1;
  int iy_lo = b->k == 3 ? ey_lo * b->es - 1 : ey_lo, iy_hi = b->k == 3 ? ey_hi * b->es + 1 : ey_hi;
  if (iy_lo < 0) iy_lo = 0;
  if (iy_hi > h - 1) iy_hi = h - 1;
  if (b->residual) iy_lo = oy0 < iy_lo ? oy0 : iy_lo, iy_hi = oy1 - 1 > iy_hi ? oy1 - 1 : iy_hi;
  stage_input(b, x, h, w, iy_lo, iy_hi, xp);
  memset(zeros, 0, row * sizeof(float));
  int have_lo = 0, have_hi = -1; /* the expanded rows ebuf holds, from its first row */
  for (int oy = oy0; oy < oy1; oy += r) {
    int n = oy1 - oy < r ? oy1 - oy : r;
    int lo = oy * st - 1 < 0 ? 0 : oy * st - 1;
    int hi = (oy + n - 1) * st + 1 < eh - 1 ? (oy + n - 1) * st + 1 : eh - 1;
    int keep = 0; /* rows the previous band expanded that this one needs: moved to the front */
    if (have_hi >= lo && have_lo <= lo) {
      keep = have_hi - lo + 1;
      if (lo != have_lo)
        memmove(ebuf, ebuf + (size_t)(lo - have_lo) * row, keep * row * sizeof(float));
    }
    if (hi - lo + 1 > keep)
      expand_rows(b, xp, h, w, ew, lo + keep, hi - lo + 1 - keep, patch, ebuf + keep * row);
    have_lo = lo, have_hi = hi;
    for (int i = 0; i < n; i++) {
      const float *taps[3];
      for (int ky = 0; ky < 3; ky++) {
        int ey = (oy + i) * st - 1 + ky;
        taps[ky] = ey < 0 || ey >= eh ? zeros : ebuf + (size_t)(ey - lo) * row;
      }
      depthwise_row(b, taps, ow, drow + (size_t)i * ow * b->ep, 0, b->ep, b->ep, 0);
    }
    /* the output rows are contiguous in NHWC: written in place unless channels are padded */
    uint8_t *out = b->o == b->op ? y + (size_t)oy * ow * b->o : orow;
    Epilogue ep = {b->bp, b->sp, b->p_zero, NULL, out, b->op, 0, 0,
                   b->residual ? xp + (size_t)oy * w * b->kp : NULL, b->kp, b};
    gemm(drow, b->ep, n * ow, b->wp, b->wp_wide, b->ep, b->op, &ep);
    if (out == orow)
      for (int p = 0; p < n * ow; p++)
        memcpy(y + ((size_t)oy * ow + p) * b->o, orow + (size_t)p * b->op, b->o);
  }
}

/* An image too small for a range of rows per core (14x14 and 7x7 in MobileNetV2) is split by
 * channels instead: first each task expands its panel of expanded channels over the whole
 * image and filters them (the depthwise needs only its own channel), then each task projects
 * onto its panel of output channels. The staged input, the expanded image and the depthwise
 * results are shared, in the calling thread's scratch. */
#define SPLIT_PANEL (QV_PACK * QL)
typedef struct {
  const QBlock *b;
  const uint8_t *xp;
  float *ebuf;
  const float *zeros;
  uint8_t *dbuf, *out;
  int eh, ew, oh, ow;
  long out_ld;
  pthread_t caller;
  int elsewhere; /* a task ran on another thread: the session has several */
} QSplit;

static void ORT_API_CALL split_expand(void *work, size_t panel) {
  QSplit *j = work;
  const QBlock *b = j->b;
  if (!pthread_equal(pthread_self(), j->caller)) __atomic_store_n(&j->elsewhere, 1, __ATOMIC_RELAXED);
  int c0 = (int)panel * SPLIT_PANEL, c1 = c0 + SPLIT_PANEL < b->ep ? c0 + SPLIT_PANEL : b->ep;
  /* the panel's own slab of the expanded image: its channels only, so it stays in cache */
  size_t row = (size_t)(j->ew + 2) * SPLIT_PANEL;
  float *slab = j->ebuf + panel * j->eh * row;
  for (int i = 0; i < j->eh; i++) { /* each row's zero border pixels */
    memset(slab + i * row, 0, SPLIT_PANEL * sizeof(float));
    memset(slab + i * row + (size_t)(j->ew + 1) * SPLIT_PANEL, 0, SPLIT_PANEL * sizeof(float));
  }
  Epilogue ep = {b->be + c0, b->se + c0, b->e_zero, slab + SPLIT_PANEL, NULL, SPLIT_PANEL,
                 j->ew, (long)row, NULL, 0, b};
  gemm(j->xp, b->kp, j->eh * j->ew, b->we + (size_t)(1 + b->we_wide) * c0 * b->kp, b->we_wide,
       b->kp, c1 - c0, &ep);
  for (int oy = 0; oy < j->oh; oy++) {
    const float *taps[3];
    for (int ky = 0; ky < 3; ky++) {
      int ey = oy * b->stride - 1 + ky;
      taps[ky] = ey < 0 || ey >= j->eh ? j->zeros : slab + (size_t)ey * row;
    }
    depthwise_row(b, taps, j->ow, j->dbuf + (size_t)oy * j->ow * b->ep, c0, c1, SPLIT_PANEL,
                  c0);
  }
}

static void ORT_API_CALL split_project(void *work, size_t panel) {
  const QSplit *j = work;
  const QBlock *b = j->b;
  int o0 = (int)panel * SPLIT_PANEL, o1 = o0 + SPLIT_PANEL < b->op ? o0 + SPLIT_PANEL : b->op;
  Epilogue ep = {b->bp + o0, b->sp + o0, b->p_zero, NULL, j->out + o0, j->out_ld, 0, 0,
                 b->residual ? j->xp + o0 : NULL, b->kp, b};
  gemm(j->dbuf, b->ep, j->oh * j->ow, b->wp + (size_t)(1 + b->wp_wide) * o0 * b->ep, b->wp_wide,
       b->ep, o1 - o0, &ep);
}

static OrtStatus *split_image(OrtKernelContext *ctx, const QBlock *b, const uint8_t *x,
                              uint8_t *y, int h, int w, int oh, int ow) {
  size_t panels = (size_t)(b->ep + SPLIT_PANEL - 1) / SPLIT_PANEL, pixels = (size_t)oh * ow;
  size_t row = (size_t)(w + 2) * SPLIT_PANEL, slabs = panels * h * row; /* split_expand's */
  size_t bytes = staged_bytes(b, h, w) + (slabs + row) * sizeof(float) +
                 (pixels + QP) * b->ep + pixels * b->op + 8 * (size_t)LINE;
  Scratch *sc = scratch_for(bytes / sizeof(float) + 1);
  if (!sc) return api->CreateStatus(ORT_FAIL, "edgesmith.QInvertedResidual: out of memory");
  sc->call = 0;
  char *at = (char *)sc->data;
  uint8_t *xp = qtake(&at, staged_bytes(b, h, w));
  float *ebuf = qtake(&at, slabs * sizeof(float)), *zeros = qtake(&at, row * sizeof(float));
  uint8_t *dbuf = qtake(&at, (pixels + QP) * b->ep), *orow = qtake(&at, pixels * b->op);
  stage_input(b, x, h, w, 0, h - 1, xp);
  memset(zeros, 0, row * sizeof(float));
  int direct = b->o == b->op;
  QSplit job = {b, xp, ebuf, zeros, dbuf, direct ? y : orow, h, w, oh, ow, direct ? b->o : b->op,
                pthread_self(), 0};
  OrtStatus *st;
  size_t out = (size_t)(b->op + SPLIT_PANEL - 1) / SPLIT_PANEL;
  if ((st = api->KernelContext_ParallelFor(ctx, split_expand, panels, cores, &job)) ||
      (st = api->KernelContext_ParallelFor(ctx, split_project, out, cores, &job)))
    return st;
  if (!direct)
    for (size_t p = 0; p < pixels; p++) memcpy(y + p * b->o, orow + p * b->op, b->o);
  /* a session of one thread runs every task here: after three such calls the block takes the
   * band path, a little faster on one thread; a task seen elsewhere keeps the split for good */
  int *alone = (int *)&b->split_alone;
  if (job.elsewhere) __atomic_store_n(alone, -1000000, __ATOMIC_RELAXED);
  else __atomic_add_fetch(alone, 1, __ATOMIC_RELAXED);
  return NULL;
}

static OrtStatus *ORT_API_CALL qcompute(void *kernel, OrtKernelContext *ctx) {
  const QBlock *b = kernel;
  const OrtValue *xv;
  OrtStatus *st;
  if ((st = api->KernelContext_GetInput(ctx, 0, &xv))) return st;
  OrtTensorTypeAndShapeInfo *shape;
  if ((st = api->GetTensorTypeAndShape(xv, &shape))) return st;
  size_t rank = 0;
  int64_t d[4] = {0};
  st = api->GetDimensionsCount(shape, &rank);
  if (!st && rank == 4) st = api->GetDimensions(shape, d, 4);
  api->ReleaseTensorTypeAndShapeInfo(shape);
  if (st) return st;
  if (rank != 4 || d[b->k == 1 ? 3 : 1] != b->c)
    return qfail(b->k == 1 ? "edgesmith.QInvertedResidual: input is not [N, H, W, C] with the block's C"
                           : "edgesmith.QInvertedResidual: the stem's input is not [N, C, H, W] with its C");
  if (d[0] < 0 || d[1] < 0 || d[2] < 0 || d[3] < 0 || d[0] > 65535 || d[1] > 65535 ||
      d[2] > 65535 || d[3] > 65535)
    return qfail("edgesmith.QInvertedResidual: input dimensions out of range");
  int n = (int)d[0], h = (int)d[b->k == 1 ? 1 : 2], w = (int)d[b->k == 1 ? 2 : 3];
  int eh = h ? (h - 1) / b->es + 1 : 0, ew = w ? (w - 1) / b->es + 1 : 0;
  int oh = eh ? (eh - 1) / b->stride + 1 : 0, ow = ew ? (ew - 1) / b->stride + 1 : 0;
  int64_t od[4] = {n, oh, ow, b->o};
  OrtValue *yv;
  if ((st = api->KernelContext_GetOutput(ctx, 0, od, 4, &yv))) return st;
  const uint8_t *x;
  uint8_t *y;
  if ((st = api->GetTensorMutableData((OrtValue *)xv, (void **)&x))) return st;
  if ((st = api->GetTensorMutableData(yv, (void **)&y))) return st;
  if (n == 0 || oh == 0 || ow == 0) return NULL;
  /* row ranges per image, one per core, each at least 8 rows: each re-expands the row or two
   * it shares with the range above */
  int parts = (int)(cores < (size_t)(oh / 8) ? cores : (size_t)(oh / 8));
  if (parts < 1) parts = 1;
  /* band_rows (the autotuned knob), else a band's expanded rows about 256 KB: in cache, and
   * whole 7x7 or 14x14 images in one GEMM */
  size_t row = (size_t)(ew + 2) * b->ep * sizeof(float);
  int band = b->band_rows ? b->band_rows : (int)(((size_t)256 << 10) / row / b->stride);
  band = band < 1 ? 1 : (band > oh ? oh : band);
  if (b->k == 1 && parts == 1 && cores > 1 && (size_t)n < cores && api_version >= 17 &&
      !b->band_rows && __atomic_load_n(&b->split_alone, __ATOMIC_RELAXED) < 3) {
    for (int i = 0; i < n; i++)
      if ((st = split_image(ctx, b, x + (size_t)i * h * w * b->c, y + (size_t)i * oh * ow * b->o,
                            h, w, oh, ow)))
        return st;
    return NULL;
  }
  QWork job = {b, x, y, h, w, eh, ew, oh, ow, parts, band, 0};
  size_t total = (size_t)n * parts;
  if (api_version >= 17 && total > 1) {
    if ((st = api->KernelContext_ParallelFor(ctx, run_part, total, total, &job))) return st;
  } else {
    for (size_t i = 0; i < total; i++) run_part(&job, i);
  }
  if (job.failed) return api->CreateStatus(ORT_FAIL, "edgesmith.QInvertedResidual: out of memory");
  return NULL;
}

/* ---- the op's description ---- */

static const char *ORT_API_CALL qname(const OrtCustomOp *op) { (void)op; return "QInvertedResidual"; }
static const char *ORT_API_CALL qep(const OrtCustomOp *op) { (void)op; return "CPUExecutionProvider"; }
static ONNXTensorElementDataType ORT_API_CALL qinput_type(const OrtCustomOp *op, size_t i) {
  (void)op;
  static const ONNXTensorElementDataType types[10] = {
      ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8,
      ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT,
      ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8,  ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32,
      ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8,
      ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT};
  return i < 10 ? types[i] : ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
}
static ONNXTensorElementDataType ORT_API_CALL qoutput_type(const OrtCustomOp *op, size_t i) {
  (void)op; (void)i;
  return ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
}
static size_t ORT_API_CALL qinputs(const OrtCustomOp *op) { (void)op; return 10; }
static size_t ORT_API_CALL qoutputs(const OrtCustomOp *op) { (void)op; return 1; }
static void ORT_API_CALL qdestroy(void *kernel) { qblock_free(kernel); }
static OrtCustomOpInputOutputCharacteristic ORT_API_CALL qrequired(const OrtCustomOp *op, size_t i) {
  (void)op; (void)i;
  return INPUT_OUTPUT_REQUIRED;
}
static OrtMemType ORT_API_CALL qmem(const OrtCustomOp *op, size_t i) {
  (void)op; (void)i;
  return OrtMemTypeDefault;
}
static int ORT_API_CALL qone(const OrtCustomOp *op) { (void)op; return 1; }
static int ORT_API_CALL qzero(const OrtCustomOp *op) { (void)op; return 0; }
static int ORT_API_CALL qend(const OrtCustomOp *op) { (void)op; return 2147483647; }

static OrtCustomOp qop;

OrtCustomOp *int8_block_op(void) {
  qop.version = 16;
  qop.GetName = qname;
  qop.GetExecutionProviderType = qep;
  qop.GetInputType = qinput_type;
  qop.GetInputTypeCount = qinputs;
  qop.GetOutputType = qoutput_type;
  qop.GetOutputTypeCount = qoutputs;
  qop.GetInputCharacteristic = qrequired;
  qop.GetOutputCharacteristic = qrequired;
  qop.GetInputMemoryType = qmem;
  qop.GetVariadicInputMinArity = qone;
  qop.GetVariadicInputHomogeneity = qzero;
  qop.GetVariadicOutputMinArity = qone;
  qop.GetVariadicOutputHomogeneity = qzero;
  qop.CreateKernelV2 = qcreate;
  qop.KernelComputeV2 = qcompute;
  qop.KernelDestroy = qdestroy;
  qop.GetStartVersion = qone;
  qop.GetEndVersion = qend;
  return &qop;
}
