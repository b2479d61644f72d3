// What a one-row int4 product can stream on this CPU, outside ONNX Runtime: the measurement
// behind "What caps int4 at one row" in docs/benchmarks.md. Not part of the runtime.
//
//     gcc -O3 -march=native -fopenmp scripts/int4_gemv_probe.c -o /tmp/int4_gemv_probe -lm
//     OMP_NUM_THREADS=2 /tmp/int4_gemv_probe [layers=128] [passes=11]
//
// y[N] = x[K] . W[K, N] for `layers` separate 4096 x 4096 weights (128 of them: 1.1 GB, more
// than the last-level cache), W in 4-bit blocks of 128 along K with a float32 scale and a zero
// point per block and column, x rounded to int8 per block of 128: the arithmetic of
// MatMulNBits at accuracy level 4 with blocks of 128, on the same stored bytes (the zero points
// counted at 4 bits). Prints the read bandwidth of a plain sum over 1 GiB with the same threads,
// the kernel's largest error against a scalar reference on one layer, and its median GB/s of
// stored bytes.
//
// The kernel: 32 columns a step in two zmm registers of 16 int32 lanes, one column a lane, so
// vpdpbusd (unsigned 4-bit values x signed 8-bit activations) needs no horizontal sums; each
// 64-byte load holds 8 K values of 16 columns, low nibbles K 0-3, high nibbles K 4-7.
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#ifndef __AVX512VNNI__
#error "needs AVX-512 VNNI (build with -march=native on such a CPU)"
#endif

enum {
    K = 4096,
    N = 4096,
    BLOCK = 128,
    BLOCKS = K / BLOCK,
    GROUPS = 2,                // zmm column groups a step, 16 columns each
    STEP = 16 * GROUPS,        // columns a step
    LOADS = BLOCK / 8,         // 64-byte loads a block and group
    PREFETCH = 16 * GROUPS,    // loads ahead
};
static const size_t LAYER_BYTES = (size_t)K * N / 2;

typedef struct {
    uint8_t *packed;  // [N / STEP][BLOCKS][LOADS][GROUPS][64]
    float *scale;     // [N / STEP][BLOCKS][STEP]
    float *offset;    // scale x zero point, same layout
} Layer;

typedef struct {
    int8_t values[K];
    float scale[BLOCKS];
    float sum[BLOCKS];  // scale x the sum of the block's int8 values, for the zero points
} RoundedRow;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static double median(double *times, int count) {
    for (int i = 0; i < count; i++)
        for (int j = i + 1; j < count; j++)
            if (times[j] < times[i]) {
                double swap = times[i];
                times[i] = times[j];
                times[j] = swap;
            }
    return times[count / 2];
}

static void round_row(const float *x, RoundedRow *row) {
    for (int b = 0; b < BLOCKS; b++) {
        float largest = 0;
        for (int i = 0; i < BLOCK; i++) largest = fmaxf(largest, fabsf(x[b * BLOCK + i]));
        float scale = largest / 127.f, inverse = scale ? 1.f / scale : 0.f;
        int sum = 0;
        for (int i = 0; i < BLOCK; i++) {
            int value = (int)lrintf(x[b * BLOCK + i] * inverse);
            row->values[b * BLOCK + i] = (int8_t)value;
            sum += value;
        }
        row->scale[b] = scale;
        row->sum[b] = scale * (float)sum;
    }
}

static void product(const Layer *w, const RoundedRow *row, float *y) {
    const int32_t *x4 = (const int32_t *)row->values;  // 4 activations an int32, broadcast
    const __m512i nibble = _mm512_set1_epi8(0x0F);
#pragma omp parallel for schedule(static)
    for (int step = 0; step < N / STEP; step++) {
        const __m512i *load = (const __m512i *)(w->packed + (size_t)step * BLOCKS * LOADS * GROUPS * 64);
        const float *scale = w->scale + (size_t)step * BLOCKS * STEP;
        const float *offset = w->offset + (size_t)step * BLOCKS * STEP;
        __m512 out[GROUPS];
        for (int g = 0; g < GROUPS; g++) out[g] = _mm512_setzero_ps();
        for (int b = 0; b < BLOCKS; b++) {
            __m512i dot[GROUPS];
            for (int g = 0; g < GROUPS; g++) dot[g] = _mm512_setzero_si512();
            for (int j = 0; j < LOADS; j++) {
                __m512i low_x = _mm512_set1_epi32(x4[b * (BLOCK / 4) + 2 * j]);
                __m512i high_x = _mm512_set1_epi32(x4[b * (BLOCK / 4) + 2 * j + 1]);
                for (int g = 0; g < GROUPS; g++) {
                    _mm_prefetch((const char *)(load + PREFETCH), _MM_HINT_T0);
                    __m512i v = _mm512_load_si512(load++);
                    dot[g] = _mm512_dpbusd_epi32(dot[g], _mm512_and_si512(v, nibble), low_x);
                    dot[g] = _mm512_dpbusd_epi32(dot[g], _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble), high_x);
                }
            }
            __m512 x_scale = _mm512_set1_ps(row->scale[b]), x_sum = _mm512_set1_ps(row->sum[b]);
            for (int g = 0; g < GROUPS; g++) {
                __m512 w_scale = _mm512_loadu_ps(scale + b * STEP + g * 16);
                __m512 w_offset = _mm512_loadu_ps(offset + b * STEP + g * 16);
                out[g] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[g]), _mm512_mul_ps(w_scale, x_scale), out[g]);
                out[g] = _mm512_fnmadd_ps(w_offset, x_sum, out[g]);
            }
        }
        for (int g = 0; g < GROUPS; g++) _mm512_storeu_ps(y + step * STEP + g * 16, out[g]);
    }
}

