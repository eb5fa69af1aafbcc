/* The llama.cpp scheduler's steps in C, so that its thread holds no GIL from one llama_decode to the next.
 *
 * Loaded with ctypes (which lets go of the GIL around each call), not imported: there is no Python C API
 * here. llama.cpp's functions arrive as addresses from llama-cpp-python's bindings, so this builds without
 * llama.cpp's headers; `llama_batch` below mirrors llama.h of the pinned llama-cpp-python release.
 *
 * What a sequence needs at each step lives in per-slot columns (numpy arrays shared with Python). Every
 * sampled token goes into a ring of (tag, token, finish) entries that the event loop drains, woken through an
 * eventfd: the loop turns tokens into text, the engine's thread only decodes and samples.
 */
#include <math.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

typedef struct {
    int32_t n_tokens;
    int32_t *token;
    float *embd;
    int32_t *pos;
    int32_t *n_seq_id;
    int32_t **seq_id;
    int8_t *logits;
} llama_batch;

typedef int32_t (*decode_fn)(void *ctx, llama_batch batch);
typedef float *(*logits_fn)(void *ctx);
typedef int32_t (*sample_fn)(void *chain, void *ctx, int32_t index);

/* llama_token_data and llama_token_data_array, as in llama.h. */
typedef struct {
    int32_t id;
    float logit;
    float p;
} token_data;

typedef struct {
    token_data *data;
    size_t size;
    int64_t selected;
    bool sorted;
} token_data_array;

typedef void (*apply_fn)(void *sampler, token_data_array *candidates);
typedef void (*accept_fn)(void *sampler, int32_t token);

/* Per-slot int32 columns. WATCH: once LEFT is at most this, Python looks at the sequence before its next step
 * (a constrained JSON answer's token budget, engines/json_budget.py); -1 for none. */
enum { TAG, POS, COUNT, LEFT, FLAGS, FINISHED, BIAS_COUNT, WATCH, COLUMNS };
/* Per-slot pointer columns. */
enum { CHAIN, BIAS_IDS, BIAS_VALUES, HISTORY, GRAMMAR, POINTERS };
/* FLAGS bits. */
enum { DECODING = 1, STOP_AT_EOG = 2, EMIT = 4 };
/* FINISHED and a ring entry's finish. */
enum { NOT_FINISHED = 0, FINISHED_EOG = 1, FINISHED_LENGTH = 2 };
/* What gw_run returns besides a failed decode's status (which is never one of these). */
enum { RUN_INTERRUPTED = -1001, RUN_FINISHED = -1002, RUN_RING_FULL = -1003, RUN_TIMED_OUT = -1004 };

typedef struct {
    decode_fn decode;
    logits_fn get_logits;
    sample_fn sample;
    void *ctx;
    llama_batch *batch;
    int32_t n_vocab;
    int32_t n_slots;
    const uint8_t *eog;     /* n_vocab flags: end-of-generation tokens */
    int32_t *slots;         /* n_slots x COLUMNS */
    void **pointers;        /* n_slots x POINTERS */
    int32_t *ring;          /* ring_size x 3: tag, token, finish */
    int64_t ring_size;
    int64_t *counters;      /* written (by this thread), read (by the event loop), interrupt (by the loop) */
    int32_t notify_fd;
    double max_run_s;       /* gw_run returns after this long, so the scheduler can tell a step from a hang */
    apply_fn apply;         /* llama_sampler_apply */
    accept_fn accept;       /* llama_sampler_accept */
    token_data *candidates; /* n_vocab entries: a constrained slot's candidates, refilled for each token */
} gw_state;

enum { WRITTEN, READ, INTERRUPT };

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

/* The first index of the largest value: what numpy's argmax returns, ties to the lower token id. Two
 * vectorised passes (the max, then the block holding it): faster than a one-pass scalar loop
 * (docs/design/c-steps.md). */
#if defined(__x86_64__)
__attribute__((target_clones("avx2", "default")))
#endif
static int32_t argmax(const float *row, int32_t n) {
    float best = row[0];
#pragma omp simd reduction(max : best)
    for (int32_t i = 0; i < n; i++)
        best = row[i] > best ? row[i] : best;
    for (int32_t start = 0; start < n; start += 64) {
        int32_t end = start + 64 < n ? start + 64 : n, found = 0;
#pragma omp simd reduction(| : found)
        for (int32_t i = start; i < end; i++)
            found |= row[i] == best;
        if (found)
            for (int32_t i = start; i < end; i++)
                if (row[i] == best)
                    return i;
    }
    return 0; /* all NaN */
}

