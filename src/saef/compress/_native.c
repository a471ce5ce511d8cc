/* saef.compress._native: one-pass CPU kernels for the scaled-sign and top-k encoders and decoders.
 *
 * Each encoder reads a row of floats once and writes the payload directly: packed signs plus the L1
 * scale, or the k kept values plus their indices packed in b bits each. The numpy path (saef/compress/kernels.py)
 * makes five to eight calls for the same work, which dominates below ~1e5 elements; these kernels make
 * one. Each decoder writes, adds or subtracts the payload's values straight into a caller's buffer.
 * Arguments are raw addresses (Python ints from Tensor.data_ptr()) and sizes; the Python side
 * (saef/compress/kernels.py) checks device, dtype, shapes, sizes and strides before calling, so nothing here is
 * reached with a tensor it cannot read or write. The GIL is released while a kernel runs.
 *
 * Payload formats are those of saef/compress/base.py:
 *   sign:  bit i of byte j of a layer is (x[8 j + i] >= 0); each layer starts on a byte boundary;
 *          one scale per (row, layer) = sum |x| / d, in the dtype of x.
 *   top-k: the k entries of largest |x| (NaN counts as largest, ties go to the larger index;
 *          a long row with fewer than k nonzero entries keeps them all, then its first zeros), their
 *          values in the dtype of x, and their layer-local indices in whichever of two formats is
 *          smaller for the layer's (d, k) (saef/compress/indexcode.py; both sides compute the choice):
 *          explicit -- a little-endian bit stream, b = ceil(log2 d) bits each, entry e at stream bits
 *          [e b, e b + b); or Elias-Fano -- their low L bits as such a stream of L-bit fields, then a bit
 *          vector with bit (i_j >> L) + j set for the j-th index. The entries are in index order (the
 *          values too). Each layer's index section starts on a byte boundary.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

/* ---------------------------------------------------------------------------------------------- */
/* scaled sign                                                                                     */

/* The last d % 8 signs, after the first `whole` bytes, into byte `whole`; returns their sum |x|. */
static double sign_pack_tail_f32(const float *x, int64_t whole, int64_t d, uint8_t *out)
{
    double total = 0.0;
    if (8 * whole < d) {
        uint8_t byte = 0;
        for (int64_t i = 8 * whole; i < d; ++i) {
            byte |= (uint8_t)((x[i] >= 0.0f) << (i - 8 * whole));
            total += fabsf(x[i]);
        }
        out[whole] = byte;
    }
    return total;
}

/* Pack the signs of x[0..d) (bit set where x >= 0) into ceil(d / 8) bytes; return sum |x|. */
static double sign_pack_f32(const float *x, int64_t d, uint8_t *out)
{
    int64_t j = 0, whole = d / 8;
    double total = 0.0;
#if defined(__SSE2__)
    const __m128 zero = _mm_setzero_ps();
    const __m128 absmask = _mm_castsi128_ps(_mm_set1_epi32(0x7fffffff));
    while (j < whole) {
        /* float partial sums over blocks of at most 1024 elements, then added in double: the rounding
           of a short float sum, not of one running over the whole row */
        int64_t stop = j + 128 < whole ? j + 128 : whole;
        __m128 s0 = _mm_setzero_ps(), s1 = _mm_setzero_ps(), s2 = _mm_setzero_ps(), s3 = _mm_setzero_ps();
        for (; j + 2 <= stop; j += 2) { /* two bytes: four independent sums hide the add latency */
            const float *v = x + 8 * j;
            __m128 a = _mm_loadu_ps(v), b = _mm_loadu_ps(v + 4), c = _mm_loadu_ps(v + 8), e = _mm_loadu_ps(v + 12);
            out[j] = (uint8_t)(_mm_movemask_ps(_mm_cmpge_ps(a, zero)) | (_mm_movemask_ps(_mm_cmpge_ps(b, zero)) << 4));
            out[j + 1] = (uint8_t)(_mm_movemask_ps(_mm_cmpge_ps(c, zero)) | (_mm_movemask_ps(_mm_cmpge_ps(e, zero)) << 4));
            s0 = _mm_add_ps(s0, _mm_and_ps(a, absmask));
            s1 = _mm_add_ps(s1, _mm_and_ps(b, absmask));
            s2 = _mm_add_ps(s2, _mm_and_ps(c, absmask));
            s3 = _mm_add_ps(s3, _mm_and_ps(e, absmask));
        }
        if (j < stop) { /* an odd byte at the end of the block */
            __m128 a = _mm_loadu_ps(x + 8 * j), b = _mm_loadu_ps(x + 8 * j + 4);
            out[j] = (uint8_t)(_mm_movemask_ps(_mm_cmpge_ps(a, zero)) | (_mm_movemask_ps(_mm_cmpge_ps(b, zero)) << 4));
            s0 = _mm_add_ps(s0, _mm_and_ps(a, absmask));
            s1 = _mm_add_ps(s1, _mm_and_ps(b, absmask));
            ++j;
        }
        float lanes[4];
        _mm_storeu_ps(lanes, _mm_add_ps(_mm_add_ps(s0, s1), _mm_add_ps(s2, s3)));
        total += ((double)lanes[0] + lanes[1]) + ((double)lanes[2] + lanes[3]);
    }
#else
    while (j < whole) {
        int64_t stop = j + 128 < whole ? j + 128 : whole;
        float s = 0.0f;
        for (; j < stop; ++j) {
            const float *v = x + 8 * j;
            uint8_t byte = 0;
            for (int i = 0; i < 8; ++i) {
                byte |= (uint8_t)((v[i] >= 0.0f) << i);
                s += fabsf(v[i]);
            }
            out[j] = byte;
        }
        total += s;
    }
#endif
    return total + sign_pack_tail_f32(x, whole, d, out);
}

