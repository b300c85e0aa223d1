/* edgesmith custom-op library for onnxruntime: fused kernels onnxruntime runs as separate ops.
 *
 * Domain "edgesmith", op InvertedResidual (float32, NCHW): a MobileNetV2 block in one kernel,
 *   Y = Project(Act(Depthwise3x3(Act(Expand(X))))) [+ X]
 * Large images are computed a few output rows at a time, vectorised along pixels, so the
 * expanded tensor (6x the input) lives in a small per-thread buffer that stays in cache instead
 * of going through memory twice; images of at most CHANNEL_PIXELS output pixels are computed
 * whole, vectorised along channels (see channel_image).
 *
 * One source for every target: the vector width comes from the ISA the compiler is told to build
 * for (-march): 16 lanes with AVX-512, 8 with AVX2, 4 with NEON (aarch64) or SSE. The build is per
 * device ISA (sdk/kernels.py). Built against onnxruntime's C API header only: the runtime hands
 * its API table to RegisterCustomOps, so no link to libonnxruntime is needed, and asking for the
 * oldest API version this file uses lets the library load in any newer onnxruntime.
 *
 * Inputs:  X [N,C,H,W], We [E,C,1,1], Be [E], Wd [E,1,3,3], Bd [E], Wp [O,E,1,1], Bp [O]
 *          (weights must be initializers: they are packed once, when the session is created)
 * Attrs:   stride (1|2), residual (0|1), act_min, act_max (both activations clamp to these),
 *          tile_rows (output rows per step: the autotuned knob; 0 picks a default)
 */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "onnxruntime_c_api.h"

#define MIN_API 16 /* CreateKernelV2/KernelComputeV2 and constant inputs (onnxruntime 1.16) */

#if defined(__AVX512F__)
#include <immintrin.h>
#define VL 16
#define VMAX(a, b) ((vf)_mm512_max_ps((__m512)(a), (__m512)(b)))
#define VMIN(a, b) ((vf)_mm512_min_ps((__m512)(a), (__m512)(b)))
#elif defined(__AVX2__)
#include <immintrin.h>
#define VL 8
#define VMAX(a, b) ((vf)_mm256_max_ps((__m256)(a), (__m256)(b)))
#define VMIN(a, b) ((vf)_mm256_min_ps((__m256)(a), (__m256)(b)))
#elif defined(__ARM_NEON) || defined(__aarch64__)
#include <arm_neon.h>
#define VL 4
#define VMAX(a, b) ((vf)vmaxq_f32((float32x4_t)(a), (float32x4_t)(b)))
#define VMIN(a, b) ((vf)vminq_f32((float32x4_t)(a), (float32x4_t)(b)))
#elif defined(__SSE__)
#include <immintrin.h>
#define VL 4
#define VMAX(a, b) ((vf)_mm_max_ps((__m128)(a), (__m128)(b)))
#define VMIN(a, b) ((vf)_mm_min_ps((__m128)(a), (__m128)(b)))
#else
#error "edgesmith kernels need AVX-512, AVX2, SSE or NEON"
#endif

/* unaligned-capable vector of VL floats: loads and stores through it need no alignment */
typedef float vf __attribute__((vector_size(VL * 4), aligned(4)));
#if VL == 16
#define MR 8          /* output channels per micro-kernel: as many as registers allow */
#else
#define MR 4
#endif
#define NR (2 * VL)   /* pixels per micro-kernel */
/* images of at most this many output pixels take the channel path (see channel_image) */
#ifndef CHANNEL_PIXELS
#define CHANNEL_PIXELS 784
#endif
/* the channel path's micro-kernel: CV vectors of channels x CP pixels of accumulators */
#if VL == 16 || defined(__aarch64__)
#define CV 3          /* 21 accumulators: no spill (7 x 4 spilled one); MobileNets' images are */
#define CP 7          /* 7, 14, 28 pixels wide, their expansions multiples of 48 channels */
#elif VL == 8
#define CV 2
#define CP 6
#else
#define CV 2
#define CP 4
#endif

static const OrtApi *api;

#define EXPORT __attribute__((visibility("default")))

EXPORT const char *edgesmith_isa(void) {
#if defined(__AVX512F__)
  return "avx512";
#elif defined(__AVX2__)
  return "avx2";
#elif defined(__aarch64__)
  return "neon";
#else
  return "sse";
#endif
}

/* ---- 1x1 convolution as GEMM: C[M][N] = A[M][K] B[K][N] + bias, then clamp or residual ---- */