/* Greedy with logit biases: the biases go onto llama.cpp's logits row, and come off again after the argmax,
 * so logprobs read later see the model's own logits. */
static int32_t greedy(float *row, int32_t n_vocab, const int32_t *ids, const float *values, int32_t count) {
    float saved[count > 0 ? count : 1];
    for (int32_t i = 0; i < count; i++) {
        saved[i] = row[ids[i]];
        row[ids[i]] += values[i];
    }
    int32_t token = argmax(row, n_vocab);
    for (int32_t i = count - 1; i >= 0; i--)
        row[ids[i]] = saved[i];
    return token;
}

static void notify(const gw_state *s) {
    uint64_t one = 1;
    ssize_t ignored = write(s->notify_fd, &one, sizeof one); /* a full eventfd already wakes the loop */
    (void)ignored;
}

static int64_t ring_room(const gw_state *s) {
    int64_t read = __atomic_load_n(&s->counters[READ], __ATOMIC_ACQUIRE);
    return s->ring_size - (s->counters[WRITTEN] - read);
}

/* Callers make sure of the room (ring_room). */
static void push(gw_state *s, int32_t tag, int32_t token, int32_t finish) {
    int64_t written = s->counters[WRITTEN];
    int32_t *entry = &s->ring[3 * (written % s->ring_size)];
    entry[0] = tag;
    entry[1] = token;
    entry[2] = finish;
    __atomic_store_n(&s->counters[WRITTEN], written + 1, __ATOMIC_RELEASE);
}

static token_data_array all_candidates(gw_state *s, const float *row) {
    for (int32_t id = 0; id < s->n_vocab; id++)
        s->candidates[id] = (token_data){id, row[id], 0.0f};
    return (token_data_array){s->candidates, (size_t)s->n_vocab, -1, false};
}

/* Draws after a refused one before the grammar pass over the whole vocabulary (docs/design/c-steps.md). */
enum { MAX_REDRAWS = 8 };

static bool refused(gw_state *s, void **pointer, int32_t token) {
    token_data one = {token, 1.0f, 0.0f};
    token_data_array single = {&one, 1, -1, false};
    s->apply(pointer[GRAMMAR], &single);
    return isinf(one.logit) && one.logit < 0;
}

/* The chain's draw from every logit but those of `excluded` tokens. */
static int32_t draw(gw_state *s, void **pointer, const float *row, const int32_t *excluded, int32_t n_excluded) {
    token_data_array candidates = all_candidates(s, row);
    for (int32_t k = 0; k < n_excluded; k++)
        candidates.data[excluded[k]].logit = -INFINITY;
    s->apply(pointer[CHAIN], &candidates);
    return candidates.data[candidates.selected].id;
}

/* A grammar-constrained slot's token. The chain draws from every logit and the grammar checks that one token, as
 * llama-server does; a refused token is excluded and the chain draws again, up to MAX_REDRAWS times (each a
 * tenth of a millisecond), and only then is the grammar applied to the whole vocabulary (milliseconds) and the
 * chain run on what it allows. Drawing again without the refused tokens samples from the allowed ones in the
 * proportions the chain gives them. */
static int32_t sample_constrained(gw_state *s, void **pointer, const float *row) {
    int32_t excluded[MAX_REDRAWS];
    int32_t token = draw(s, pointer, row, excluded, 0), n_excluded = 0;
    bool allowed = !refused(s, pointer, token);
    while (!allowed && n_excluded < MAX_REDRAWS) {
        excluded[n_excluded++] = token;
        token = draw(s, pointer, row, excluded, n_excluded);
        allowed = !refused(s, pointer, token);
    }
    if (!allowed) {
        token_data_array candidates = all_candidates(s, row);
        s->apply(pointer[GRAMMAR], &candidates);
        s->apply(pointer[CHAIN], &candidates);
        token = candidates.data[candidates.selected].id;
    }
    s->accept(pointer[GRAMMAR], token);
    s->accept(pointer[CHAIN], token);
    return token;
}

/* After a decode: samples every output of the batch, records it in its slot and, for slots that EMIT, in the
 * ring. Returns how many sequences need Python: those that finished, and those at their WATCH. */
