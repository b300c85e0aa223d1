/* What edgesmith's kernel sources share: onnxruntime's API table, the cores, the per-thread
 * scratch and the packed-weight chunks (edgesmith_ops.c has them), and each op's description.
 * Every source is built into one library (sdk/own_kernels.py), hidden but these entry points. */
#ifndef EDGESMITH_OPS_H
#define EDGESMITH_OPS_H
#include <stddef.h>
#include <stdint.h>

#include "onnxruntime_c_api.h"

#define LINE 64
#define ROUND_UP(v, m) (((v) + (m) - 1) / (m) * (m)) /* v, m: integers of one type */

extern const OrtApi *api; /* the newest table onnxruntime has, set at registration */
extern int api_version;   /* its version */
extern size_t cores;      /* online at registration */

/* a thread's scratch of at least `floats` floats on a cache line, kept for its next call;
 * NULL when out of memory */
typedef struct Scratch {
  size_t floats;
  unsigned long call; /* 0: holds nothing */
  size_t band;
  struct Scratch *prev, *next; /* in `scratches` */
  _Alignas(LINE) float data[];
} Scratch;
Scratch *scratch_for(size_t floats);

/* zeroed bytes on a cache line in shared, huge-page-backed chunks, for packed weights */
struct Chunk;
void *packed_alloc(size_t bytes, struct Chunk **chunk);
void packed_free(struct Chunk *c);

/* edgesmith.QInvertedResidual (int8_block.c) */
OrtCustomOp *int8_block_op(void);
#endif