/* A packed in blocks of MR rows: block b holds A[b*MR + i][k] at [b][k][i], zero-padded */
static float *pack_a(const float *a, int m, int k) {
  int blocks = (m + MR - 1) / MR;
  float *p = calloc((size_t)blocks * k * MR, sizeof(float));
  if (!p) return NULL;
  for (int i = 0; i < m; i++)
    for (int j = 0; j < k; j++) p[((size_t)(i / MR) * k + j) * MR + i % MR] = a[(size_t)i * k + j];
  return p;
}

typedef struct {
  const float *bias, *res; /* res: added after the bias (residual), same layout as C */
  long ldr;
  float lo, hi;
  int clamp;
} Epilogue;

static inline void store(float *c, const float *r, vf v, int row, const Epilogue *ep) {
  v += ep->bias[row];
  if (ep->clamp) v = VMIN(VMAX(v, (vf){0} + ep->lo), (vf){0} + ep->hi);
  if (r) v += *(const vf *)r;
  *(vf *)c = v;
}

static void gemm(int m, int n, int k, const float *ap, const float *b, long ldb, float *c, long ldc,
                 const Epilogue *ep, float *panel /* k * NR floats */) {
  for (int n0 = 0; n0 < n; n0 += NR) {
    int nb = n - n0 < NR ? n - n0 : NR;
    const float *bp = b + n0;
    long ldp = ldb;
    if (nb < NR) { /* tail: a zero-padded copy, so one micro-kernel serves every block */
      for (int j = 0; j < k; j++) {
        memcpy(panel + (size_t)j * NR, b + (size_t)j * ldb + n0, nb * sizeof(float));
        memset(panel + (size_t)j * NR + nb, 0, (NR - nb) * sizeof(float));
      }
      bp = panel;
      ldp = NR;
    }
    for (int m0 = 0; m0 < m; m0 += MR) {
      const float *a = ap + (size_t)(m0 / MR) * k * MR;
      vf acc[MR][2];
      for (int i = 0; i < MR; i++) acc[i][0] = acc[i][1] = (vf){0};
      const float *bk = bp;
      for (int j = 0; j < k; j++, a += MR, bk += ldp) {
        vf b0 = *(const vf *)bk, b1 = *(const vf *)(bk + VL);
        for (int i = 0; i < MR; i++) {
          acc[i][0] += a[i] * b0;
          acc[i][1] += a[i] * b1;
        }
      }
      for (int i = 0; i < MR && m0 + i < m; i++) {
        float *crow = c + (size_t)(m0 + i) * ldc + n0;
        const float *rrow = ep->res ? ep->res + (size_t)(m0 + i) * ep->ldr + n0 : NULL;
        if (nb == NR) {
          store(crow, rrow, acc[i][0], m0 + i, ep);
          store(crow + VL, rrow ? rrow + VL : NULL, acc[i][1], m0 + i, ep);
        } else {
          float tmp[NR], rtmp[NR] = {0};
          if (rrow) memcpy(rtmp, rrow, nb * sizeof(float));
          store(tmp, rrow ? rtmp : NULL, acc[i][0], m0 + i, ep);
          store(tmp + VL, rrow ? rtmp + VL : NULL, acc[i][1], m0 + i, ep);
          memcpy(crow, tmp, nb * sizeof(float));
        }
      }
    }
  }
}

/* ---- 3x3 depthwise, zero padding 1 ----
 * Each held row is copied once into a zero-padded row (stride 2: split into its even and odd
 * columns), so every output pixel is the same branch-free vector expression; rows above or below
 * the image read a zero row. Output vectors may run up to VL-1 floats past a row's end: into the
 * next row, written after it, or the slack the caller leaves after the buffer. */

static inline int padded_width(int w, int stride) { return stride == 1 ? w + 2 : (w + 3) / 2; }
static inline int padded_stride(int w, int stride) {
  return (stride == 1 ? w + 2 : 2 * padded_width(w, 2)) + VL;
}

