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
    try {
        *out = llama_sampler_init_penalties(n_vocab, penalty_last_n, penalty_repeat, penalty_freq,
                                            penalty_present);
        return *out != nullptr ? 0 : 1;
    } catch (const std::bad_alloc &) {
        return 1;
    } catch (...) {
        return 2;
    }
}

int amend_sampler_sample(struct llama_sampler * smpl, struct llama_context * ctx, int32_t idx,
                         int32_t * out) noexcept {
    try {
        *out = llama_sampler_sample(smpl, ctx, idx);
        return 0;
    } catch (const std::bad_alloc &) {
        return 1;
    } catch (...) {
        return 2;
    }
}

// Samples from a logits row that did not come from a llama.cpp context (the ONNX Runtime
// backend), with the same sampler chain: apply, then accept, as llama_sampler_sample does.
int amend_sampler_sample_logits(struct llama_sampler * smpl, const float * logits, int32_t n_vocab,
                                int32_t * out) noexcept {
    try {
        std::vector<llama_token_data> cur((size_t) n_vocab);
        for (int32_t i = 0; i < n_vocab; i++) {
            cur[(size_t) i] = llama_token_data{ i, logits[i], 0.0f };
        }
        llama_token_data_array arr = { cur.data(), cur.size(), -1, false };
        llama_sampler_apply(smpl, &arr);
        if (arr.selected < 0 || (size_t) arr.selected >= arr.size) {
            return 3;
        }
        const int32_t tok = arr.data[arr.selected].id;
        llama_sampler_accept(smpl, tok);
        *out = tok;
        return 0;
    } catch (const std::bad_alloc &) {
        return 1;
    } catch (...) {
        return 2;
    }
}

// Proves the catch machinery of this object (tests): throws what `kind` asks for and catches it
// like the wrappers above.
int amend_shim_selftest(int kind) noexcept {
    try {
        if (kind == 1) {
            throw std::bad_alloc();
        }
        if (kind == 2) {
            throw std::runtime_error("selftest");
        }
        return 0;
    } catch (const std::bad_alloc &) {
        return 1;
    } catch (...) {
        return 2;
    }
}
}
