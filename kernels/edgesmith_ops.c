/* edgesmith custom-op library for onnxruntime: fused kernels onnxruntime runs as separate ops.
 *
 * Domain "edgesmith", op InvertedResidual (float32, NCHW): a MobileNetV2 block in one kernel,
 *   Y = Project(Act(Depthwise3x3(Act(Expand(X))))) [+ X]
 * where Expand is a 1x1 conv, or a 3x3 one (pads 1, stride 1|2): a network's stem conv and the
 * first block after it, whose expanded tensor (the stem's output, 1.6 MB in MobileNetV2) then
 * never leaves the cache either.
 * The image goes a band of output rows at a time: the band's expanded tensor (6x the input) is
 * held pixel-major ([pixel][channel]) in a per-thread buffer that stays in cache, and expand,
 * depthwise and project all vectorise along channels, so no lane idles at a row's end and no
 * expanded row is computed twice (see run_band).
 *
 * The bands run in batches of consecutive bands on onnxruntime's own intra-op threads
 * (KernelContext_ParallelFor, onnxruntime >= 1.17; one thread before that), so the kernel
 * uses the cores a session is given, like the ops around it.
 *
 * One source for every target: the vector width comes from the ISA the compiler is told to build
 * for (-march): 16 lanes with AVX-512, 8 with AVX2, 4 with NEON (aarch64) or SSE. The build is per
 * device ISA (sdk/kernels.py). Built against onnxruntime's C API header only: the runtime hands
 * its API table to RegisterCustomOps, so no link to libonnxruntime is needed; taking the newest
 * table the runtime has, down to the oldest this file needs (MIN_API), lets the library load in
 * any onnxruntime from 1.16 on.
 *
 * Inputs:  X [N,C,H,W], We [E,C,1,1] (or [E,C,3,3]), Be [E], Wd [E,1,3,3], Bd [E], Wp [O,E,1,1],
 *          Bp [O]
 *          (weights must be initializers: they are packed once, when the session is created)
 * Attrs:   stride (1|2: the depthwise's), expand_stride (optional, 1|2: a 3x3 expand's),
 *          residual (0|1), act_min, act_max (both activations clamp to these),
 *          tile_rows (output rows per band: the autotuned knob; 0 picks a default)
 */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "edgesmith_ops.h"

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

/* x clamped to [lo, hi] with NaN kept, as onnxruntime's Clip and Relu keep it: x86's max and
 * min return their second operand when one is NaN, so x goes second (NEON's keep NaN anyway) */
#define CLAMP(x, lo, hi) VMIN(hi, VMAX(lo, x))

/* unaligned-capable vector of VL floats: loads and stores through it need no alignment */
typedef float vf __attribute__((vector_size(VL * 4), aligned(4)));
/* the micro-kernel: CV vectors of channels x CP pixels of accumulators */
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

const OrtApi *api;

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

/* ---- the kernel ---- */

typedef struct {
  int c, e, o, stride, residual, tile_rows;
  int k, es;  /* the expand's kernel (1, or 3 with pads of 1: a network's stem) and stride */
  float lo, hi;
  /* channels padded to whole vectors (ep, op); biases (be, bd zero-padded to ep; bp); depthwise
   * taps transposed so channels run along the vector (wdT [9][ep]); 1x1 weights in panels */
  int ep, op;
  float *be, *bd, *bp, *weT, *wdT, *wpT; /* all in one allocation from a Chunk (packed_alloc) */
  struct Chunk *chunk;
} Block;

/* per-thread scratch, grown as needed and freed when its thread ends (a thread-per-request host
 * must not leak it) or when the library is unloaded (every thread's: `scratches` lists them);
 * one allocation per thread, not one per call. It remembers which band of
 * which call its expanded rows belong to, so the thread's next band can keep those it shares.
 * Its data starts on a cache line, so every vector of a pixel's channels does too (rows are
 * whole vectors): an AVX-512 vector straddling two lines costs two accesses */
#define MAX_CHANNELS 65536
static pthread_key_t scratch_key;
static pthread_once_t scratch_once = PTHREAD_ONCE_INIT;
static int scratch_key_made;
static pthread_mutex_t scratch_lock = PTHREAD_MUTEX_INITIALIZER;
static Scratch *scratches;

static void scratch_free(void *p) {
  Scratch *s = p;
  if (!s) return;
  pthread_mutex_lock(&scratch_lock);
  if (s->prev) s->prev->next = s->next;
  else scratches = s->next;
  if (s->next) s->next->prev = s->prev;
  pthread_mutex_unlock(&scratch_lock);
  free(s);
}

static void scratch_key_init(void) {
  scratch_key_made = !pthread_key_create(&scratch_key, scratch_free);
}

Scratch *scratch_for(size_t floats) {
  pthread_once(&scratch_once, scratch_key_init);
  Scratch *s = pthread_getspecific(scratch_key);
  if (!s || s->floats < floats) {
    scratch_free(s);
    s = aligned_alloc(LINE, ROUND_UP(sizeof(Scratch) + floats * sizeof(float), LINE));
    if (s) {
      *s = (Scratch){.floats = floats};
      pthread_mutex_lock(&scratch_lock);
      if ((s->next = scratches)) scratches->prev = s;
      scratches = s;
      pthread_mutex_unlock(&scratch_lock);
    }
    if (pthread_setspecific(scratch_key, s) != 0) {
      scratch_free(s);
      return NULL;
    }
  }
  return s;
}

/* Packed weights live in 2 MB pages where the OS gives them (Linux transparent huge pages;
 * madvise is enough): a model's weights are read once per inference and are too many for the
 * TLB in 4 KB pages, a page walk per 4 KB. In 2 MB pages MobileNetV2 ran 3 % faster (Xeon,
 * 1 thread). Every block of every session takes its weights from shared chunks, one after
 * another (a chunk is unmapped with its last block): 32 MB of address space each, of which
 * only the 2 MB pages written are memory, so a model's weights take their size rounded up to
 * 2 MB, not a page per block. A block that does not fit in the chunk being filled gets a new
 * one, and whichever of the two has more room left is filled next. */