static void depthwise_tile(const float *in, int first, int held, int h, int w, int stride,
                           int oy0, int r, int ow, const float *k9, float bias, float lo,
                           float hi, float *out, long out_stride, float *pad, const float *zero) {
  int pw = padded_width(w, stride), ps = padded_stride(w, stride);
  for (int i = 0; i < held; i++) {
    const float *src = in + (size_t)i * w;
    float *dst = pad + (size_t)i * ps;
    if (stride == 1) {
      dst[0] = 0;
      memcpy(dst + 1, src, w * sizeof(float));
      memset(dst + w + 1, 0, (ps - w - 1) * sizeof(float));
    } else { /* padded column j is src[j - 1]: even columns first, then odd ones */
      float *odd = dst + pw;
      int j = 0;
      memset(dst, 0, ps * sizeof(float));
      for (j = 1; 2 * j - 1 < w; j++) dst[j] = src[2 * j - 1];
      for (j = 0; 2 * j < w; j++) odd[j] = src[2 * j];
    }
  }
  vf vb = (vf){0} + bias, vlo = (vf){0} + lo, vhi = (vf){0} + hi;
  for (int i = 0; i < r; i++) {
    const float *row[3];
    for (int dy = 0; dy < 3; dy++) {
      int iy = (oy0 + i) * stride - 1 + dy;
      row[dy] = (iy < 0 || iy >= h) ? zero : pad + (size_t)(iy - first) * ps;
    }
    float *o = out + (size_t)i * out_stride;
    for (int x = 0; x < ow; x += VL) {
      vf acc = vb;
      for (int dy = 0; dy < 3; dy++) {
        const float *p = row[dy] + x, *k = k9 + 3 * dy;
        if (stride == 1)
          acc += k[0] * *(const vf *)p + k[1] * *(const vf *)(p + 1) + k[2] * *(const vf *)(p + 2);
        else
          acc += k[0] * *(const vf *)p + k[1] * *(const vf *)(p + pw) + k[2] * *(const vf *)(p + 1);
      }
      *(vf *)(o + x) = VMIN(VMAX(acc, vlo), vhi);
    }
  }
}

/* ---- the kernel ---- */

typedef struct {
  int c, e, o, stride, residual, tile_rows;
  float lo, hi;
  float *we, *wp;               /* packed 1x1 weights */
  float *be, *wd, *bd, *bp;     /* copies: biases (be, bd zero-padded to ep) and depthwise taps */
  /* the channel path: channels padded to whole vectors (ep, op); depthwise taps transposed
   * so channels run along the vector (wdT [9][ep]); 1x1 weights in panels (see panels()) */
  int ep, op;
  float *weT, *wdT, *wpT;
} Block;

/* per-thread scratch, grown as needed and freed when its thread ends (a thread-per-request host
 * must not leak it); one allocation per thread, not one per call */
typedef struct {
  size_t floats;
  float data[];
} Scratch;

static pthread_key_t scratch_key;
static pthread_once_t scratch_once = PTHREAD_ONCE_INIT;
static void scratch_key_init(void) { (void)pthread_key_create(&scratch_key, free); }

static float *scratch_for(size_t floats) {
  pthread_once(&scratch_once, scratch_key_init);
  Scratch *s = pthread_getspecific(scratch_key);
  if (!s || s->floats < floats) {
    free(s);
    s = malloc(sizeof(Scratch) + floats * sizeof(float));
    if (s) s->floats = floats;
    if (pthread_setspecific(scratch_key, s) != 0) {
      free(s);
      return NULL;
    }
  }
  return s ? s->data : NULL;
}

static OrtStatus *fail(const char *msg) { return api->CreateStatus(ORT_INVALID_ARGUMENT, msg); }

static OrtStatus *constant(const OrtKernelInfo *info, size_t index, const float **data,
                           int64_t *dims, size_t rank) {
  int is_const = 0;
  const OrtValue *v = NULL;
  OrtStatus *st = api->KernelInfoGetConstantInput_tensor(info, index, &is_const, &v);
  if (st) return st;
  if (!is_const) return fail("edgesmith.InvertedResidual: weights must be initializers");
  OrtTensorTypeAndShapeInfo *shape;
  if ((st = api->GetTensorTypeAndShape(v, &shape))) return st;
  size_t got = 0;
  st = api->GetDimensionsCount(shape, &got);
  if (!st && got != rank) st = fail("edgesmith.InvertedResidual: a weight has the wrong rank");
  if (!st) st = api->GetDimensions(shape, dims, rank);
  api->ReleaseTensorTypeAndShapeInfo(shape);
  return st ? st : api->GetTensorMutableData((OrtValue *)v, (void **)data);
}

static float *copy(const float *src, size_t n) {
  float *p = malloc(n * sizeof(float));
  if (p) memcpy(p, src, n * sizeof(float));
  return p;
}

/* dst[j][i] = src[i][j] for an rows x cols source, into a zeroed cols x ld destination */
static float *transposed(const float *src, int rows, int cols, int ld) {
  float *p = calloc((size_t)cols * ld, sizeof(float));
  if (p)
    for (int i = 0; i < rows; i++)
      for (int j = 0; j < cols; j++) p[(size_t)j * ld + i] = src[(size_t)i * cols + j];
  return p;
}

/* the channel path's micro-kernel widths for `padded` channels, from channel c0 on */
static inline int tile_vectors(int padded, int c0) {
  return (padded - c0) / VL < CV ? (padded - c0) / VL : CV;
}

/* w [rows][k] as the channel path reads it: for each tile of nv vectors of output channels
 * (tile_vectors), a [k][nv * VL] panel, contiguous, so the micro-kernel streams it in order;
 * the tile starting at channel c0 begins at c0 * k. Padded channels are zero. */
