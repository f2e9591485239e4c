/* Blockwise 8-bit decode in one pass: out[i] = map[codes[i]] * absmax[i / block], float32.

   Plain C99 and pthreads, no Python, numpy or torch headers: native.py compiles this file on first
   use and calls it through ctypes (which releases the GIL). It trusts its lengths: the caller has
   checked that the payload holds ceil(numel / block) absmax values and numel codes. The product is
   one IEEE float32 multiply, the same as numpy's and torch's, so the bytes are the same (build
   without -ffast-math). absmax is read with memcpy: a payload inside a frame may be unaligned. */
#include <pthread.h>
#include <stdint.h>
#include <string.h>

#define MAX_THREADS 64

typedef struct {
    const uint8_t *codes;   /* (numel,) */
    const uint8_t *absmax;  /* (blocks,) little-endian float32, maybe unaligned */
    const float *map;       /* (256,) */
    float *out;             /* (numel,) */
    int64_t numel, block, first, last;  /* this job's blocks: [first, last) */
} job_t;

static void decode_blocks(const job_t *job) {
    const uint8_t *codes = job->codes;
    const float *map = job->map;
    float *out = job->out;
    for (int64_t b = job->first; b < job->last; b++) {
        float scale;
        memcpy(&scale, job->absmax + 4 * b, sizeof scale);
        const int64_t start = b * job->block;
        const int64_t end = job->numel - start < job->block ? job->numel : start + job->block;
        for (int64_t i = start; i < end; i++) out[i] = map[codes[i]] * scale;
    }
}

static void *run_job(void *job) {
    decode_blocks(job);
    return NULL;
}

/* Splits the blocks over `threads` threads (the caller's one included); a thread that cannot be
   started leaves its share to the caller. Returns 0. */
int blockwise8_decode(const uint8_t *codes, const uint8_t *absmax, const float *map, float *out,
                      int64_t numel, int64_t block, int32_t threads) {
    if (numel <= 0 || block <= 0) return 0;
    const int64_t blocks = (numel - 1) / block + 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > blocks) threads = (int32_t)blocks;
    if (threads < 1) threads = 1;
    job_t jobs[MAX_THREADS];
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS];
    for (int32_t t = 0; t < threads; t++) {
        job_t job = {codes, absmax, map, out, numel, block, blocks * t / threads,
                     blocks * (t + 1) / threads};
        jobs[t] = job;
    }
    for (int32_t t = 1; t < threads; t++)
        started[t] = pthread_create(&ids[t], NULL, run_job, &jobs[t]) == 0;
    decode_blocks(&jobs[0]);
    for (int32_t t = 1; t < threads; t++) {
        if (started[t])
            pthread_join(ids[t], NULL);
        else
            decode_blocks(&jobs[t]);
    }
    return 0;
}
