/* Blockwise 8-bit decode in one pass: out[i] = map[codes[i]] * absmax[i / block], float32; and
   encode in one pass over each block (absmax) and one more (codes), with AVX-512 only.

   Plain C99 and pthreads, no Python, numpy or torch headers: native.py compiles this file on first
   use and calls it through ctypes (which releases the GIL). It trusts its lengths: the caller has
   checked that the payload holds ceil(numel / block) absmax values and numel codes. The product is
   one IEEE float32 multiply, the same as numpy's and torch's, so the bytes are the same (build
   without -ffast-math). absmax is read with memcpy: a payload inside a frame may be unaligned.

   On x86-64 CPUs with AVX-512 VBMI (checked at run time; gcc >= 8, clang >= 7), 64 codes at a time
   look up the 4 bytes of their map values in 4 byte tables held in registers (vpermi2b), ~3x
   faster than the scalar loop, which does the rest: other CPUs, tails shorter than 64.

   Encoding (x86-64 with AVX-512F only; elsewhere the caller uses numpy) repeats blockwise8.py's
   numpy passes 16 values at a time: absmax = max |x| of the block, s = x / max(absmax, 2**-149)
   (one IEEE division, as numpy's), and code = low[h] + (s > threshold[h]) with h the upper 16 bits
   of s, two gathers from the tables blockwise8.py builds. A block holding a NaN or an infinity
   stops it (returns -1): the caller encodes such tensors with numpy, whose NaN it keeps. */
#include <pthread.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && \
    ((defined(__clang__) && __clang_major__ >= 7) || (!defined(__clang__) && __GNUC__ >= 8))
#define VBMI_PATH 1
#include <immintrin.h>
#define VBMI __attribute__((target("avx512f,avx512bw,avx512vbmi")))

typedef struct {
    __m512i bytes[4][4];  /* byte p of map[64 * q + i]: [p][q], lane i */
    __m512i order;        /* puts code 16m + 4k + j where the unpacks below leave register m,
                             128-bit lane k, slot j: the 4 outputs come out in order */
} tables_t;

VBMI static void vbmi_tables(const float *map, tables_t *t) {
    uint8_t bytes[4][256], order[64];
    for (int v = 0; v < 256; v++) {
        uint32_t u;
        memcpy(&u, map + v, sizeof u);
        for (int p = 0; p < 4; p++) bytes[p][v] = (uint8_t)(u >> (8 * p));
    }
    for (int p = 0; p < 4; p++)
        for (int q = 0; q < 4; q++) t->bytes[p][q] = _mm512_loadu_si512(bytes[p] + 64 * q);
    for (int m = 0; m < 4; m++)
        for (int k = 0; k < 4; k++)
            for (int j = 0; j < 4; j++) order[16 * k + 4 * m + j] = (uint8_t)(16 * m + 4 * k + j);
    t->order = _mm512_loadu_si512(order);
}

VBMI static void vbmi_decode64(const uint8_t *codes, const tables_t *t, float scale, float *out) {
    const __m512i c = _mm512_permutexvar_epi8(t->order, _mm512_loadu_si512(codes));  /* (64,) */
    const __mmask64 upper = _mm512_movepi8_mask(c);  /* codes >= 128 */
    __m512i b[4];  /* byte p of each code's map value */
    for (int p = 0; p < 4; p++) {
        const __m512i lo = _mm512_permutex2var_epi8(t->bytes[p][0], c, t->bytes[p][1]);
        const __m512i hi = _mm512_permutex2var_epi8(t->bytes[p][2], c, t->bytes[p][3]);
        b[p] = _mm512_mask_blend_epi8(upper, lo, hi);
    }
    const __m512i w01l = _mm512_unpacklo_epi8(b[0], b[1]), w01h = _mm512_unpackhi_epi8(b[0], b[1]);
    const __m512i w23l = _mm512_unpacklo_epi8(b[2], b[3]), w23h = _mm512_unpackhi_epi8(b[2], b[3]);
    const __m512 s = _mm512_set1_ps(scale);
    _mm512_storeu_ps(out, _mm512_mul_ps(_mm512_castsi512_ps(_mm512_unpacklo_epi16(w01l, w23l)), s));
    _mm512_storeu_ps(out + 16,
                     _mm512_mul_ps(_mm512_castsi512_ps(_mm512_unpackhi_epi16(w01l, w23l)), s));
    _mm512_storeu_ps(out + 32,
                     _mm512_mul_ps(_mm512_castsi512_ps(_mm512_unpacklo_epi16(w01h, w23h)), s));
    _mm512_storeu_ps(out + 48,
                     _mm512_mul_ps(_mm512_castsi512_ps(_mm512_unpackhi_epi16(w01h, w23h)), s));
}
#endif