static float *panels(const float *w, int rows, int k, int padded) {
  float *p = calloc((size_t)padded * k, sizeof(float));
  if (!p) return NULL;
  for (int c0 = 0, nv; c0 < padded; c0 += nv * VL) {
    nv = tile_vectors(padded, c0);
    for (int j = 0; j < k; j++)
      for (int c = 0; c < nv * VL && c0 + c < rows; c++)
        p[(size_t)c0 * k + (size_t)j * nv * VL + c] = w[(size_t)(c0 + c) * k + j];
  }
  return p;
}

static void block_free(Block *b) {
  if (!b) return;
  free(b->we); free(b->wp); free(b->be); free(b->wd); free(b->bd); free(b->bp);
  free(b->weT); free(b->wdT); free(b->wpT);
  free(b);
}

static OrtStatus *ORT_API_CALL create(const OrtCustomOp *op, const OrtApi *a,
                                      const OrtKernelInfo *info, void **out) {
  (void)op; (void)a;
  Block *b = calloc(1, sizeof(Block));
  if (!b) return api->CreateStatus(ORT_FAIL, "out of memory");
  int64_t v = 0, de[4], dbe[1], dd[4], dbd[1], dp[4], dbp[1];
  const float *we, *be, *wd, *bd, *wp, *bp;
  OrtStatus *st = NULL;
  if ((st = api->KernelInfoGetAttribute_int64(info, "stride", &v))) goto bad;
  b->stride = v == 1 || v == 2 ? (int)v : 0; /* anything else is refused below */
  if ((st = api->KernelInfoGetAttribute_int64(info, "residual", &v))) goto bad;
  b->residual = v != 0;
  if ((st = api->KernelInfoGetAttribute_int64(info, "tile_rows", &v))) goto bad;
  b->tile_rows = v >= 0 && v <= 4096 ? (int)v : -1;
  if ((st = api->KernelInfoGetAttribute_float(info, "act_min", &b->lo))) goto bad;
  if ((st = api->KernelInfoGetAttribute_float(info, "act_max", &b->hi))) goto bad;
  if ((st = constant(info, 1, &we, de, 4)) || (st = constant(info, 2, &be, dbe, 1)) ||
      (st = constant(info, 3, &wd, dd, 4)) || (st = constant(info, 4, &bd, dbd, 1)) ||
      (st = constant(info, 5, &wp, dp, 4)) || (st = constant(info, 6, &bp, dbp, 1)))
    goto bad;
  b->e = (int)de[0]; b->c = (int)de[1]; b->o = (int)dp[0];
  if (de[2] != 1 || de[3] != 1 || dbe[0] != b->e || dd[0] != b->e || dd[1] != 1 || dd[2] != 3 ||
      dd[3] != 3 || dbd[0] != b->e || dp[1] != b->e || dp[2] != 1 || dp[3] != 1 ||
      dbp[0] != b->o || (b->stride != 1 && b->stride != 2) ||
      (b->residual && (b->stride != 1 || b->c != b->o)) || b->tile_rows < 0) {
    st = fail("edgesmith.InvertedResidual: weight shapes or attributes do not form a block");
    goto bad;
  }
  b->we = pack_a(we, b->e, b->c);
  b->wp = pack_a(wp, b->o, b->e);
  b->ep = (b->e + VL - 1) / VL * VL;
  b->op = (b->o + VL - 1) / VL * VL;
  b->be = transposed(be, b->e, 1, b->ep); /* padded: the channel path loads whole vectors */
  b->bd = transposed(bd, b->e, 1, b->ep);
  b->wd = copy(wd, (size_t)b->e * 9); b->bp = copy(bp, b->o);
  b->weT = panels(we, b->e, b->c, b->ep);
  b->wdT = transposed(wd, b->e, 9, b->ep);
  b->wpT = panels(wp, b->o, b->e, b->op);
  if (!b->we || !b->wp || !b->be || !b->wd || !b->bd || !b->bp || !b->weT || !b->wdT ||
      !b->wpT) {
    st = api->CreateStatus(ORT_FAIL, "out of memory");
    goto bad;
  }
  *out = b;
  return NULL;
bad:
  block_free(b);
  return st;
}

/* the expanded rows [first, first+count) of image `x`, written at `buf` (row stride w, channel
 * stride cap*w) */
static void expand_rows(const Block *b, const float *x, int h, int w, int first, int count,
                        float *buf, long cap, float *panel) {
  Epilogue ep = {b->be, NULL, 0, b->lo, b->hi, 1};
  gemm(b->e, count * w, b->c, b->we, x + (size_t)first * w, (long)h * w, buf, cap * w, &ep, panel);
}

