// The llama.cpp calls that can throw a C++ exception, wrapped so that none unwinds into Rust
// (Rust cannot catch a foreign exception: the process would abort). Each wrapper catches
// everything and returns a code instead: 0 = done, 1 = out of memory (std::bad_alloc),
// 2 = another exception. The prototypes are those of the pinned llama.h (llama-cpp-sys-2
// 0.1.161), declared here with opaque types so that no llama.cpp header is needed.

#include <cstddef>
#include <cstdint>
#include <new>
#include <stdexcept>
#include <vector>

// Runs `f`, turning any exception into the codes above.
template <class F> static int guarded(F && f) noexcept {
    try {
        f();
        return 0;
    } catch (const std::bad_alloc &) {
        return 1;
    } catch (...) {
        return 2;
    }
}

extern "C" {
struct llama_sampler;
struct llama_context;

struct llama_sampler * llama_sampler_init_penalties(int32_t n_vocab, int32_t penalty_last_n,
                                                    float penalty_repeat, float penalty_freq,
                                                    float penalty_present);
int32_t llama_sampler_sample(struct llama_sampler * smpl, struct llama_context * ctx, int32_t idx);

// As in llama.h (checked against the Rust bindings by a size test in generate.rs).
struct llama_token_data {
    int32_t id;
    float logit;
    float p;
};
struct llama_token_data_array {
    llama_token_data * data;
    size_t size;
    int64_t selected;
    bool sorted;
};
void llama_sampler_apply(struct llama_sampler * smpl, llama_token_data_array * cur_p);
void llama_sampler_accept(struct llama_sampler * smpl, int32_t token);

int amend_sampler_init_penalties(int32_t n_vocab, int32_t penalty_last_n, float penalty_repeat,
                                 float penalty_freq, float penalty_present,
                                 struct llama_sampler ** out) noexcept {
    *out = nullptr;
    const int r = guarded([&] {
        *out = llama_sampler_init_penalties(n_vocab, penalty_last_n, penalty_repeat, penalty_freq,
                                            penalty_present);
    });
    return r == 0 && *out == nullptr ? 1 : r;
}

int amend_sampler_sample(struct llama_sampler * smpl, struct llama_context * ctx, int32_t idx,
                         int32_t * out) noexcept {
    return guarded([&] { *out = llama_sampler_sample(smpl, ctx, idx); });
}

// Samples from a logits row that did not come from a llama.cpp context (the ONNX Runtime
// backend), with the same sampler chain: apply, then accept, as llama_sampler_sample does.
int amend_sampler_sample_logits(struct llama_sampler * smpl, const float * logits, int32_t n_vocab,
                                int32_t * out) noexcept {
    bool selected = true;
    const int r = guarded([&] {
        std::vector<llama_token_data> cur((size_t) n_vocab);
        for (int32_t i = 0; i < n_vocab; i++) {
            cur[(size_t) i] = llama_token_data{ i, logits[i], 0.0f };
        }
        llama_token_data_array arr = { cur.data(), cur.size(), -1, false };
        llama_sampler_apply(smpl, &arr);
        if (arr.selected < 0 || (size_t) arr.selected >= arr.size) {
            selected = false;
            return;
        }
        const int32_t tok = arr.data[arr.selected].id;
        llama_sampler_accept(smpl, tok);
        *out = tok;
    });
    return r == 0 && !selected ? 3 : r;
}

struct llama_vocab;
int32_t llama_tokenize(const struct llama_vocab * vocab, const char * text, int32_t text_len,
                       int32_t * tokens, int32_t n_tokens_max, bool add_special,
                       bool parse_special);
int32_t llama_token_to_piece(const struct llama_vocab * vocab, int32_t token, char * buf,
                             int32_t length, int32_t lstrip, bool special);

// Tokenizing looks tokens up with `unordered_map::at` (the byte fallback): a vocabulary the
// pre-load checks let through but that lacks a token would throw `std::out_of_range` here.
int amend_tokenize(const struct llama_vocab * vocab, const char * text, int32_t text_len,
                   int32_t * tokens, int32_t n_tokens_max, bool add_special, bool parse_special,
                   int32_t * out) noexcept {
    return guarded([&] {
        *out = llama_tokenize(vocab, text, text_len, tokens, n_tokens_max, add_special,
                              parse_special);
    });
}

int amend_token_to_piece(const struct llama_vocab * vocab, int32_t token, char * buf,
                         int32_t length, int32_t lstrip, bool special, int32_t * out) noexcept {
    return guarded([&] { *out = llama_token_to_piece(vocab, token, buf, length, lstrip, special); });
}

// As in llama.h (its size is checked against the Rust bindings by a test in generate.rs).
struct llama_batch {
    int32_t n_tokens;
    int32_t * token;
    float * embd;
    int32_t * pos;
    int32_t * n_seq_id;
    int32_t ** seq_id;
    int8_t * logits;
};
int32_t llama_decode(struct llama_context * ctx, struct llama_batch batch);
int32_t llama_encode(struct llama_context * ctx, struct llama_batch batch);

size_t amend_shim_batch_size(void) noexcept {
    return sizeof(struct llama_batch);
}

// Evaluation allocates (graph reservations, output buffers, the batch splitter) and can throw
// std::bad_alloc or std::runtime_error on its way to the return codes it documents.
int amend_decode(struct llama_context * ctx, const struct llama_batch * batch, bool encode,
                 int32_t * out) noexcept {
    return guarded([&] { *out = encode ? llama_encode(ctx, *batch) : llama_decode(ctx, *batch); });
}

// Proves the catch machinery of this object (tests): throws what `kind` asks for and catches it
// like the wrappers above.
int amend_shim_selftest(int kind) noexcept {
    return guarded([&] {
        if (kind == 1) {
            throw std::bad_alloc();
        }
        if (kind == 2) {
            throw std::runtime_error("selftest");
        }
    });
}
}