#define MAX_THREADS 64
#define CHUNK_NUMEL 65536  /* elements a thread claims at a time */

/* Threads claim chunks of blocks until none is left, rather than a fixed share each: when another
   process holds a core, the thread that runs does the work instead of waiting for one that does
   not (and a thread that cannot be started costs nothing). */
typedef struct {
    const uint8_t *codes;   /* (numel,) */
    const uint8_t *absmax;  /* (blocks,) little-endian float32, maybe unaligned */
    const float *map;       /* (256,) */
    float *out;             /* (numel,) */
    int64_t numel, block, blocks, chunk;  /* chunk: blocks claimed at a time */
    int64_t next;           /* the next chunk to claim, under lock */
    pthread_mutex_t lock;
    int vbmi;               /* use the AVX-512 VBMI path */
} work_t;

/* Blocks a thread claims at a time (about CHUNK_NUMEL elements, at least one block). */
static int64_t chunk_blocks(int64_t block) { return block < CHUNK_NUMEL ? CHUNK_NUMEL / block : 1; }

/* fn(work) on up to `threads` threads, the caller's one included, never more than `chunks`. */
static void run_on_threads(void *(*fn)(void *), void *work, int32_t threads, int64_t chunks) {
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > chunks) threads = (int32_t)chunks;
    pthread_t ids[MAX_THREADS];
    int started = 0;
    for (int32_t t = 1; t < threads; t++)
        if (pthread_create(&ids[started], NULL, fn, work) == 0) started++;
    fn(work);
    for (int t = 0; t < started; t++) pthread_join(ids[t], NULL);
}

static int64_t claim(work_t *work) {
    pthread_mutex_lock(&work->lock);
    const int64_t chunk = work->next++;
    pthread_mutex_unlock(&work->lock);
    return chunk;
}

static void *run(void *arg) {
    work_t *work = arg;
    const uint8_t *codes = work->codes;
    const float *map = work->map;
    float *out = work->out;
#ifdef VBMI_PATH
    tables_t tables;
    if (work->vbmi) vbmi_tables(map, &tables);
#endif
    const int64_t numel = work->numel, block = work->block, blocks = work->blocks;
    for (int64_t first; (first = claim(work) * work->chunk) < blocks;) {
        const int64_t last = blocks - first < work->chunk ? blocks : first + work->chunk;
        for (int64_t b = first; b < last; b++) {
            float scale;
            memcpy(&scale, work->absmax + 4 * b, sizeof scale);
            const int64_t start = b * block;
            const int64_t end = numel - start < block ? numel : start + block;
            int64_t i = start;
#ifdef VBMI_PATH
            if (work->vbmi)
                for (; i + 64 <= end; i += 64) vbmi_decode64(codes + i, &tables, scale, out + i);
#endif
            for (; i < end; i++) out[i] = map[codes[i]] * scale;
        }
    }
    return NULL;
}

/* Decodes on up to `threads` threads, the caller's one included. `simd`: 0 forces the scalar loop
   (tests compare the two). Returns 1 when the AVX-512 VBMI path ran, else 0. */
int blockwise8_decode(const uint8_t *codes, const uint8_t *absmax, const float *map, float *out,
                      int64_t numel, int64_t block, int32_t threads, int32_t simd) {
    if (numel <= 0 || block <= 0) return 0;
    int vbmi = 0;
#ifdef VBMI_PATH
    vbmi = simd && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
           && __builtin_cpu_supports("avx512vbmi");
#endif
    const int64_t blocks = (numel - 1) / block + 1, chunk = chunk_blocks(block);
    work_t work = {codes, absmax, map, out, numel, block, blocks, chunk, 0,
                   PTHREAD_MUTEX_INITIALIZER, vbmi};
    run_on_threads(run, &work, threads, (blocks - 1) / chunk + 1);
    pthread_mutex_destroy(&work.lock);
    return vbmi;
}

#ifdef VBMI_PATH
#define AVX512F __attribute__((target("avx512f")))

/* One block of n values -> its absmax (stored little-endian, maybe unaligned) and n codes.
   Returns 0, or -1 (nothing stored) when the block holds a NaN or an infinity. */