static void run_image(const Block *b, const float *x, float *y, int h, int w, int oh, int ow,
                      float *ebuf, long cap, float *dbuf, int rows, float *panel, float *pad,
                      const float *zero) {
  int have_first = 0, have = 0; /* expanded rows held: [have_first, have_first + have) */
  for (int oy0 = 0; oy0 < oh; oy0 += rows) {
    int r = oh - oy0 < rows ? oh - oy0 : rows;
    int first = oy0 * b->stride - 1, last = (oy0 + r - 1) * b->stride + 1;
    if (first < 0) first = 0;
    if (last > h - 1) last = h - 1;
    int keep = 0;
    if (have && first >= have_first && first < have_first + have) {
      keep = have_first + have - first; /* rows the previous step expanded: slide them down */
      if (first != have_first)
        for (int e = 0; e < b->e; e++)
          memmove(ebuf + e * cap * w, ebuf + e * cap * w + (size_t)(first - have_first) * w,
                  (size_t)keep * w * sizeof(float));
    }
    if (first + keep <= last)
      expand_rows(b, x, h, w, first + keep, last + 1 - first - keep, ebuf + (size_t)keep * w, cap,
                  panel);
    have_first = first, have = last + 1 - first;
    for (int e = 0; e < b->e; e++) /* channel order: a row's overflow lands on unwritten rows */
      depthwise_tile(ebuf + e * cap * w, first, have, h, w, b->stride, oy0, r, ow, b->wd + e * 9,
                     b->bd[e], b->lo, b->hi, dbuf + (size_t)e * rows * ow, ow, pad, zero);
    Epilogue ep = {b->bp, b->residual ? x + (size_t)oy0 * ow : NULL, (long)h * w, 0, 0, 0};
    gemm(b->o, r * ow, b->e, b->wp, dbuf, (long)rows * ow, y + (size_t)oy0 * ow, (long)oh * ow,
         &ep, panel);
  }
}

/* ---- the channel path, for small images ----
 * Row tiles vectorise along pixels, so a 7x7 image leaves most lanes idle and the expanded
 * tensor is recomputed at every tile's edge. Here the whole image is one tile: the expanded
 * tensor is held pixel-major ([pixel][channel], a few hundred KB at most), every stage
 * vectorises along channels, and the project stage's pixel-major results are written back
 * channel-major (NCHW) once. */

/* out[i][v] = sum_j w[j][v*VL ...] * src[j*ldk + i*ldi], for CP pixels i and NV vectors of
 * channels v (weights transposed: channels along the vector; each pixel's value broadcast) */
#define CHANNEL_TILE(NAME, NV)                                                                   \
  static void NAME(int k, const float *w, long ldw, const float *src, long ldk, long ldi,      \
                   vf out[CP][NV], int accumulate) {                                             \
    vf acc[CP][NV];                                                                              \
    for (int i = 0; i < CP; i++)                                                                 \
      for (int v = 0; v < NV; v++) acc[i][v] = accumulate ? out[i][v] : (vf){0};                 \
    for (int j = 0; j < k; j++, w += ldw, src += ldk) {                                          \
      vf wv[NV];                                                                                 \
      for (int v = 0; v < NV; v++) wv[v] = *(const vf *)(w + v * VL);                            \
      for (int i = 0; i < CP; i++) {                                                             \
        float xi = src[i * ldi];                                                                 \
        for (int v = 0; v < NV; v++) acc[i][v] += xi * wv[v];                                    \
      }                                                                                          \
    }                                                                                            \
    memcpy(out, acc, sizeof(acc));                                                               \
  }
CHANNEL_TILE(channel_tile_1, 1)
CHANNEL_TILE(channel_tile_2, 2)
#if CV > 2
CHANNEL_TILE(channel_tile_3, 3)
#endif

/* out ([CP][nv]) for one tile of output channels, nv = tile_vectors(): `w` is the tile's
 * panel (rows of nv vectors), added to what out holds when `accumulate` */
static int channel_tile(int k, const float *w, const float *src, long ldk, long ldi, int nv,
                        vf *out, int accumulate) {
  switch (nv) {
#if CV > 2
    case 3: channel_tile_3(k, w, 3 * VL, src, ldk, ldi, (vf(*)[3])out, accumulate); return 3;
#endif
    case 2: channel_tile_2(k, w, 2 * VL, src, ldk, ldi, (vf(*)[2])out, accumulate); return 2;
    default: channel_tile_1(k, w, VL, src, ldk, ldi, (vf(*)[1])out, accumulate); return 1;
  }
}

/* ebuf [p][ep] = Act(We X + be), a weight panel at a time over every pixel tile (the panel
 * stays in cache while the pixels pass) */