int32_t gw_sample_outputs(gw_state *s) {
    llama_batch *batch = s->batch;
    float *logits = s->get_logits(s->ctx);
    int32_t row = 0, attention = 0, emitted = 0;
    for (int32_t i = 0; i < batch->n_tokens; i++) {
        if (!batch->logits[i])
            continue;
        int32_t slot = batch->seq_id[i][0];
        int32_t *column = &s->slots[slot * COLUMNS];
        void **pointer = &s->pointers[slot * POINTERS];
        float *logits_row = logits + (int64_t)row * s->n_vocab;
        int32_t token = pointer[GRAMMAR] ? sample_constrained(s, pointer, logits_row)
                        : pointer[CHAIN] ? s->sample(pointer[CHAIN], s->ctx, i)
                                         : greedy(logits_row, s->n_vocab, pointer[BIAS_IDS], pointer[BIAS_VALUES],
                                                  column[BIAS_COUNT]);
        row++;
        ((int32_t *)pointer[HISTORY])[column[COUNT]++] = token;
        column[LEFT]--;
        if ((column[FLAGS] & STOP_AT_EOG) && s->eog[token])
            column[FINISHED] = FINISHED_EOG;
        else if (column[LEFT] <= 0)
            column[FINISHED] = FINISHED_LENGTH;
        attention += column[FINISHED] != NOT_FINISHED || column[LEFT] <= column[WATCH];
        if (column[FLAGS] & EMIT) {
            push(s, column[TAG], token, column[FINISHED]);
            emitted++;
        }
    }
    if (emitted)
        notify(s);
    return attention;
}

/* The column counts this library was built with (int32 and pointer columns, as COLUMNS * 100 + POINTERS):
 * steps.py refuses a library older than its columns. */
int32_t gw_columns(void) { return COLUMNS * 100 + POINTERS; }

/* Python pushes an entry itself where it adds something to the token first (logprobs). */
void gw_emit(gw_state *s, int32_t tag, int32_t token, int32_t finish) {
    push(s, tag, token, finish);
    notify(s);
}

int64_t gw_ring_room(gw_state *s) { return ring_room(s); }

/* The event loop's side: copies up to `max` entries out of the ring, oldest first. */
int64_t gw_take(gw_state *s, int32_t *out, int64_t max) {
    int64_t read = s->counters[READ];
    int64_t available = __atomic_load_n(&s->counters[WRITTEN], __ATOMIC_ACQUIRE) - read;
    int64_t count = available < max ? available : max;
    for (int64_t k = 0; k < count; k++)
        memcpy(&out[3 * k], &s->ring[3 * ((read + k) % s->ring_size)], 3 * sizeof(int32_t));
    __atomic_store_n(&s->counters[READ], read + count, __ATOMIC_RELEASE);
    return count;
}

/* Steps while every running sequence decodes one token a step: each DECODING slot's last token goes into
 * the batch (in slot order, so llama.cpp keeps them in one micro-batch), then the outputs are sampled.
 * Returns after a step where a sequence finished or reached its WATCH (RUN_FINISHED: Python looks at it before
 * it samples again), after a step during which the event loop set INTERRUPT (a request came in, or one was
 * cancelled), after max_run_s, or, before a step, when the ring is short of room; or a failed decode's status. */
int32_t gw_run(gw_state *s) {
    llama_batch *batch = s->batch;
    double started = now_s();
    for (;;) {
        if (ring_room(s) < s->n_slots)
            return RUN_RING_FULL;
        int32_t n = 0;
        for (int32_t slot = 0; slot < s->n_slots; slot++) {
            int32_t *column = &s->slots[slot * COLUMNS];
            if (!(column[FLAGS] & DECODING))
                continue;
            batch->token[n] = ((int32_t *)s->pointers[slot * POINTERS + HISTORY])[column[COUNT] - 1];
            batch->pos[n] = column[POS];
            batch->seq_id[n][0] = slot;
            batch->logits[n] = 1;
            n++;
        }
        batch->n_tokens = n;
        int32_t status = s->decode(s->ctx, *batch);
        if (status != 0)
            return status;
        for (int32_t k = 0; k < n; k++)
            s->slots[batch->seq_id[k][0] * COLUMNS + POS]++;
        if (gw_sample_outputs(s))
            return RUN_FINISHED;
        /* Checked after a step, not before: jobs posted back to back (embeddings, one input each) would
         * otherwise keep every stream from stepping. */
        if (__atomic_load_n(&s->counters[INTERRUPT], __ATOMIC_ACQUIRE))
            return RUN_INTERRUPTED;
        if (now_s() - started > s->max_run_s)
            return RUN_TIMED_OUT;
    }
}