#if defined(__GNUC__) && defined(__x86_64__)
#define HAVE_AVX2_PATH 1
#include <immintrin.h>
/* The same with 8-wide AVX2 compares (one movemask per byte), chosen at import when the CPU has AVX2. */
__attribute__((target("avx2"))) static double sign_pack_f32_avx2(const float *x, int64_t d, uint8_t *out)
{
    int64_t j = 0, whole = d / 8;
    double total = 0.0;
    const __m256 zero = _mm256_setzero_ps();
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    while (j < whole) {
        int64_t stop = j + 128 < whole ? j + 128 : whole;
        __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps(), s2 = _mm256_setzero_ps(), s3 = _mm256_setzero_ps();
        for (; j + 4 <= stop; j += 4) {
            const float *v = x + 8 * j;
            __m256 a = _mm256_loadu_ps(v), b = _mm256_loadu_ps(v + 8), c = _mm256_loadu_ps(v + 16), e = _mm256_loadu_ps(v + 24);
            out[j] = (uint8_t)_mm256_movemask_ps(_mm256_cmp_ps(a, zero, _CMP_GE_OQ));
            out[j + 1] = (uint8_t)_mm256_movemask_ps(_mm256_cmp_ps(b, zero, _CMP_GE_OQ));
            out[j + 2] = (uint8_t)_mm256_movemask_ps(_mm256_cmp_ps(c, zero, _CMP_GE_OQ));
            out[j + 3] = (uint8_t)_mm256_movemask_ps(_mm256_cmp_ps(e, zero, _CMP_GE_OQ));
            s0 = _mm256_add_ps(s0, _mm256_and_ps(a, absmask));
            s1 = _mm256_add_ps(s1, _mm256_and_ps(b, absmask));
            s2 = _mm256_add_ps(s2, _mm256_and_ps(c, absmask));
            s3 = _mm256_add_ps(s3, _mm256_and_ps(e, absmask));
        }
        for (; j < stop; ++j) {
            __m256 a = _mm256_loadu_ps(x + 8 * j);
            out[j] = (uint8_t)_mm256_movemask_ps(_mm256_cmp_ps(a, zero, _CMP_GE_OQ));
            s0 = _mm256_add_ps(s0, _mm256_and_ps(a, absmask));
        }
        float lanes[8];
        _mm256_storeu_ps(lanes, _mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
        total += (((double)lanes[0] + lanes[1]) + ((double)lanes[2] + lanes[3])) +
                 (((double)lanes[4] + lanes[5]) + ((double)lanes[6] + lanes[7]));
    }
    return total + sign_pack_tail_f32(x, whole, d, out);
}
#endif

static double (*sign_pack_f32_best)(const float *, int64_t, uint8_t *) = sign_pack_f32;

static double sign_pack_f64(const double *x, int64_t d, uint8_t *out)
{
    double total = 0.0;
    for (int64_t j = 0; 8 * j < d; ++j) {
        uint8_t byte = 0;
        for (int64_t i = 8 * j; i < d && i < 8 * j + 8; ++i) {
            byte |= (uint8_t)((x[i] >= 0.0) << (i - 8 * j));
            total += fabs(x[i]);
        }
        out[j] = byte;
    }
    return total;
}

/* sign_encode(src, is_double, rows, row_stride, sizes, nlayers, packed, packed_row_bytes, scales)
 * src: rows row_stride elements apart, each holding the layers of sizes (int64[nlayers]) end to end
 * from its start (sum sizes <= row_stride); packed: (rows,
 * packed_row_bytes) uint8 with packed_row_bytes = sum ceil(size / 8); scales: (rows, nlayers). */
static PyObject *sign_encode(PyObject *self, PyObject *args)
{
    unsigned long long src, sizes_p, packed_p, scales_p;
    int is_double;
    Py_ssize_t rows, row_stride, nlayers, row_bytes;
    if (!PyArg_ParseTuple(args, "KpnnKnKnK", &src, &is_double, &rows, &row_stride, &sizes_p, &nlayers,
                          &packed_p, &row_bytes, &scales_p))
        return NULL;
    const int64_t *sizes = (const int64_t *)(uintptr_t)sizes_p;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t r = 0; r < rows; ++r) {
        uint8_t *out = (uint8_t *)(uintptr_t)packed_p + r * row_bytes;
        int64_t offset = 0;
        for (Py_ssize_t l = 0; l < nlayers; ++l) {
            int64_t d = sizes[l];
            if (is_double) {
                const double *x = (const double *)(uintptr_t)src + r * row_stride + offset;
                double total = sign_pack_f64(x, d, out);
                ((double *)(uintptr_t)scales_p)[r * nlayers + l] = d ? total / (double)d : 0.0;
            } else {
                const float *x = (const float *)(uintptr_t)src + r * row_stride + offset;
                float total = (float)sign_pack_f32_best(x, d, out);
                ((float *)(uintptr_t)scales_p)[r * nlayers + l] = d ? total / (float)d : 0.0f;
            }
            out += (d + 7) / 8;
            offset += d;
        }
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* ---------------------------------------------------------------------------------------------- */
/* top-k                                                                                           */

/* |x| as an unsigned integer that orders like |x|: for non-negative IEEE floats the bit pattern is
 * monotone in the value, and NaN patterns lie above infinity. Integer keys give a total order, so the
 * selection below terminates whatever the data (float comparisons with NaN do not). */
static inline uint32_t magnitude_f32(float v)
{
    uint32_t u;
    memcpy(&u, &v, 4);
    return u & 0x7fffffffu;
}

static inline uint64_t magnitude_f64(double v)
{
    uint64_t u;
    memcpy(&u, &v, 8);
    return u & 0x7fffffffffffffffull;
}

/* An entry to rank: (key, index) compared lexicographically. For float32 both fit one uint64. */
typedef struct {
    uint64_t key;
    uint64_t index;
} Pair;

#define PAIR_LESS(a, b) ((a).key < (b).key || ((a).key == (b).key && (a).index < (b).index))
#define U64_LESS(a, b) ((a) < (b))

/* SELECT_TOP(name, T, LESS): rearrange a[0..n) so that its k largest entries (by LESS) are a[n-k..n).
 * Quickselect with a median-of-three pivot; after 2 log2(n) rounds without finishing, heapsort of the
 * rest guarantees O(n log n). All entries are distinct (the index breaks ties). */
#define SIFT_DOWN(T, LESS, a, start, n)                                                                  \
    do {                                                                                               \
        int64_t root_ = (start);                                                                       \
        for (;;) {                                                                                     \
            int64_t child_ = 2 * root_ + 1;                                                            \
            if (child_ >= (n)) break;                                                                  \
            if (child_ + 1 < (n) && LESS((a)[child_], (a)[child_ + 1])) ++child_;                      \
            if (!LESS((a)[root_], (a)[child_])) break;                                                 \
            T t_ = (a)[root_]; (a)[root_] = (a)[child_]; (a)[child_] = t_;                             \
            root_ = child_;                                                                            \
        }                                                                                              \
    } while (0)

#define DEFINE_SELECT_TOP(name, T, LESS)                                                               \
    static void name##_heapsort(T *a, int64_t n)                                                       \
    {                                                                                                  \
        for (int64_t s = n / 2 - 1; s >= 0; --s) SIFT_DOWN(T, LESS, a, s, n);                          \
        for (int64_t end = n - 1; end > 0; --end) {                                                    \
            T t = a[0]; a[0] = a[end]; a[end] = t;                                                     \
            SIFT_DOWN(T, LESS, a, 0, end);                                                             \
        }                                                                                              \
    }                                                                                                  \
    static void name(T *a, int64_t n, int64_t k)                                                       \
    {                                                                                                  \
        int64_t lo = 0, hi = n - 1, target = n - k, budget = 2;                                        \
        for (int64_t m = n; m > 1; m >>= 1) budget += 2;                                               \
        if (k <= 0 || k >= n) return;                                                                  \
        while (hi - lo > 16) {                                                                         \
            if (--budget < 0) { name##_heapsort(a + lo, hi - lo + 1); return; }                        \
            int64_t mid = lo + (hi - lo) / 2;                                                          \
            T t;                                                                                       \
            if (LESS(a[mid], a[lo])) { t = a[mid]; a[mid] = a[lo]; a[lo] = t; }                        \
            if (LESS(a[hi], a[lo])) { t = a[hi]; a[hi] = a[lo]; a[lo] = t; }                           \
            if (LESS(a[hi], a[mid])) { t = a[hi]; a[hi] = a[mid]; a[mid] = t; }                        \
            T pivot = a[mid];                                                                          \
            int64_t i = lo, j = hi;                                                                    \
            for (;;) { /* Hoare: a[lo] <= pivot <= a[hi] bound both scans */                           \
                while (LESS(a[i], pivot)) ++i;                                                         \
                while (LESS(pivot, a[j])) --j;                                                         \
                if (i >= j) break;                                                                     \
                t = a[i]; a[i] = a[j]; a[j] = t;                                                       \
                ++i; --j;                                                                              \
            }                                                                                          \
            /* now a[lo..j] <= pivot <= a[j+1..hi] */                                                  \
            if (target <= j) hi = j; else lo = j + 1;                                                  \
        }                                                                                              \
        for (int64_t i = lo + 1; i <= hi; ++i) { /* insertion sort of the last few */                 \
            T v = a[i]; int64_t j = i - 1;                                                             \
            while (j >= lo && LESS(v, a[j])) { a[j + 1] = a[j]; --j; }                                 \
            a[j + 1] = v;                                                                              \
        }                                                                                              \
    }

DEFINE_SELECT_TOP(select_top_u64, uint64_t, U64_LESS)
DEFINE_SELECT_TOP(select_top_u32, uint32_t, U64_LESS)
DEFINE_SELECT_TOP(select_top_pair, Pair, PAIR_LESS)

#define SAMPLE_EVERY 32
#define CANDIDATE_BLOCK 256

/* Indices of the k largest |x[i]| of one row (1 <= k <= d), written to idx in no particular order.
 * Long rows first take a threshold t from every 32nd key, low enough that some 1.5 k + 256 keys are
 * expected at or above it, and rank only those: whenever at least k keys are >= t, the k largest are all
 * among them. A zero t admits the nonzero keys, and when fewer than k are nonzero the first zeros make
 * up the rest. Otherwise (an unlucky sample, or far more candidates than expected) the whole row is
 * ranked. Returns -1 when out of memory. */
static int top_indices(const void *row, int is_double, int64_t d, int64_t k, int64_t *idx)
{
    int64_t sample_k = (3 * k + 2 * SAMPLE_EVERY - 1) / (2 * SAMPLE_EVERY) + 8;
    int64_t nsample = (d + SAMPLE_EVERY - 1) / SAMPLE_EVERY;
    int sampled = d >= 2048 && sample_k * 4 <= d / SAMPLE_EVERY;
    const float *xf = (const float *)row;
    const double *xd = (const double *)row;
    if (!is_double) {
        uint64_t *items = NULL;
        int64_t n = 0;
        if (sampled) {
            uint32_t *sample = malloc(nsample * sizeof *sample);
            if (!sample) return -1;
            for (int64_t s = 0; s < nsample; ++s) sample[s] = magnitude_f32(xf[s * SAMPLE_EVERY]);
            select_top_u32(sample, nsample, sample_k);
            uint32_t threshold = sample[nsample - sample_k]; /* the sample_k-th largest sampled key */
            free(sample);
            /* Candidates are written without a branch (each entry is stored, and kept by advancing n
               only when it passes), in blocks; a block that might overflow the buffer means far more
               candidates than expected, and the whole row is ranked instead. A zero threshold (a row
               of mostly exact zeros: dead units, a fresh server error) admits the nonzero entries. */
            uint32_t admit = threshold > 0 ? threshold : 1;
            int64_t cap = 8 * (sample_k * SAMPLE_EVERY) + 2 * CANDIDATE_BLOCK; /* > 12 k */
            items = malloc(cap * sizeof *items);
            if (!items) return -1;
            for (int64_t start = 0; start < d; start += CANDIDATE_BLOCK) {
                int64_t stop = start + CANDIDATE_BLOCK < d ? start + CANDIDATE_BLOCK : d;
                if (n + CANDIDATE_BLOCK > cap) { n = -1; break; }
                for (int64_t i = start; i < stop; ++i) {
                    uint32_t key = magnitude_f32(xf[i]);
                    items[n] = ((uint64_t)key << 32) | (uint64_t)i;
                    n += key >= admit;
                }
            }
            if (n >= 0 && n < k && threshold == 0) {
                /* fewer than k nonzero entries: all of them are kept, and the first zeros make up k */
                for (int64_t i = 0; i < d && n < k; ++i)
                    if (magnitude_f32(xf[i]) == 0) items[n++] = (uint64_t)i;
            }
            if (n < k) { free(items); items = NULL; n = 0; }
        }
        if (!items) {
            items = malloc(d * sizeof *items);
            if (!items) return -1;
            for (int64_t i = 0; i < d; ++i) items[i] = ((uint64_t)magnitude_f32(xf[i]) << 32) | (uint64_t)i;
            n = d;
        }
        select_top_u64(items, n, k);
        for (int64_t e = 0; e < k; ++e) idx[e] = (int64_t)(items[n - k + e] & 0xffffffffu);
        free(items);
        return 0;
    }
    Pair *items = malloc(d * sizeof *items);
    if (!items) return -1;
    for (int64_t i = 0; i < d; ++i) { items[i].key = magnitude_f64(xd[i]); items[i].index = (uint64_t)i; }
    select_top_pair(items, d, k);
    for (int64_t e = 0; e < k; ++e) idx[e] = (int64_t)items[d - k + e].index;
    free(items);
    return 0;
}

static int index_width(int64_t d)
{
    int b = 0;
    for (uint64_t m = d > 1 ? (uint64_t)(d - 1) : 0; m; m >>= 1) ++b;
    return b;
}

/* idx[0..k) (each < 2^b) as a little-endian stream of b-bit fields: ceil(k b / 8) bytes. */
static void pack_index_stream(const int64_t *idx, int64_t k, int b, uint8_t *out)
{
    uint64_t acc = 0;
    int filled = 0;
    for (int64_t e = 0; e < k; ++e) {
        acc |= (uint64_t)idx[e] << filled;
        filled += b;
        while (filled >= 8) { *out++ = (uint8_t)acc; acc >>= 8; filled -= 8; }
    }
    if (filled > 0) *out = (uint8_t)acc;
}

static void unpack_index_stream(const uint8_t *in, int64_t k, int b, int64_t *idx)
{
    uint64_t acc = 0, mask = b ? (~0ull >> (64 - b)) : 0;
    int filled = 0;
    for (int64_t e = 0; e < k; ++e) {
        while (filled < b) { acc |= (uint64_t)(*in++) << filled; filled += 8; }
        idx[e] = (int64_t)(acc & mask);
        acc = b ? acc >> b : acc;
        filled -= b;
    }
}

/* The index section of a layer of d elements with k kept: Elias-Fano ("coded") when that is shorter than
 * the explicit k b bits, else explicit. The same rule as saef/compress/indexcode.py's section_bits. */
typedef struct {
    int coded;      /* 1: Elias-Fano; 0: explicit */
    int width;      /* bits per field of the packed stream: L (coded) or b (explicit) */
    int64_t high;   /* bits of the high bit vector (coded), else 0 */
    int64_t bytes;  /* bytes of the whole section */
} Section;

static Section index_section(int64_t d, int64_t k)
{
    Section s;
    int b = index_width(d), low = 0;
    if (k > 0 && d > k)
        for (int64_t q = d / k; q > 1; q >>= 1) ++low;
    int64_t high = d > 0 ? k + ((d - 1) >> low) + 1 : k;
    int64_t coded = k * low + high, explicit = k * b;
    s.coded = coded < explicit;
    s.width = s.coded ? low : b;
    s.high = s.coded ? high : 0;
    s.bytes = ((s.coded ? coded : explicit) + 7) / 8;
    return s;
}

/* Sort k distinct indices in [0, d) through a bit set: d / 64 word reads plus k writes. `marks` is a
 * zeroed scratch bit set of at least d bits, left zeroed. */
static void sort_distinct(int64_t *idx, int64_t k, int64_t d, uint64_t *marks)
{
    for (int64_t e = 0; e < k; ++e) marks[idx[e] >> 6] |= 1ull << (idx[e] & 63);
    int64_t n = 0;
    for (int64_t w = 0; n < k && w < (d + 63) / 64; ++w) {
        uint64_t word = marks[w];
        marks[w] = 0;
        while (word) {
            idx[n++] = (w << 6) + __builtin_ctzll(word);
            word &= word - 1;
        }
    }
}

/* Elias-Fano of one layer's sorted indices idx[0..k): the section written to out (s.bytes bytes). */
static void coded_pack(const int64_t *idx, int64_t k, Section s, uint8_t *out)
{
    memset(out, 0, s.bytes);
    uint64_t acc = 0, mask = s.width ? (~0ull >> (64 - s.width)) : 0;
    int filled = 0;
    uint8_t *at = out;
    for (int64_t e = 0; e < k; ++e) { /* the low fields */
        acc |= ((uint64_t)idx[e] & mask) << filled;
        filled += s.width;
        while (filled >= 8) { *at++ = (uint8_t)acc; acc >>= 8; filled -= 8; }
    }
    if (filled > 0) *at = (uint8_t)acc;
    int64_t base = k * (int64_t)s.width;
    for (int64_t e = 0; e < k; ++e) { /* the high bit vector */
        int64_t bit = base + (idx[e] >> s.width) + e;
        out[bit >> 3] |= (uint8_t)(1u << (bit & 7));
    }
}

/* Inverse of coded_pack into idx[0..k), sorted. Returns 1 (a corrupt section) unless the high bit vector
 * holds exactly k set bits and the indices it gives are strictly increasing and below d. */
static int coded_unpack(const uint8_t *in, int64_t k, int64_t d, Section s, int64_t *idx)
{
    unpack_index_stream(in, k, s.width, idx);
    int64_t base = k * (int64_t)s.width, end = base + s.high, n = 0, previous = -1;
    int bad = 0;
    for (int64_t byte = base >> 3; byte < (end + 7) >> 3; ++byte) {
        unsigned bits = in[byte];
        if (byte == base >> 3) bits &= 0xffu << (base & 7);
        if (byte == (end - 1) >> 3 && (end & 7)) bits &= 0xffu >> (8 - (end & 7));
        while (bits) {
            int64_t position = (byte << 3) + __builtin_ctz(bits) - base;
            bits &= bits - 1;
            if (n >= k) return 1;
            int64_t i = ((position - n) << s.width) | idx[n];
            bad |= i <= previous || i >= d;
            previous = idx[n++] = i;
        }
    }
    return bad || n != k;
}

/* The layer's indices from its section, in the layer's format; 1 if they are corrupt (coded) or any lies
 * beyond the layer (explicit). */
static int read_indices(const uint8_t *in, int64_t k, int64_t d, Section s, int64_t *idx)
{
    if (s.coded) return coded_unpack(in, k, d, s, idx);
    unpack_index_stream(in, k, s.width, idx);
    int bad = 0;
    for (int64_t e = 0; e < k; ++e) bad |= idx[e] >= d;
    return bad;
}

/* topk_encode(src, is_double, rows, row_stride, sizes, ks, nlayers, values, total_k, packed, row_bytes,
 *             local)
 * src and sizes as for sign_encode; ks: int64[nlayers], each in [0, size]; values: (rows, total_k) in the dtype of src, total_k = sum ks; packed:
 * (rows, row_bytes) uint8, row_bytes = the sum of the layers' index_section bytes; local: (rows, total_k)
 * int64 receives the layer-local indices too (0 to skip), in the order of the values. Raises MemoryError
 * if a work buffer cannot be allocated. */
static PyObject *topk_encode(PyObject *self, PyObject *args)
{
    unsigned long long src, sizes_p, ks_p, values_p, packed_p, local_p;
    int is_double, failed = 0;
    Py_ssize_t rows, row_stride, nlayers, total_k, row_bytes;
    if (!PyArg_ParseTuple(args, "KpnnKKnKnKnK", &src, &is_double, &rows, &row_stride, &sizes_p, &ks_p,
                          &nlayers, &values_p, &total_k, &packed_p, &row_bytes, &local_p))
        return NULL;
    const int64_t *sizes = (const int64_t *)(uintptr_t)sizes_p, *ks = (const int64_t *)(uintptr_t)ks_p;
    size_t width = is_double ? 8 : 4;
    Py_BEGIN_ALLOW_THREADS
    int64_t *scratch = local_p ? NULL : malloc((total_k > 0 ? total_k : 1) * sizeof(int64_t));
    int64_t longest = 0;
    for (Py_ssize_t l = 0; l < nlayers; ++l) longest = sizes[l] > longest ? sizes[l] : longest;
    uint64_t *marks = calloc((longest + 63) / 64 + 1, sizeof *marks);
    if ((!local_p && !scratch) || !marks) failed = 1;
    for (Py_ssize_t r = 0; r < rows && !failed; ++r) {
        const char *x = (const char *)(uintptr_t)src + r * row_stride * width;
        char *values = (char *)(uintptr_t)values_p + r * total_k * width;
        uint8_t *packed = (uint8_t *)(uintptr_t)packed_p + r * row_bytes;
        int64_t *local = local_p ? (int64_t *)(uintptr_t)local_p + r * total_k : scratch;
        for (Py_ssize_t l = 0; l < nlayers && !failed; ++l) {
            int64_t d = sizes[l], k = ks[l];
            Section s = index_section(d, k);
            if (k > 0) {
                if (top_indices(x, is_double, d, k, local) != 0) { failed = 1; break; }
                sort_distinct(local, k, d, marks); /* every path writes the kept entries in index order */
                if (s.coded)
                    coded_pack(local, k, s, packed);
                else
                    pack_index_stream(local, k, s.width, packed);
                if (is_double)
                    for (int64_t e = 0; e < k; ++e) ((double *)values)[e] = ((const double *)x)[local[e]];
                else
                    for (int64_t e = 0; e < k; ++e) ((float *)values)[e] = ((const float *)x)[local[e]];
            } else if (s.bytes) {
                memset(packed, 0, s.bytes);
            }
            x += d * width;
            values += k * width;
            packed += s.bytes;
            if (local_p) local += k;
        }
    }
    free(scratch);
    free(marks);
    Py_END_ALLOW_THREADS
    if (failed) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* Every row's layer-local indices from its packed index sections into local (rows, total_k); with
 * offset, each layer's offset on the row is added. Returns 1 if any section is corrupt (read_indices). */
static int read_all_indices(const uint8_t *packed_rows, Py_ssize_t rows, Py_ssize_t row_bytes, const int64_t *sizes,
                            const int64_t *ks, Py_ssize_t nlayers, int64_t *local_rows, Py_ssize_t total_k, int offset)
{
    int bad = 0;
    for (Py_ssize_t r = 0; r < rows && !bad; ++r) {
        const uint8_t *packed = packed_rows + r * row_bytes;
        int64_t *local = local_rows + r * total_k, start = 0;
        for (Py_ssize_t l = 0; l < nlayers && !bad; ++l) {
            int64_t d = sizes[l], k = ks[l];
            Section s = index_section(d, k);
            bad |= read_indices(packed, k, d, s, local);
            if (offset)
                for (int64_t e = 0; e < k; ++e) local[e] += start;
            packed += s.bytes;
            local += k;
            start += d;
        }
    }
    return bad;
}

/* topk_indices(packed, rows, row_bytes, sizes, ks, nlayers, local, total_k): the inverse of the index
 * packing of topk_encode, into local (rows, total_k) int64 layer-local indices. Raises ValueError on a
 * corrupt section. */
static PyObject *topk_indices(PyObject *self, PyObject *args)
{
    unsigned long long packed_p, sizes_p, ks_p, local_p;
    Py_ssize_t rows, row_bytes, nlayers, total_k;
    int bad;
    if (!PyArg_ParseTuple(args, "KnnKKnKn", &packed_p, &rows, &row_bytes, &sizes_p, &ks_p, &nlayers,
                          &local_p, &total_k))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    bad = read_all_indices((const uint8_t *)(uintptr_t)packed_p, rows, row_bytes, (const int64_t *)(uintptr_t)sizes_p,
                           (const int64_t *)(uintptr_t)ks_p, nlayers, (int64_t *)(uintptr_t)local_p, total_k, 0);
    Py_END_ALLOW_THREADS
    if (bad) {
        PyErr_SetString(PyExc_ValueError, "top-k payload holds a corrupt index section or an index beyond its layer size");
        return NULL;
    }
    Py_RETURN_NONE;
}

/* ---------------------------------------------------------------------------------------------- */
/* decoding                                                                                        */

enum { WRITE = 0, ADD = 1, SUBTRACT = -1 };

/* out[i] = v, out[i] += v or out[i] -= v. The same float operations as the dense torch ops they stand
 * for (a copy, an add of the decoded value, a subtraction), so the results are identical to them. */
#define APPLY(out, i, v, mode)                                                                         \
    do {                                                                                               \
        if ((mode) == WRITE) (out)[i] = (v);                                                           \
        else if ((mode) == ADD) (out)[i] += (v);                                                       \
        else (out)[i] -= (v);                                                                          \
    } while (0)

#define DEFINE_SIGN_DECODE(name, T)                                                                    \
    static void name(const uint8_t *packed, T scale, int64_t d, T *out, int mode)                      \
    {                                                                                                  \
        T table[2] = {-scale, scale};                                                                  \
        if (mode == WRITE)                                                                             \
            for (int64_t i = 0; i < d; ++i) out[i] = table[(packed[i >> 3] >> (i & 7)) & 1];           \
        else if (mode == ADD)                                                                          \
            for (int64_t i = 0; i < d; ++i) out[i] += table[(packed[i >> 3] >> (i & 7)) & 1];          \
        else                                                                                           \
            for (int64_t i = 0; i < d; ++i) out[i] -= table[(packed[i >> 3] >> (i & 7)) & 1];         \
    }

DEFINE_SIGN_DECODE(sign_decode_f32, float)
DEFINE_SIGN_DECODE(sign_decode_f64, double)

static void (*sign_decode_f32_best)(const uint8_t *, float, int64_t, float *, int) = sign_decode_f32;

#ifdef HAVE_AVX2_PATH
/* Eight values per byte at once: the byte broadcast, each lane testing its own bit, a blend between
 * -scale and +scale. The tail (d not a multiple of 8) goes through the scalar loop. */
__attribute__((target("avx2"))) static void sign_decode_f32_avx2(const uint8_t *packed, float scale, int64_t d,
                                                                 float *out, int mode)
{
    const __m256i bits = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    const __m256 pos = _mm256_set1_ps(scale), neg = _mm256_set1_ps(-scale);
    int64_t whole = d / 8;
    for (int64_t j = 0; j < whole; ++j) {
        __m256i lane = _mm256_and_si256(_mm256_set1_epi32(packed[j]), bits);
        __m256 v = _mm256_blendv_ps(neg, pos, _mm256_castsi256_ps(_mm256_cmpeq_epi32(lane, bits)));
        float *o = out + 8 * j;
        if (mode == WRITE) _mm256_storeu_ps(o, v);
        else if (mode == ADD) _mm256_storeu_ps(o, _mm256_add_ps(_mm256_loadu_ps(o), v));
        else _mm256_storeu_ps(o, _mm256_sub_ps(_mm256_loadu_ps(o), v));
    }
    if (8 * whole < d) sign_decode_f32(packed + whole, scale, d - 8 * whole, out + 8 * whole, mode);
}
#endif

/* sign_decode(packed, rows, row_bytes, scales, sizes, nlayers, out, out_stride, is_double, mode, divisor)
 * packed: (rows, row_bytes) as sign_encode writes it; scales: (rows, nlayers); out: rows out_stride
 * elements apart (0: every row onto the same one), each receiving the layers end to end. mode: 0 writes
 * +-scale, 1 adds +-(scale / divisor), -1 subtracts +-scale. */
static PyObject *sign_decode(PyObject *self, PyObject *args)
{
    unsigned long long packed_p, scales_p, sizes_p, out_p;
    Py_ssize_t rows, row_bytes, nlayers, out_stride, divisor;
    int is_double, mode;
    if (!PyArg_ParseTuple(args, "KnnKKnKnpin", &packed_p, &rows, &row_bytes, &scales_p, &sizes_p, &nlayers,
                          &out_p, &out_stride, &is_double, &mode, &divisor))
        return NULL;
    const int64_t *sizes = (const int64_t *)(uintptr_t)sizes_p;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t r = 0; r < rows; ++r) {
        const uint8_t *packed = (const uint8_t *)(uintptr_t)packed_p + r * row_bytes;
        int64_t offset = 0;
        for (Py_ssize_t l = 0; l < nlayers; ++l) {
            int64_t d = sizes[l];
            if (is_double) {
                double scale = ((const double *)(uintptr_t)scales_p)[r * nlayers + l];
                if (mode == ADD) scale /= (double)divisor;
                sign_decode_f64(packed, scale, d, (double *)(uintptr_t)out_p + r * out_stride + offset, mode);
            } else {
                float scale = ((const float *)(uintptr_t)scales_p)[r * nlayers + l];
                if (mode == ADD) scale /= (float)divisor;
                sign_decode_f32_best(packed, scale, d, (float *)(uintptr_t)out_p + r * out_stride + offset, mode);
            }
            packed += (d + 7) / 8;
            offset += d;
        }
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* topk_decode(values, packed, rows, total_k, row_bytes, sizes, ks, nlayers, out, out_stride, is_double,
 *             mode, divisor)
 * values: (rows, total_k); packed: (rows, row_bytes), as topk_encode writes them; out as for
 * sign_decode. mode: 0 zeroes each out row and writes the kept values, 1 adds value / divisor, -1
 * subtracts the value. The kept indices of a layer are distinct, so the order of the writes does not
 * matter; with out_stride 0 the rows are added in row order. All indices are unpacked and checked
 * against their layer size before anything is written: a corrupt payload raises ValueError and leaves
 * out untouched. */
static PyObject *topk_decode(PyObject *self, PyObject *args)
{
    unsigned long long values_p, packed_p, sizes_p, ks_p, out_p;
    Py_ssize_t rows, total_k, row_bytes, nlayers, out_stride, divisor;
    int is_double, mode, bad = 0;
    if (!PyArg_ParseTuple(args, "KKnnnKKnKnpin", &values_p, &packed_p, &rows, &total_k, &row_bytes, &sizes_p,
                          &ks_p, &nlayers, &out_p, &out_stride, &is_double, &mode, &divisor))
        return NULL;
    const int64_t *sizes = (const int64_t *)(uintptr_t)sizes_p, *ks = (const int64_t *)(uintptr_t)ks_p;
    int64_t row_length = 0;
    for (Py_ssize_t l = 0; l < nlayers; ++l) row_length += sizes[l];
    /* flat indices (layer offset added) of every row */
    int64_t *index = malloc((rows * total_k > 0 ? rows * total_k : 1) * sizeof *index);
    if (!index) return PyErr_NoMemory();
    size_t width = is_double ? 8 : 4;
    Py_BEGIN_ALLOW_THREADS
    bad = read_all_indices((const uint8_t *)(uintptr_t)packed_p, rows, row_bytes, sizes, ks, nlayers, index, total_k, 1);
    for (Py_ssize_t r = 0; r < rows && !bad; ++r) {
        const int64_t *at = index + r * total_k;
        const char *values = (const char *)(uintptr_t)values_p + r * total_k * width;
        char *out_row = (char *)(uintptr_t)out_p + r * out_stride * width;
        if (mode == WRITE) memset(out_row, 0, row_length * width);
        if (is_double) {
            double *out = (double *)out_row;
            const double *v = (const double *)values;
            for (int64_t e = 0; e < total_k; ++e) APPLY(out, at[e], mode == ADD ? v[e] / (double)divisor : v[e], mode);
        } else {
            float *out = (float *)out_row;
            const float *v = (const float *)values;
            for (int64_t e = 0; e < total_k; ++e) APPLY(out, at[e], mode == ADD ? v[e] / (float)divisor : v[e], mode);
        }
    }
    Py_END_ALLOW_THREADS
    free(index);
    if (bad) {
        PyErr_SetString(PyExc_ValueError, "top-k payload holds a corrupt index section or an index beyond its layer size");
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"sign_encode", sign_encode, METH_VARARGS, "Packed signs and L1 scales of every layer of every row."},
    {"topk_encode", topk_encode, METH_VARARGS, "Kept values and packed indices of every layer of every row."},
    {"topk_indices", topk_indices, METH_VARARGS, "Layer-local indices from packed top-k index streams."},
    {"sign_decode", sign_decode, METH_VARARGS, "Write, add or subtract the values of sign payloads."},
    {"topk_decode", topk_decode, METH_VARARGS, "Write, add or subtract the values of top-k payloads."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "saef.compress._native",
                                    "One-pass CPU kernels for the sign and top-k encoders.", -1, methods,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__native(void)
{
#ifdef HAVE_AVX2_PATH
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2")) {
        sign_pack_f32_best = sign_pack_f32_avx2;
        sign_decode_f32_best = sign_decode_f32_avx2;
    }
#endif
    return PyModule_Create(&module);
}