static void channel_expand(const Block *b, const float *x, int hw, float *ebuf, float *tail) {
  vf out[CP * CV], lo = (vf){0} + b->lo, hi = (vf){0} + b->hi;
  int last = hw / CP * CP; /* the last, partial pixel tile reads a zero-padded copy */
  if (last < hw)
    for (int c = 0; c < b->c; c++)
      for (int i = 0; i < CP; i++) tail[c * CP + i] = last + i < hw ? x[(size_t)c * hw + last + i] : 0;
  for (int e0 = 0, nv; e0 < b->ep; e0 += nv * VL) {
    nv = tile_vectors(b->ep, e0);
    for (int p0 = 0; p0 < hw; p0 += CP) {
      channel_tile(b->c, b->weT + (size_t)e0 * b->c, p0 < last ? x + p0 : tail,
                   p0 < last ? hw : CP, 1, nv, out, 0);
      for (int i = 0; i < CP; i++)
        for (int v = 0; v < nv; v++) {
          vf r = out[i * nv + v] + *(const vf *)(b->be + e0 + v * VL);
          *(vf *)(ebuf + (size_t)(p0 + i) * b->ep + e0 + v * VL) = VMIN(VMAX(r, lo), hi);
        }
    }
  }
}

/* dbuf [q][ep] = Act(depthwise(ebuf) + bd), a vector of channels at a time: its 9 taps stay
 * in registers while every output pixel passes; border pixels leave out the taps outside */
static void channel_depthwise(const Block *b, const float *ebuf, int h, int w, int oh, int ow,
                              float *dbuf) {
  vf lo = (vf){0} + b->lo, hi = (vf){0} + b->hi;
  long ep = b->ep, row = (long)w * ep;
  for (int e0 = 0; e0 < ep; e0 += VL) {
    vf k[9], bias = *(const vf *)(b->bd + e0);
    for (int t = 0; t < 9; t++) k[t] = *(const vf *)(b->wdT + t * ep + e0);
    for (int oy = 0; oy < oh; oy++) {
      int iy0 = oy * b->stride - 1;
      float *d = dbuf + (size_t)oy * ow * ep + e0;
      int rows_inside = iy0 >= 0 && iy0 + 2 < h;
      for (int ox = 0; ox < ow; ox++, d += ep) {
        int ix0 = ox * b->stride - 1;
        const float *p = ebuf + (iy0 * (long)w + ix0) * ep + e0;
        vf acc = bias;
        if (b->stride == 1 && rows_inside && ix0 >= 0 && ix0 + 5 < w) {
          /* four neighbours at once: each input vector loaded once for the three it feeds */
          vf a1 = bias, a2 = bias, a3 = bias;
          for (int dy = 0; dy < 3; dy++, p += row) {
            vf x0 = *(const vf *)p, x1 = *(const vf *)(p + ep), x2 = *(const vf *)(p + 2 * ep),
               x3 = *(const vf *)(p + 3 * ep), x4 = *(const vf *)(p + 4 * ep),
               x5 = *(const vf *)(p + 5 * ep), k0 = k[3 * dy], k1 = k[3 * dy + 1],
               k2 = k[3 * dy + 2];
            acc += k0 * x0 + k1 * x1 + k2 * x2;
            a1 += k0 * x1 + k1 * x2 + k2 * x3;
            a2 += k0 * x2 + k1 * x3 + k2 * x4;
            a3 += k0 * x3 + k1 * x4 + k2 * x5;
          }
          *(vf *)d = VMIN(VMAX(acc, lo), hi);
          *(vf *)(d + ep) = VMIN(VMAX(a1, lo), hi);
          *(vf *)(d + 2 * ep) = VMIN(VMAX(a2, lo), hi);
          *(vf *)(d + 3 * ep) = VMIN(VMAX(a3, lo), hi);
          ox += 3, d += 3 * ep;
          continue;
        }
        if (rows_inside && ix0 >= 0 && ix0 + 2 < w) {
          for (int dy = 0; dy < 3; dy++, p += row) /* three short chains, not one long one */
            acc += k[3 * dy] * *(const vf *)p + k[3 * dy + 1] * *(const vf *)(p + ep) +
                   k[3 * dy + 2] * *(const vf *)(p + 2 * ep);
        } else {
          for (int dy = 0; dy < 3; dy++)
            for (int dx = 0; dx < 3; dx++)
              if (iy0 + dy >= 0 && iy0 + dy < h && ix0 + dx >= 0 && ix0 + dx < w)
                acc += k[3 * dy + dx] * *(const vf *)(p + dy * row + dx * ep);
        }
        *(vf *)d = VMIN(VMAX(acc, lo), hi);
      }
    }
  }
}

/* y [o][q] (NCHW) from dbuf [q][ep] (rows up to q rounded up to CP may hold anything). The
 * expanded channels are taken KC at a time, so one chunk of a channel tile's weights (KC rows
 * of CV vectors: 32 KB with AVX-512) stays in L1 while every pixel tile uses it; `acc` holds
 * the pixel tiles' sums between chunks. */