static int stored_value(const Layer *w, int k, int n) {  // W's 4-bit value at [k, n]
    int step = n / STEP, g = n % STEP / 16, lane = n % 16, b = k / BLOCK, j = k % BLOCK / 8, i = k % 8;
    size_t at = ((((size_t)step * BLOCKS + b) * LOADS + j) * GROUPS + g) * 64 + lane * 4 + i % 4;
    return i < 4 ? w->packed[at] & 15 : w->packed[at] >> 4;
}

static double largest_error(const Layer *w, const RoundedRow *row, const float *y) {
    double worst = 0;
    for (int n = 0; n < N; n += 7) {
        double reference = 0;
        for (int k = 0; k < K; k++) {
            size_t at = (size_t)(n / STEP) * BLOCKS * STEP + k / BLOCK * STEP + n % STEP;
            double weight = w->scale[at] * (double)stored_value(w, k, n) - w->offset[at];
            reference += weight * row->scale[k / BLOCK] * row->values[k];
        }
        worst = fmax(worst, fabs(reference - y[n]) / (fabs(reference) + 1e-3));
    }
    return worst;
}

static double read_gb_s(int passes) {  // a plain sum over 1 GiB, the same threads
    const size_t bytes = (size_t)1 << 30;
    uint8_t *buffer = aligned_alloc(64, bytes);
    for (size_t i = 0; i < bytes; i++) buffer[i] = (uint8_t)(i * 7);
    double times[64];
    for (int pass = 0; pass < passes; pass++) {
        double start = now();
        long long total = 0;
#pragma omp parallel reduction(+ : total)
        {
            __m512i sum = _mm512_setzero_si512();
#pragma omp for schedule(static)
            for (size_t i = 0; i < bytes / 64; i++)
                sum = _mm512_add_epi32(sum, _mm512_load_si512(buffer + i * 64));
            total += _mm512_reduce_add_epi32(sum);
        }
        times[pass] = now() - start;
        if (total == 42) puts("");  // keeps the sum
    }
    free(buffer);
    return bytes / median(times, passes) / 1e9;
}

int main(int argc, char **argv) {
    int layers = argc > 1 ? atoi(argv[1]) : 128, passes = argc > 2 ? atoi(argv[2]) : 11;
    if (layers < 1 || passes < 1 || passes > 64) {
        fprintf(stderr, "usage: int4_gemv_probe [layers >= 1] [passes 1-64]\n");
        return 2;
    }
    printf("threads %d, read %.1f GB/s\n", omp_get_max_threads(), read_gb_s(passes));

    srand(1);
    Layer *weights = malloc(sizeof(Layer) * layers);
    for (int l = 0; l < layers; l++) {
        Layer *w = &weights[l];
        w->packed = aligned_alloc(64, LAYER_BYTES);
        w->scale = aligned_alloc(64, sizeof(float) * BLOCKS * N);
        w->offset = aligned_alloc(64, sizeof(float) * BLOCKS * N);
        for (size_t i = 0; i < LAYER_BYTES; i++) w->packed[i] = (uint8_t)rand();
        for (int i = 0; i < BLOCKS * N; i++) {
            w->scale[i] = 0.001f * (1 + rand() % 100);
            w->offset[i] = w->scale[i] * (rand() % 16);
        }
    }
    float x[K], *y = aligned_alloc(64, sizeof(float) * N);
    for (int k = 0; k < K; k++) x[k] = rand() / (float)RAND_MAX - 0.5f;
    RoundedRow row;
    round_row(x, &row);
    product(&weights[0], &row, y);
    printf("largest relative error against a scalar reference: %.1e\n", largest_error(&weights[0], &row, y));

    double times[64];
    for (int pass = 0; pass < passes; pass++) {
        double start = now();
        for (int l = 0; l < layers; l++) {
            round_row(x, &row);
            product(&weights[l], &row, y);
        }
        times[pass] = now() - start;
    }
    double seconds = median(times, passes);
    double stored = (double)layers * (LAYER_BYTES + (double)BLOCKS * N * 4.5);  // values, scales, zero points
    printf("int4 one-row product, blocks of %d: %.3f ms a 4096 x 4096 layer, %.1f GB/s stored\n", BLOCK,
           seconds * 1e3 / layers, stored / seconds / 1e9);
    return 0;
}