AVX512F static int encode_block(const float *x, int64_t n, const int32_t *low, const float *threshold,
                                uint8_t *absmax_out, uint8_t *codes) {
    const __m512 inf = _mm512_set1_ps(__builtin_inff());
    __m512 m = _mm512_setzero_ps();
    __mmask16 bad = 0;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m512 a = _mm512_abs_ps(_mm512_loadu_ps(x + i));
        bad |= _mm512_cmp_ps_mask(a, inf, _CMP_NLT_UQ);  /* inf or NaN */
        m = _mm512_max_ps(m, a);
    }
    const __mmask16 tail = (__mmask16)((1u << (n - i)) - 1u);
    if (tail) {
        const __m512 a = _mm512_abs_ps(_mm512_maskz_loadu_ps(tail, x + i));
        bad |= _mm512_mask_cmp_ps_mask(tail, a, inf, _CMP_NLT_UQ);
        m = _mm512_max_ps(m, a);
    }
    if (bad) return -1;
    const float absmax = _mm512_reduce_max_ps(m);
    memcpy(absmax_out, &absmax, sizeof absmax);
    const __m512 scale = _mm512_set1_ps(absmax > 0x1p-149f ? absmax : 0x1p-149f);
    const __m512i one = _mm512_set1_epi32(1);
    for (i = 0; i < n; i += 16) {
        const __mmask16 k = n - i >= 16 ? (__mmask16)0xFFFF : tail;
        const __m512 s = _mm512_div_ps(_mm512_maskz_loadu_ps(k, x + i), scale);
        const __m512i h = _mm512_srli_epi32(_mm512_castps_si512(s), 16);
        const __m512i lo = _mm512_i32gather_epi32(h, low, 4);
        const __m512 t = _mm512_i32gather_ps(h, threshold, 4);
        const __m512i c = _mm512_mask_add_epi32(lo, _mm512_cmp_ps_mask(s, t, _CMP_GT_OQ), lo, one);
        _mm512_mask_cvtepi32_storeu_epi8(codes + i, k, c);
    }
    return 0;
}

typedef struct {
    const float *x;         /* (numel,) */
    uint8_t *absmax;        /* (blocks,) little-endian float32, maybe unaligned */
    uint8_t *codes;         /* (numel,) */
    const int32_t *low;     /* (65536,) */
    const float *threshold; /* (65536,) */
    int64_t numel, block, blocks, chunk;
    int64_t next;           /* the next chunk to claim, under lock */
    int failed;             /* a block held a NaN or an infinity, under lock */
    pthread_mutex_t lock;
} encode_work_t;

static void *run_encode(void *arg) {
    encode_work_t *work = arg;
    const int64_t numel = work->numel, block = work->block, blocks = work->blocks;
    for (;;) {
        pthread_mutex_lock(&work->lock);
        const int64_t first = work->failed ? blocks : work->next++ * work->chunk;
        pthread_mutex_unlock(&work->lock);
        if (first >= blocks) break;
        const int64_t last = blocks - first < work->chunk ? blocks : first + work->chunk;
        for (int64_t b = first; b < last; b++) {
            const int64_t start = b * block;
            const int64_t n = numel - start < block ? numel - start : block;
            if (encode_block(work->x + start, n, work->low, work->threshold, work->absmax + 4 * b,
                             work->codes + start) != 0) {
                pthread_mutex_lock(&work->lock);
                work->failed = 1;
                pthread_mutex_unlock(&work->lock);
                return NULL;
            }
        }
    }
    return NULL;
}
#endif

/* Encodes on up to `threads` threads, the caller's one included. Returns 1 when done, 0 when this
   CPU (or build) has no AVX-512F (nothing written), -1 when a block held a NaN or an infinity
   (some blocks written): the caller then encodes with numpy. */
int blockwise8_encode(const float *x, uint8_t *absmax, uint8_t *codes, const int32_t *low,
                      const float *threshold, int64_t numel, int64_t block, int32_t threads) {
#ifdef VBMI_PATH
    if (numel <= 0 || block <= 0) return 1;
    if (!__builtin_cpu_supports("avx512f")) return 0;
    const int64_t blocks = (numel - 1) / block + 1, chunk = chunk_blocks(block);
    encode_work_t work = {x, absmax, codes, low, threshold, numel, block, blocks, chunk, 0, 0,
                          PTHREAD_MUTEX_INITIALIZER};
    run_on_threads(run_encode, &work, threads, (blocks - 1) / chunk + 1);
    pthread_mutex_destroy(&work.lock);
    return work.failed ? -1 : 1;
#else
    (void)x; (void)absmax; (void)codes; (void)low; (void)threshold; (void)numel; (void)block;
    (void)threads;
    return 0;
#endif
}