#define HUGE_PAGE ((size_t)2 << 20)
#define CHUNK ((size_t)32 << 20)
typedef struct Chunk {
  size_t size, used, live; /* bytes, from the chunk's start (this header included); blocks */
} Chunk;
static pthread_mutex_t chunk_lock = PTHREAD_MUTEX_INITIALIZER;
static Chunk *filling; /* the chunk new blocks take from */

#define CHUNK_HEADER ROUND_UP(sizeof(Chunk), (size_t)LINE)

/* a chunk of `size` bytes (a multiple of HUGE_PAGE) on a HUGE_PAGE boundary, mapped, not
 * malloc'ed: memory malloc hands back in huge pages would keep whole pages resident for its next
 * users */
static Chunk *chunk_map(size_t size) {
  size_t span = size + HUGE_PAGE;
  char *p = mmap(NULL, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return NULL;
  char *start = (char *)(((uintptr_t)p + HUGE_PAGE - 1) & ~(uintptr_t)(HUGE_PAGE - 1));
  if (start > p) munmap(p, (size_t)(start - p));
  munmap(start + size, (size_t)(p + span - (start + size))); /* > 0: start < p + HUGE_PAGE */
#ifdef MADV_HUGEPAGE
  (void)madvise(start, size, MADV_HUGEPAGE); /* a hint: without huge pages, 4 KB ones */
#endif
  Chunk *c = (Chunk *)start;
  *c = (Chunk){.size = size, .used = CHUNK_HEADER};
  return c;
}

/* `bytes` zeroed bytes on a cache line, and the chunk they are in */
void *packed_alloc(size_t bytes, Chunk **chunk) {
  bytes = ROUND_UP(bytes, (size_t)LINE);
  void *p = NULL;
  pthread_mutex_lock(&chunk_lock);
  Chunk *from = filling;
  if (!from || from->size - from->used < bytes) {
    size_t need = ROUND_UP(CHUNK_HEADER + bytes, HUGE_PAGE);
    from = chunk_map(need < CHUNK ? CHUNK : need);
    if (!from && need < CHUNK) from = chunk_map(need); /* strict overcommit: no room to spare */
    /* the chunk with more room left after this block is the one the next blocks fill */
    if (from && (!filling || filling->size - filling->used < from->size - from->used - bytes))
      filling = from;
  }
  if (from) {
    p = (char *)from + from->used;
    from->used += bytes, from->live++;
    *chunk = from;
  }
  pthread_mutex_unlock(&chunk_lock);
  return p ? memset(p, 0, bytes) : NULL;
}

void packed_free(Chunk *c) {
  if (!c) return;
  pthread_mutex_lock(&chunk_lock);
  if (!--c->live) {
    if (c == filling) filling = NULL;
    munmap(c, c->size);
  }
  pthread_mutex_unlock(&chunk_lock);
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

/* p[j][i] = src[i][j] for an rows x cols source, into a zeroed cols x ld p */
static void transpose_into(float *p, const float *src, int rows, int cols, int ld) {
  for (int i = 0; i < rows; i++)
    for (int j = 0; j < cols; j++) p[(size_t)j * ld + i] = src[(size_t)i * cols + j];
}

/* the micro-kernel's width in vectors for `padded` channels, from channel c0 on */
static inline int tile_vectors(int padded, int c0) {
  return (padded - c0) / VL < CV ? (padded - c0) / VL : CV;
}

/* w [rows][k] as the micro-kernel reads it, into a zeroed p of padded x k: for each tile of
 * nv vectors of output channels (tile_vectors), a [k][nv * VL] panel, contiguous, so the
 * micro-kernel streams it in order; the tile starting at channel c0 begins at c0 * k. Padded
 * channels stay zero. */
static void panels_into(float *p, const float *w, int rows, int k, int padded) {
  for (int c0 = 0, nv; c0 < padded; c0 += nv * VL) {
    nv = tile_vectors(padded, c0);
    for (int j = 0; j < k; j++)
      for (int c = 0; c < nv * VL && c0 + c < rows; c++)
        p[(size_t)c0 * k + (size_t)j * nv * VL + c] = w[(size_t)(c0 + c) * k + j];
  }
}

static void block_free(Block *b) {
  if (!b) return;
  packed_free(b->chunk);
  free(b);
}

/* n floats from *at, which moves on to the next cache line after them */
static float *take(float **at, size_t n) {
  float *p = *at;
  *at += ROUND_UP(n, LINE / sizeof(float));
  return p;
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
  if ((st = api->KernelInfoGetAttribute_int64(info, "expand_stride", &v))) { /* optional */
    api->ReleaseStatus(st);
    st = NULL, v = 1;
  }
  b->es = v == 1 || v == 2 ? (int)v : 0;
  if ((st = api->KernelInfoGetAttribute_float(info, "act_min", &b->lo))) goto bad;
  if ((st = api->KernelInfoGetAttribute_float(info, "act_max", &b->hi))) goto bad;
  if ((st = constant(info, 1, &we, de, 4)) || (st = constant(info, 2, &be, dbe, 1)) ||
      (st = constant(info, 3, &wd, dd, 4)) || (st = constant(info, 4, &bd, dbd, 1)) ||
      (st = constant(info, 5, &wp, dp, 4)) || (st = constant(info, 6, &bp, dbp, 1)))
    goto bad;
  /* every channel count at least one and small enough for the int arithmetic below (an
   * expand of 0 channels divided by zero when the band height was picked) */
  if (de[0] < 1 || de[1] < 1 || dp[0] < 1 || de[0] > MAX_CHANNELS || de[1] > MAX_CHANNELS ||
      dp[0] > MAX_CHANNELS) {
    st = fail("edgesmith.InvertedResidual: a weight has 0 or more than 65536 channels");
    goto bad;
  }
  b->e = (int)de[0]; b->c = (int)de[1]; b->o = (int)dp[0]; b->k = (int)de[2];
  if (de[2] != de[3] || (b->k != 1 && b->k != 3) || !b->es || (b->k == 1 && b->es != 1) ||
      dbe[0] != b->e || dd[0] != b->e || dd[1] != 1 || dd[2] != 3 || dd[3] != 3 ||
      dbd[0] != b->e || dp[1] != b->e || dp[2] != 1 || dp[3] != 1 ||
      dbp[0] != b->o || (b->stride != 1 && b->stride != 2) ||
      (b->residual && (b->stride != 1 || b->c != b->o || b->k != 1)) || b->tile_rows < 0) {
    st = fail("edgesmith.InvertedResidual: weight shapes or attributes do not form a block");
    goto bad;
  }
  b->ep = ROUND_UP(b->e, VL);
  b->op = ROUND_UP(b->o, VL);
  size_t kk = (size_t)b->c * b->k * b->k, line = LINE / sizeof(float);
  size_t sizes[] = {b->ep, kk * b->ep, b->ep, 9 * (size_t)b->ep, (size_t)b->op * b->e, b->o};
  size_t total = 0;
  for (size_t i = 0; i < sizeof(sizes) / sizeof(*sizes); i++) total += sizes[i] + line;
  float *at = packed_alloc(total * sizeof(float), &b->chunk);
  if (!at) {
    st = api->CreateStatus(ORT_FAIL, "out of memory");
    goto bad;
  }
  /* in the order a run reads them; padded channels zero: whole vectors are loaded */
  transpose_into(b->be = take(&at, sizes[0]), be, b->e, 1, b->ep);
  panels_into(b->weT = take(&at, sizes[1]), we, b->e, (int)kk, b->ep);
  transpose_into(b->bd = take(&at, sizes[2]), bd, b->e, 1, b->ep);
  transpose_into(b->wdT = take(&at, sizes[3]), wd, b->e, 9, b->ep);
  panels_into(b->wpT = take(&at, sizes[4]), wp, b->o, b->e, b->op);
  memcpy(b->bp = take(&at, sizes[5]), bp, (size_t)b->o * sizeof(float));
  *out = b;
  return NULL;
bad:
  block_free(b);
  return st;
}

/* Where a tile's sums go: as Act(sum + bias) straight to dst (np pixels, ldd floats apart: an
 * expand's finished values, never through memory first), or, without a sink, to `out`, kept
 * for the next chunk of K (a project's) */
typedef struct {
  const float *bias;
  float *dst;
  long ldd;
  int np;
  float lo, hi;
} Sink;

/* Weight lines to fetch from memory while a tile computes: in a whole model every block's
 * weights are evicted by the other blocks' before its next run, so the first pixel tile of each
 * panel would wait on its panel (the 7x7 blocks, 1.2 MB of weights each: ~12 % of their time).
 * The tiles of one panel fetch the next panel's lines between them (`ahead`), one line per
 * product row, into L2 */
typedef struct {
  const char *at;
  int lines;
} Ahead;
static const Ahead nothing_ahead = {NULL, 0};

/* tile t's share of the lines of [next, end), the next panel, for `tiles` tiles */
static inline Ahead ahead(const float *next, const float *end, int t, int tiles) {
  long lines = (long)(end - next) * (long)sizeof(float) / LINE, per = (lines + tiles - 1) / tiles;
  long from = (long)t * per;
  if (lines <= 0 || from >= lines) return nothing_ahead;
  return (Ahead){(const char *)next + from * LINE, (int)(lines - from < per ? lines - from : per)};
}
static inline void fetch(Ahead a) {
  for (int l = 0; l < a.lines; l++) __builtin_prefetch(a.at + (long)l * LINE, 0, 2);
}

/* the panel after [w, w + size) in an array ending at `end`, at most `size` long */
static inline const float *next_end(const float *w, size_t size, const float *end) {
  return (size_t)(end - w) > 2 * size ? w + 2 * size : end;
}

/* a loop over a micro-tile's pixels or vectors, unrolled whole: the sums then live in registers
 * from the first product to the last, not in a stack array stored and loaded around every call
 * (that cost a call of 16 to 32 products per sum 15-25 % of its time) */
#define UNROLLED(i, n) _Pragma("GCC unroll 16") for (int i = 0; i < (n); i++)

/* out[i][v] = sum_j w[j][v*VL ...] * at(j)[i*ldi], for CP pixels i and NV vectors of channels v
 * (weights transposed: channels along the vector; each pixel's value broadcast). A 1x1 conv's
 * inputs are strided (at(j) = src + j*ldk), a 3x3 conv's gathered (at(j) = src + off[j]: tap j's
 * place relative to the window's corner) */
#define MICRO_TILE(NAME, NV, AT)                                                          \
  static void NAME(int k, const float *w, long ldw, const float *src, long ldk,           \
                   const int *off, long ldi, vf out[CP][NV], int accumulate,              \
                   const Sink *to, Ahead pf) {                                            \
    (void)ldk; (void)off;                                                                 \
    vf acc[CP][NV];                                                                       \
    UNROLLED(i, CP) UNROLLED(v, NV)                                                       \
      acc[i][v] = to ? *(const vf *)(to->bias + v * VL) : accumulate ? out[i][v] : (vf){0}; \
    for (int j = 0; j < k; j++, w += ldw) {                                               \
      if (j < pf.lines) __builtin_prefetch(pf.at + (long)j * LINE, 0, 2);                 \
      const float *at = AT;                                                               \
      vf wv[NV];                                                                          \
      UNROLLED(v, NV) wv[v] = *(const vf *)(w + v * VL);                                  \
      UNROLLED(i, CP) {                                                                   \
        float xi = at[i * ldi];                                                           \
        UNROLLED(v, NV) acc[i][v] += xi * wv[v];                                          \
      }                                                                                   \
    }                                                                                     \
    if (!to) {                                                                            \
      UNROLLED(i, CP) UNROLLED(v, NV) out[i][v] = acc[i][v];                              \
      return;                                                                             \
    }                                                                                     \
    vf lo = (vf){0} + to->lo, hi = (vf){0} + to->hi;                                      \
    UNROLLED(i, CP) UNROLLED(v, NV)                                                       \
      if (i < to->np) *(vf *)(to->dst + i * to->ldd + v * VL) = CLAMP(acc[i][v], lo, hi); \
  }
MICRO_TILE(micro_tile_1, 1, src + j * ldk)
MICRO_TILE(micro_tile_2, 2, src + j * ldk)
MICRO_TILE(gather_tile_1, 1, src + off[j])
MICRO_TILE(gather_tile_2, 2, src + off[j])
#if CV > 2
MICRO_TILE(micro_tile_3, 3, src + j * ldk)
MICRO_TILE(gather_tile_3, 3, src + off[j])
#endif

/* out ([CP][nv]) for one tile of output channels, nv = tile_vectors(): `w` is the tile's
 * panel (rows of nv vectors), added to what out holds when `accumulate`, or sent to a sink;
 * inputs gathered through `off` when it is given, else strided by ldk */
static int micro_tile(int k, const float *w, const float *src, long ldk, const int *off, long ldi,
                      int nv, vf *out, int accumulate, const Sink *to, Ahead pf) {
  switch (nv) {
#if CV > 2
    case 3:
      (off ? gather_tile_3 : micro_tile_3)(k, w, 3 * VL, src, ldk, off, ldi, (vf(*)[3])out,
                                           accumulate, to, pf);
      return 3;
#endif
    case 2:
      (off ? gather_tile_2 : micro_tile_2)(k, w, 2 * VL, src, ldk, off, ldi, (vf(*)[2])out,
                                           accumulate, to, pf);
      return 2;
    default:
      (off ? gather_tile_1 : micro_tile_1)(k, w, VL, src, ldk, off, ldi, (vf(*)[1])out,
                                           accumulate, to, pf);
      return 1;
  }
}

/* ebuf [p][e_lo, e_hi) = Act(We X + be) for `count` pixels of x (channel stride ldc), from
 * panel boundary e_lo to e_hi (all ep channels but where an image is split: Split), a weight
 * panel at a time over every pixel tile (the panel stays in cache while the pixels pass); the
 * last tile's rows past `count` are written too (ebuf has room for them) */
static void expand_band(const Block *b, const float *x, long ldc, int count, float *ebuf,
                        float *tail, int e_lo, int e_hi) {
  Sink to = {.ldd = b->ep, .np = CP, .lo = b->lo, .hi = b->hi};
  int last = count / CP * CP; /* the last, partial pixel tile reads a zero-padded copy */
  if (last < count)
    for (int c = 0; c < b->c; c++)
      for (int i = 0; i < CP; i++)
        tail[c * CP + i] = last + i < count ? x[(size_t)c * ldc + last + i] : 0;
  for (int e0 = e_lo, nv; e0 < e_hi; e0 += nv * VL) {
    nv = tile_vectors(b->ep, e0);
    size_t size = (size_t)nv * VL * b->c;
    const float *wt = b->weT + (size_t)e0 * b->c;
    const float *end = next_end(wt, size, b->weT + (size_t)b->ep * b->c);
    for (int p0 = 0, tiles = (count + CP - 1) / CP; p0 < count; p0 += CP) {
      to.bias = b->be + e0, to.dst = ebuf + (size_t)p0 * b->ep + e0;
      micro_tile(b->c, wt, p0 < last ? x + p0 : tail, p0 < last ? ldc : CP, NULL, 1, nv, NULL,
                 0, &to, ahead(wt + size, end, p0 / CP, tiles));
    }
  }
}

/* a border patch's row: the CP windows (stride s) of a pixel tile span this many columns */
#define PATCH_WIDTH(s) ((CP - 1) * (s) + 3)

/* The same for a 3x3 expand (stride es, pads of 1; a stem conv) over the expanded rows
 * [ey0, ey0 + rows), each ew wide: pixel tiles run along a row; a tile whose windows lie inside
 * the image reads x through the taps' offsets in x (off[0..k)), one on the border a patch: its
 * windows' three rows of each channel, copied with their zero padding, read through the taps'
 * offsets in the patch (off[k..2k)) */
static void expand_conv_band(const Block *b, const float *x, int h, int w, int ey0, int rows,
                             int ew, float *ebuf, float *patch, const int *off) {
  Sink to = {.ldd = b->ep, .lo = b->lo, .hi = b->hi};
  int k = b->c * 9, s = b->es, pw = PATCH_WIDTH(s);
  for (int e0 = 0, nv; e0 < b->ep; e0 += nv * VL) {
    nv = tile_vectors(b->ep, e0);
    const float *wt = b->weT + (size_t)e0 * k;
    for (int ey = ey0; ey < ey0 + rows; ey++) {
      int iy0 = ey * s - 1;
      for (int ox0 = 0; ox0 < ew; ox0 += CP) {
        int np = ew - ox0 < CP ? ew - ox0 : CP, ix0 = ox0 * s - 1;
        to.bias = b->be + e0, to.np = np;
        to.dst = ebuf + ((size_t)(ey - ey0) * ew + ox0) * b->ep + e0;
        if (np == CP && iy0 >= 0 && iy0 + 2 < h && ix0 >= 0 && ix0 + pw - 1 < w) {
          micro_tile(k, wt, x + (size_t)iy0 * w + ix0, 0, off, s, nv, NULL, 0, &to, nothing_ahead);
          continue;
        }
        int inside = ix0 < 0 ? -ix0 : 0, end = w - ix0 < pw ? w - ix0 : pw; /* patch columns */
        for (int c = 0; c < b->c; c++)
          for (int dy = 0, iy = iy0; dy < 3; dy++, iy++) {
            float *row = patch + (size_t)(c * 3 + dy) * pw;
            memset(row, 0, (size_t)pw * sizeof(float));
            if (iy >= 0 && iy < h && end > inside)
              memcpy(row + inside, x + ((size_t)c * h + iy) * w + ix0 + inside,
                     (size_t)(end - inside) * sizeof(float));
          }
        micro_tile(k, wt, patch, 0, off + k, s, nv, NULL, 0, &to, nothing_ahead);
      }
    }
  }
}

#define KC 128 /* the project's chunk of expanded channels (project_band) */

/* One output vector of the depthwise: taps k, input p at the window's corner (iy0, ix0); the
 * taps outside the image are left out */
static inline vf depthwise_pixel(const vf k[9], vf bias, const float *p, long ep, long row,
                                 int iy0, int ix0, int h, int w) {
  vf acc = bias;
  if (iy0 >= 0 && iy0 + 2 < h && ix0 >= 0 && ix0 + 2 < w) {
    for (int dy = 0; dy < 3; dy++, p += row) /* three short chains, not one long one */
      acc += k[3 * dy] * *(const vf *)p + k[3 * dy + 1] * *(const vf *)(p + ep) +
             k[3 * dy + 2] * *(const vf *)(p + 2 * ep);
    return acc;
  }
  for (int dy = 0; dy < 3; dy++)
    for (int dx = 0; dx < 3; dx++)
      if (iy0 + dy >= 0 && iy0 + dy < h && ix0 + dx >= 0 && ix0 + dx < w)
        acc += k[3 * dy + dx] * *(const vf *)(p + dy * row + dx * ep);
  return acc;
}

/* Four neighbouring output vectors of a row, windows inside the image, stride S (a constant
 * where inlined): each input vector is loaded once for every output it feeds, each output is
 * a chain of FMAs from the bias */
static inline void depthwise_four(const vf k[9], vf bias, const float *p, long ep, long row,
                                  int S, vf lo, vf hi, float *d) {
  vf a0 = bias, a1 = bias, a2 = bias, a3 = bias;
  for (int dy = 0; dy < 3; dy++, p += row) {
    vf x[3 * 2 + 3], k0 = k[3 * dy], k1 = k[3 * dy + 1], k2 = k[3 * dy + 2];
    for (int i = 0; i < 3 * S + 3; i++) x[i] = *(const vf *)(p + i * ep);
    a0 += k0 * x[0], a1 += k0 * x[S], a2 += k0 * x[2 * S], a3 += k0 * x[3 * S];
    a0 += k1 * x[1], a1 += k1 * x[S + 1], a2 += k1 * x[2 * S + 1], a3 += k1 * x[3 * S + 1];
    a0 += k2 * x[2], a1 += k2 * x[S + 2], a2 += k2 * x[2 * S + 2], a3 += k2 * x[3 * S + 2];
  }
  *(vf *)d = CLAMP(a0, lo, hi);
  *(vf *)(d + ep) = CLAMP(a1, lo, hi);
  *(vf *)(d + 2 * ep) = CLAMP(a2, lo, hi);
  *(vf *)(d + 3 * ep) = CLAMP(a3, lo, hi);
}

/* dbuf [q][e_lo, e_hi) = Act(depthwise(ebuf) + bd) for the output rows [oy0, oy0 + r), ebuf
 * holding the expanded rows from `first` on, a vector of channels at a time: its 9 taps stay in
 * registers while every output pixel passes. A row's inner pixels go four at a time in a loop
 * with nothing but the arithmetic (depthwise_four); its ends one at a time. Meanwhile the next
 * vector's taps and the project's first panel are fetched (Ahead) */
static void depthwise_band(const Block *b, const float *ebuf, int first, int h, int w,
                           int oy0, int r, int ow, float *dbuf, long e_lo, long e_hi) {
  vf lo = (vf){0} + b->lo, hi = (vf){0} + b->hi;
  long ep = b->ep, row = (long)w * ep;
  int s = b->stride;
  int nv = tile_vectors(b->op, 0), panel = (b->e < KC ? b->e : KC) * nv * VL;
  for (long e0 = e_lo; e0 < e_hi; e0 += VL) {
    for (int t = 0; e0 + VL < e_hi && t < 9; t++)
      __builtin_prefetch(b->wdT + t * ep + e0 + VL, 0, 2);
    fetch(ahead(b->wpT, b->wpT + panel, (int)((e0 - e_lo) / VL), (int)((e_hi - e_lo) / VL)));
    vf k[9], bias = *(const vf *)(b->bd + e0);
    for (int t = 0; t < 9; t++) k[t] = *(const vf *)(b->wdT + t * ep + e0);
    for (int oy = oy0; oy < oy0 + r; oy++) {
      int iy0 = oy * s - 1, ox = 0;
      const float *in = ebuf + (iy0 - first) * row + e0 - ep; /* output pixel 0's window */
      float *d = dbuf + (size_t)(oy - oy0) * ow * ep + e0;
      if (iy0 >= 0 && iy0 + 2 < h) { /* inner pixels: windows from column 0 to w - 1 */
        *(vf *)d = CLAMP(depthwise_pixel(k, bias, in, ep, row, iy0, -1, h, w), lo, hi);
        for (ox = 1; (ox + 3) * s + 1 < w; ox += 4)
          if (s == 1)
            depthwise_four(k, bias, in + ox * ep, ep, row, 1, lo, hi, d + ox * ep);
          else
            depthwise_four(k, bias, in + 2 * ox * ep, ep, row, 2, lo, hi, d + ox * ep);
      }
      for (; ox < ow; ox++) {
        int ix0 = ox * s - 1;
        vf acc = depthwise_pixel(k, bias, in + (ix0 + 1) * ep, ep, row, iy0, ix0, h, w);
        *(vf *)(d + ox * ep) = CLAMP(acc, lo, hi);
      }
    }
  }
}

/* t[i][j] = t[j][i]: Eklundh's transpose, log2(VL) rounds of two-vector shuffles that swap the
 * off-diagonal blocks of side s (VL * log2(VL) shuffles, not VL * VL scalar moves) */
#if defined(__clang__) || __GNUC__ >= 12
#define SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
typedef int vi __attribute__((vector_size(VL * 4)));
#define SHUFFLE(a, b, ...) __builtin_shuffle(a, b, (vi){__VA_ARGS__})
#endif
#define LO(j, s) (((j) & (s)) ? VL + (j) - (s) : (j))  /* row i: its own low, the pair's low */
#define HI(j, s) (((j) & (s)) ? VL + (j) : (j) + (s))  /* row i + s: the high halves */
#if VL == 16
#define LANES(F, s) F(0, s), F(1, s), F(2, s), F(3, s), F(4, s), F(5, s), F(6, s), F(7, s), \
    F(8, s), F(9, s), F(10, s), F(11, s), F(12, s), F(13, s), F(14, s), F(15, s)
#elif VL == 8
#define LANES(F, s) F(0, s), F(1, s), F(2, s), F(3, s), F(4, s), F(5, s), F(6, s), F(7, s)
#else
#define LANES(F, s) F(0, s), F(1, s), F(2, s), F(3, s)
#endif
#define ROUND(t, s)                                                  \
  for (int i = 0; i < VL; i++)                                       \
    if (!(i & (s))) {                                                \
      vf a = t[i], b = t[i + (s)];                                   \
      t[i] = SHUFFLE(a, b, LANES(LO, s));                            \
      t[i + (s)] = SHUFFLE(a, b, LANES(HI, s));                      \
    }
static inline void transpose(vf t[VL]) {
#if VL == 16
  ROUND(t, 8)
#endif
#if VL >= 8
  ROUND(t, 4)
#endif
  ROUND(t, 2)
  ROUND(t, 1)
}

/* y [o][q] (NCHW, channel stride ldy) for the output channels from panel boundary o_lo to
 * o_hi (all op but where an image is split: Split) from dbuf [q][ep] (rows up to q rounded up
 * to CP may hold anything), plus res (channel stride ldy too: a residual has the output's
 * shape). The expanded channels are taken KC at a time, so one chunk of a channel tile's
 * weights (KC rows of CV vectors: 32 KB with AVX-512) stays in L1 while every pixel tile uses
 * it; `acc` holds the pixel tiles' sums between chunks. */
static void project_band(const Block *b, const float *dbuf, int q, const float *res,
                         float *y, long ldy, vf *acc, int o_lo, int o_hi) {
  for (int o0 = o_lo, nv; o0 < o_hi; o0 += nv * VL) {
    nv = tile_vectors(b->op, o0);
    for (int k0 = 0; k0 < b->e; k0 += KC) {
      int kc = b->e - k0 < KC ? b->e - k0 : KC;
      size_t size = (size_t)kc * nv * VL;
      const float *wt = b->wpT + (size_t)o0 * b->e + (size_t)k0 * nv * VL;
      const float *end = next_end(wt, size, b->wpT + (size_t)b->op * b->e);
      for (int q0 = 0, tiles = (q + CP - 1) / CP; q0 < q; q0 += CP)
        micro_tile(kc, wt, dbuf + (size_t)q0 * b->ep + k0, 1, NULL, b->ep, nv,
                   acc + (size_t)(q0 / CP) * CP * CV, k0 > 0, NULL,
                   ahead(wt + size, end, q0 / CP, tiles));
    }
    /* y's rows are pixels of one channel: VL pixels' sums (vectors of channels) at a time are
     * transposed in registers into VL channels' vectors of pixels, and stored whole */
    for (int v = 0; v < nv; v++)
      for (int p = 0; p < q; p += VL) {
        int np = q - p < VL ? q - p : VL;
        vf t[VL];
        for (int i = 0; i < VL; i++) {
          int pi = p + (i < np ? i : 0);
          t[i] = acc[(size_t)(pi / CP) * CP * CV + (size_t)(pi % CP) * nv + v];
        }
        transpose(t);
        for (int l = 0; l < VL && o0 + v * VL + l < b->o; l++) {
          int o = o0 + v * VL + l;
          float *yo = y + (size_t)o * ldy + p;
          const float *ro = res ? res + (size_t)o * ldy + p : NULL;
          vf r = t[l] + b->bp[o], add = {0};
          if (np == VL) {
            *(vf *)yo = ro ? r + *(const vf *)ro : r;
            continue;
          }
          if (ro) memcpy(&add, ro, (size_t)np * sizeof(float)); /* not past the tensor's end */
          r += add;
          memcpy(yo, &r, (size_t)np * sizeof(float));
        }
      }
  }
}

/* input rows a band of r output rows from oy0 needs (clamped to the image), first and count */
static inline void band_rows(const Block *b, int h, int oy0, int r, int *first, int *count) {
  int lo = oy0 * b->stride - 1, hi = (oy0 + r - 1) * b->stride + 1;
  *first = lo < 0 ? 0 : lo;
  *count = (hi > h - 1 ? h - 1 : hi) + 1 - *first;
}

/* A band's expanded rows by default: as many as BAND_FLOATS (256 KB) hold, at least one output
 * row's worth. On MobileNetV2's blocks (Xeon, 2 MB L2) that ran 1.4-1.9x faster than the whole
 * image at once for 56x56 and 112x112 inputs and 1.1x for 28x28, while whole 7x7 and 14x14
 * images fit in one band. The tile autotuner measures other heights. */
#define BAND_FLOATS (64 * 1024)
static inline int band_rows_default(const Block *b, int w) {
  long fit = BAND_FLOATS / ((long)w * b->ep);
  return fit > 3 ? (int)((fit - 3) / b->stride + 1) : 1;
}

/* the per-thread scratch for bands of r output rows, in floats: the expanded rows a band needs
 * (w: the expanded image's width; plus one pixel tile of slack), the depthwise results and the
 * project sums of its pixel tiles, a pixel tile's padded input copy (a 3x3 expand's border
 * patch fits in it: 3 (CP - 1) es + 9 <= 9 CP floats a channel), a vector's worth to align the
 * sums, and a 3x3 expand's tap offsets (in x and in the patch) */
static inline size_t ebuf_floats(const Block *b, int w, int r) {
  return ((size_t)((r - 1) * b->stride + 3) * w + CP) * b->ep;
}
static inline size_t dbuf_floats(const Block *b, int r, int ow) {
  return (size_t)ROUND_UP(r * ow, CP) * b->ep;
}
static size_t scratch_floats(const Block *b, int w, int r, int ow) {
  return ebuf_floats(b, w, r) + dbuf_floats(b, r, ow) + (size_t)ROUND_UP(r * ow, CP) * CV * VL +
         (size_t)b->c * b->k * b->k * (CP + 2) + VL;
}

/* p, or the next float after it on a whole vector's boundary (the project sums') */
static inline float *vector_aligned(float *p) {
  return p + (VL - (uintptr_t)p / sizeof(float) % VL) % VL;
}

/* the expanded image's side for an input side of n */
static inline int expanded(const Block *b, int n) { return n ? (n - 1) / b->es + 1 : 0; }

/* One compute call's work: every image's bands of r output rows, numbered image by image. They
 * run in batches of consecutive bands on onnxruntime's intra-op threads, each thread in its own
 * scratch; a band expands only the expanded rows its thread's previous band did not (those it
 * shares slide to the front), so on one thread nothing is computed twice, and a band's
 * expansion stays in cache however large the image. */
typedef struct {
  const Block *b;
  const float *x;
  float *y;
  int h, w, oh, ow, r, bands; /* bands: per image */
  unsigned long call;
  int failed;
} Work;

static void ORT_API_CALL run_band(void *work, size_t index) {
  const Work *job = work;
  const Block *b = job->b;
  int h = job->h, w = job->w, ow = job->ow, r = job->r, eh = expanded(b, h), ew = expanded(b, w);
  Scratch *s = scratch_for(scratch_floats(b, ew, r, ow));
  if (!s) {
    __atomic_store_n(&((Work *)work)->failed, 1, __ATOMIC_RELAXED);
    return;
  }
  size_t image = index / job->bands;
  const float *x = job->x + image * b->c * h * w;
  float *y = job->y + image * b->o * job->oh * ow;
  float *ebuf = s->data, *dbuf = ebuf + ebuf_floats(b, ew, r), *tail = dbuf + dbuf_floats(b, r, ow);
  int *off = (int *)(tail + (size_t)b->c * b->k * b->k * CP);
  float *acc = (float *)(off + 2 * b->c * b->k * b->k);
  acc = vector_aligned(acc);
  for (int j = 0, k = b->c * 9; b->k == 3 && j < k; j++) { /* tap j: channel, row, column */
    off[j] = (j / 9 * h + j / 3 % 3) * w + j % 3;
    off[k + j] = (j / 9 * 3 + j / 3 % 3) * PATCH_WIDTH(b->es) + j % 3;
  }
  size_t px = (size_t)ew * b->ep;                           /* floats per expanded row */
  int oy0 = (int)(index % job->bands) * r, n = job->oh - oy0 < r ? job->oh - oy0 : r;
  int first, count, keep = 0, have_first, have;
  band_rows(b, eh, oy0, n, &first, &count);
  if (s->call == job->call && s->band + 1 == index && oy0 > 0) { /* this thread's last band */
    band_rows(b, eh, oy0 - r, r, &have_first, &have);
    if (first >= have_first && first < have_first + have) {
      keep = have_first + have - first; /* rows the previous band expanded: slide them down */
      if (first != have_first)
        memmove(ebuf, ebuf + (first - have_first) * px, keep * px * sizeof(float));
    }
  }
  if (keep < count && b->k == 1)
    expand_band(b, x + (size_t)(first + keep) * w, (long)h * w, (count - keep) * w,
                ebuf + keep * px, tail, 0, b->ep);
  else if (keep < count)
    expand_conv_band(b, x, h, w, first + keep, count - keep, ew, ebuf + keep * px, tail, off);
  s->call = job->call, s->band = index;
  depthwise_band(b, ebuf, first, eh, ew, oy0, n, ow, dbuf, 0, b->ep);
  project_band(b, dbuf, n * ow, b->residual ? x + (size_t)oy0 * ow : NULL,
               y + (size_t)oy0 * ow, (long)job->oh * ow, (vf *)acc, 0, b->op);
}

/* An image the default band height takes whole (7x7 in MobileNetV2) is one band, so one
 * thread would run it. On several cores it is split instead: first each task expands and
 * filters one weight panel's channels over the whole image (a channel's depthwise needs that
 * channel only), then each task projects onto one panel of output channels. On one thread
 * that is the single band's work, in the same order. The expanded image and the depthwise
 * results are shared: they live in the calling thread's scratch, after the part every thread
 * has its own of (a padded pixel tile's input, project sums). */
typedef struct {
  const Block *b;
  const float *x;
  float *y, *ebuf, *dbuf;
  int h, w, oh, ow;
  size_t own; /* floats of each thread's own part */
  int failed;
} Split;

static inline size_t split_own(const Block *b, int q) {
  return ROUND_UP((size_t)b->c * CP + (size_t)ROUND_UP(q, CP) * CV * VL + VL, LINE / sizeof(float));
}

static float *split_scratch(Split *job) {
  Scratch *s = scratch_for(job->own);
  if (!s) {
    __atomic_store_n(&job->failed, 1, __ATOMIC_RELAXED);
    return NULL;
  }
  s->call = 0; /* its rows are overwritten: no band's now */
  return s->data;
}

static void ORT_API_CALL split_expand(void *work, size_t panel) {
  Split *job = work;
  const Block *b = job->b;
  float *tail = split_scratch(job);
  if (!tail) return;
  int e0 = (int)panel * CV * VL, e1 = e0 + tile_vectors(b->ep, e0) * VL;
  expand_band(b, job->x, (long)job->h * job->w, job->h * job->w, job->ebuf, tail, e0, e1);
  depthwise_band(b, job->ebuf, 0, job->h, job->w, 0, job->oh, job->ow, job->dbuf, e0, e1);
}

static void ORT_API_CALL split_project(void *work, size_t panel) {
  Split *job = work;
  const Block *b = job->b;
  float *own = split_scratch(job);
  if (!own) return;
  int q = job->oh * job->ow, o0 = (int)panel * CV * VL, o1 = o0 + tile_vectors(b->op, o0) * VL;
  float *acc = vector_aligned(own + b->c * CP);
  project_band(b, job->dbuf, q, b->residual ? job->x : NULL, job->y, q, (vf *)acc, o0, o1);
}

int api_version;            /* of the API table onnxruntime handed over */
static unsigned long calls; /* compute calls so far: a scratch's held rows name theirs */
size_t cores = 1;           /* online at registration: sysconf reads /sys on every call */

/* n images of a block with a 1x1 expand, each split (Split) */
static OrtStatus *split_images(OrtKernelContext *ctx, const Block *b, const float *x, float *y,
                               int n, int h, int w, int oh, int ow) {
  OrtStatus *st;
  int q = oh * ow;
  Split job = {b, x, y, NULL, NULL, h, w, oh, ow, split_own(b, q), 0};
  size_t ebuf = (size_t)ROUND_UP(h * w, CP) * b->ep, dbuf = (size_t)ROUND_UP(q, CP) * b->ep;
  Scratch *s = scratch_for(job.own + ebuf + dbuf);
  if (!s) return api->CreateStatus(ORT_FAIL, "edgesmith.InvertedResidual: out of memory");
  job.ebuf = s->data + job.own, job.dbuf = job.ebuf + ebuf;
  size_t in = (size_t)ROUND_UP(b->ep, CV * VL) / (CV * VL); /* weight panels */
  size_t out = (size_t)ROUND_UP(b->op, CV * VL) / (CV * VL);
  for (int i = 0; i < n; i++, job.x += (size_t)b->c * h * w, job.y += (size_t)b->o * q)
    if ((st = api->KernelContext_ParallelFor(ctx, split_expand, in, cores, &job)) ||
        (st = api->KernelContext_ParallelFor(ctx, split_project, out, cores, &job)))
      return st;
  if (job.failed) return api->CreateStatus(ORT_FAIL, "edgesmith.InvertedResidual: out of memory");
  return NULL;
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
  if (b->k != 1 && (size_t)b->c * h * w > INT32_MAX) /* the taps' offsets are ints */
    return fail("edgesmith.InvertedResidual: input too large for a 3x3 expand");
  int eh = expanded(b, h), ew = expanded(b, w);
  int oh = eh ? (eh - 1) / b->stride + 1 : 0, ow = ew ? (ew - 1) / b->stride + 1 : 0;
  int64_t od[4] = {n, b->o, oh, ow};
  OrtValue *yv;
  if ((st = api->KernelContext_GetOutput(ctx, 0, od, 4, &yv))) return st;
  const float *x;
  float *y;
  if ((st = api->GetTensorMutableData((OrtValue *)xv, (void **)&x))) return st;
  if ((st = api->GetTensorMutableData(yv, (void **)&y))) return st;
  if (n == 0 || oh == 0 || ow == 0) return NULL; /* an empty output: nothing to compute */
  int r = b->tile_rows > 0 ? b->tile_rows : band_rows_default(b, ew);
  if (r > oh) r = oh;
  if (b->k == 1 && !b->tile_rows && r == oh && (size_t)h * w * b->ep <= BAND_FLOATS &&
      (size_t)n < cores && api_version >= 17)
    return split_images(ctx, b, x, y, n, h, w, oh, ow);
  Work job = {b, x, y, h, w, oh, ow, r, (oh + r - 1) / r,
              __atomic_add_fetch(&calls, 1, __ATOMIC_RELAXED), 0};
  size_t total = (size_t)n * job.bands;
  /* as many batches of consecutive bands as cores: a thread's bands share rows; onnxruntime
   * runs them on its intra-op threads, all on this one when the session has one */
  size_t batches = cores < total ? cores : total;
  if (api_version >= 17 && total > 1) { /* KernelContext_ParallelFor: onnxruntime 1.17 */
    if ((st = api->KernelContext_ParallelFor(ctx, run_band, total, batches, &job))) return st;
  } else {
    for (size_t i = 0; i < total; i++) run_band(&job, i);
  }
  if (job.failed) return api->CreateStatus(ORT_FAIL, "edgesmith.InvertedResidual: out of memory");
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

static OrtCustomOpDomain *domain; /* the op's, made at the first registration */

/* onnxruntime unloads the library with the session options that loaded it (each session's
 * options load it anew), once no session uses it: what it keeps for a next session goes too,
 * or every load would leave every thread's scratch, the domain and a thread key (a process
 * has 1024) behind */
__attribute__((destructor)) static void unload(void) {
  if (scratch_key_made) pthread_key_delete(scratch_key); /* no destructor runs after this */
  while (scratches) scratch_free(scratches);            /* no session left to use them */
  if (domain) api->ReleaseCustomOpDomain(domain);
}

/* sessions may be created from several threads at once: one registration at a time */
EXPORT OrtStatus *ORT_API_CALL RegisterCustomOps(OrtSessionOptions *options, const OrtApiBase *base) {
  pthread_mutex_lock(&registering);
  OrtStatus *st = register_locked(options, base);
  pthread_mutex_unlock(&registering);
  return st;
}

static OrtStatus *register_locked(OrtSessionOptions *options, const OrtApiBase *base) {
  for (int v = ORT_API_VERSION; v >= MIN_API && !api; v--) api = base->GetApi(api_version = v);
  long online = sysconf(_SC_NPROCESSORS_ONLN);
  cores = online > 1 ? (size_t)online : 1;
  if (!api) return NULL; /* cannot even say why without an API table; the op stays unknown */
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
  if ((st = api->CustomOpDomain_Add(created, int8_block_op()))) return st;
  domain = created;
  return api->AddCustomOpDomain(options, domain);
}