#define KC 128
static void channel_project(const Block *b, const float *dbuf, int q, const float *res,
                            float *y, vf *acc) {
  for (int o0 = 0, nv; o0 < b->op; o0 += nv * VL) {
    nv = tile_vectors(b->op, o0);
    for (int k0 = 0; k0 < b->e; k0 += KC) {
      int kc = b->e - k0 < KC ? b->e - k0 : KC;
      for (int q0 = 0; q0 < q; q0 += CP)
        channel_tile(kc, b->wpT + (size_t)o0 * b->e + (size_t)k0 * nv * VL,
                     dbuf + (size_t)q0 * b->ep + k0, 1, b->ep, nv,
                     acc + (size_t)(q0 / CP) * CP * CV, k0 > 0);
    }
    for (int q0 = 0; q0 < q; q0 += CP) {
      const vf *out = acc + (size_t)(q0 / CP) * CP * CV;
      int np = q - q0 < CP ? q - q0 : CP;
      for (int v = 0; v < nv; v++)
        for (int l = 0; l < VL && o0 + v * VL + l < b->o; l++) {
          int o = o0 + v * VL + l;
          float *yo = y + (size_t)o * q + q0;
          const float *ro = res ? res + (size_t)o * q + q0 : NULL;
          for (int i = 0; i < np; i++) yo[i] = out[i * nv + v][l] + b->bp[o] + (ro ? ro[i] : 0.0f);
        }
    }
  }
}

static inline int round_up(int v, int m) { return (v + m - 1) / m * m; }

/* floats of scratch the channel path needs for one image */
static size_t channel_scratch(const Block *b, int h, int w, int oh, int ow) {
  return (size_t)round_up(h * w, CP) * b->ep + (size_t)round_up(oh * ow, CP) * (b->ep + CV * VL) +
         (size_t)b->c * CP + VL;
}

static void channel_image(const Block *b, const float *x, float *y, int h, int w, int oh, int ow,
                          float *buf) {
  float *ebuf = buf, *dbuf = ebuf + (size_t)round_up(h * w, CP) * b->ep;
  float *tail = dbuf + (size_t)round_up(oh * ow, CP) * b->ep;
  float *acc = tail + (size_t)b->c * CP;
  acc += (VL - (uintptr_t)acc / sizeof(float) % VL) % VL;   /* whole vectors: aligned */
  channel_expand(b, x, h * w, ebuf, tail);
  channel_depthwise(b, ebuf, h, w, oh, ow, dbuf);
  channel_project(b, dbuf, oh * ow, b->residual ? x : NULL, y, (vf *)acc);
}

static OrtStatus *ORT_API_CALL compute(void *kernel, OrtKernelContext *ctx) {
  const Block *b = kernel;
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
  if (rank != 4 || d[1] != b->c)
    return fail("edgesmith.InvertedResidual: input is not [N, C, H, W] with the block's C");
  if (d[0] < 0 || d[2] < 0 || d[3] < 0 || d[0] > INT32_MAX || d[2] > INT32_MAX || d[3] > INT32_MAX)
    return fail("edgesmith.InvertedResidual: input dimensions out of range");
  int n = (int)d[0], h = (int)d[2], w = (int)d[3];
  int oh = h ? (h - 1) / b->stride + 1 : 0, ow = w ? (w - 1) / b->stride + 1 : 0;
  int64_t od[4] = {n, b->o, oh, ow};
  OrtValue *yv;
  if ((st = api->KernelContext_GetOutput(ctx, 0, od, 4, &yv))) return st;
  const float *x;
  float *y;
  if ((st = api->GetTensorMutableData((OrtValue *)xv, (void **)&x))) return st;
  if ((st = api->GetTensorMutableData(yv, (void **)&y))) return st;
  if (n == 0 || oh == 0 || ow == 0) return NULL; /* an empty output: nothing to compute */
  if (oh * ow <= CHANNEL_PIXELS) {
    float *buf = scratch_for(channel_scratch(b, h, w, oh, ow));
    if (!buf) return api->CreateStatus(ORT_FAIL, "edgesmith.InvertedResidual: out of memory");
    for (int i = 0; i < n; i++)
      channel_image(b, x + (size_t)i * b->c * h * w, y + (size_t)i * b->o * oh * ow, h, w, oh, ow,
                    buf);
    return NULL;
  }
  int rows = b->tile_rows > 0 ? b->tile_rows : 4;
  if (rows > oh) rows = oh;
  long cap = (long)(rows - 1) * b->stride + 3;
  size_t ps = padded_stride(w, b->stride), eb = (size_t)b->e * cap * w,
         db = (size_t)b->e * rows * ow + VL, pb = (size_t)(b->c > b->e ? b->c : b->e) * NR,
         padb = (size_t)cap * ps;
  float *buf = scratch_for(eb + db + pb + padb + ps);
  if (!buf) return api->CreateStatus(ORT_FAIL, "edgesmith.InvertedResidual: out of memory");
  float *zero = buf + eb + db + pb + padb;
  memset(zero, 0, ps * sizeof(float));
  for (int i = 0; i < n; i++)
    run_image(b, x + (size_t)i * b->c * h * w, y + (size_t)i * b->o * oh * ow, h, w, oh, ow, buf,
              cap, buf + eb, rows, buf + eb + db, buf + eb + db + pb, zero);
  return NULL;
}

/* ---- the op's description, and registration ---- */

static const char *ORT_API_CALL op_name(const OrtCustomOp *op) { (void)op; return "InvertedResidual"; }
static const char *ORT_API_CALL op_ep(const OrtCustomOp *op) { (void)op; return "CPUExecutionProvider"; }
static ONNXTensorElementDataType ORT_API_CALL op_type(const OrtCustomOp *op, size_t i) {
  (void)op; (void)i;
  return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}
static size_t ORT_API_CALL op_inputs(const OrtCustomOp *op) { (void)op; return 7; }
static size_t ORT_API_CALL op_outputs(const OrtCustomOp *op) { (void)op; return 1; }
static void ORT_API_CALL op_destroy(void *kernel) { block_free(kernel); }
static OrtCustomOpInputOutputCharacteristic ORT_API_CALL op_required(const OrtCustomOp *op,
                                                                     size_t i) {
  (void)op; (void)i;
  return INPUT_OUTPUT_REQUIRED;
}
static OrtMemType ORT_API_CALL op_mem(const OrtCustomOp *op, size_t i) {
  (void)op; (void)i;
  return OrtMemTypeDefault;
}
static int ORT_API_CALL op_one(const OrtCustomOp *op) { (void)op; return 1; }
static int ORT_API_CALL op_zero(const OrtCustomOp *op) { (void)op; return 0; }
static int ORT_API_CALL op_start(const OrtCustomOp *op) { (void)op; return 1; }
static int ORT_API_CALL op_end(const OrtCustomOp *op) { (void)op; return 2147483647; }

static OrtCustomOp inverted_residual;

static pthread_mutex_t registering = PTHREAD_MUTEX_INITIALIZER;
static OrtStatus *register_locked(OrtSessionOptions *options, const OrtApiBase *base);

/* sessions may be created from several threads at once: one registration at a time */
EXPORT OrtStatus *ORT_API_CALL RegisterCustomOps(OrtSessionOptions *options, const OrtApiBase *base) {
  pthread_mutex_lock(&registering);
  OrtStatus *st = register_locked(options, base);
  pthread_mutex_unlock(&registering);
  return st;
}

static OrtStatus *register_locked(OrtSessionOptions *options, const OrtApiBase *base) {
  for (int v = ORT_API_VERSION; v >= MIN_API && !api; v--) api = base->GetApi(v);
  if (!api) return NULL; /* cannot even say why without an API table; the op stays unknown */
  static OrtCustomOpDomain *domain;
  OrtStatus *st;
  if (domain) return api->AddCustomOpDomain(options, domain); /* a later session: same domain */
  inverted_residual.version = MIN_API;
  inverted_residual.GetName = op_name;
  inverted_residual.GetExecutionProviderType = op_ep;
  inverted_residual.GetInputType = op_type;
  inverted_residual.GetInputTypeCount = op_inputs;
  inverted_residual.GetOutputType = op_type;
  inverted_residual.GetOutputTypeCount = op_outputs;
  inverted_residual.GetInputCharacteristic = op_required;
  inverted_residual.GetOutputCharacteristic = op_required;
  inverted_residual.GetInputMemoryType = op_mem;
  inverted_residual.GetVariadicInputMinArity = op_one;
  inverted_residual.GetVariadicInputHomogeneity = op_zero;
  inverted_residual.GetVariadicOutputMinArity = op_one;
  inverted_residual.GetVariadicOutputHomogeneity = op_zero;
  inverted_residual.CreateKernelV2 = create;
  inverted_residual.KernelComputeV2 = compute;
  inverted_residual.KernelDestroy = op_destroy;
  inverted_residual.GetStartVersion = op_start;
  inverted_residual.GetEndVersion = op_end;
  OrtCustomOpDomain *created;
  if ((st = api->CreateCustomOpDomain("edgesmith", &created))) return st;
  if ((st = api->CustomOpDomain_Add(created, &inverted_residual))) return st;
  domain = created;
  return api->AddCustomOpDomain(options, domain);
}
