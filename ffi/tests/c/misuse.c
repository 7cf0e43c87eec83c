/*
 * Misuse tests of the amend C ABI: NULL everywhere, freed and wrong-kind handles, bad UTF-8,
 * corrupt bundle bytes, wrong-order calls, a callback that stops generation, re-entry from a
 * callback, and cancellation from a second thread. Run under valgrind and AddressSanitizer by
 * scripts/test.d/ffi.sh: every failure must be a specific result code plus a message, never a
 * crash, and nothing may leak.
 *
 * Usage: misuse [MODEL.gguf [BUNDLE_DIR]]   (without a model, only the model-free tests run;
 * BUNDLE_DIR is written by `cargo run --release -p amend-ffi --example make_test_bundles`;
 * the scope-model bundle tests also need AMEND_SCOPE_MODEL and BUNDLE_DIR/serac.amend)
 */
#define _DEFAULT_SOURCE
#include "amend.h"

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int n_pass, n_fail;

#define CHECK(cond, ...)                                                                     \
    do {                                                                                     \
        if (cond) {                                                                          \
            n_pass++;                                                                        \
        } else {                                                                             \
            n_fail++;                                                                        \
            fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);                  \
            fprintf(stderr, __VA_ARGS__);                                                    \
            fprintf(stderr, "\n");                                                           \
        }                                                                                    \
    } while (0)

/* The call returned `want` and left a non-empty message mentioning `needle`. */
#define EXPECT(call, want, needle)                                                           \
    do {                                                                                     \
        amend_result r_ = (call);                                                            \
        const char *m_ = amend_last_error();                                                 \
        CHECK(r_ == (want) && amend_last_error_code() == (want) && m_ && m_[0] &&            \
                  strstr(m_, (needle)) != NULL,                                              \
              "%s: got %s (%d) \"%s\", want %s with \"%s\"", #call, amend_result_name(r_),   \
              (int)r_, m_ ? m_ : "(null)", #want, needle);                                   \
    } while (0)

#define EXPECT_OK(call)                                                                      \
    do {                                                                                     \
        amend_result r_ = (call);                                                            \
        CHECK(r_ == AMEND_OK && amend_last_error()[0] == 0, "%s: %s: %s", #call,             \
              amend_result_name(r_), amend_last_error());                                    \
    } while (0)

static void test_basics(void) {
    CHECK(strcmp(amend_version(), "") != 0, "empty version");
    CHECK(amend_abi_version() == AMEND_ABI_VERSION, "ABI %u vs header %u", amend_abi_version(),
          AMEND_ABI_VERSION);
    CHECK(strcmp(amend_result_name(AMEND_ERR_MODEL_MISMATCH), "AMEND_ERR_MODEL_MISMATCH") == 0,
          "name");
    CHECK(strcmp(amend_result_name(12345), "AMEND_UNKNOWN_RESULT") == 0, "unknown name");
    amend_model_params mp = amend_model_default_params();
    CHECK(mp.use_mmap, "mmap default");
    /* Every constant of the header compiles and has its documented value. */
    CHECK(AMEND_PUBLIC_KEY_LEN == 32 && AMEND_MAX_TRUSTED_KEYS == 16 && AMEND_FLUSH_TOKEN == -1,
          "constants");
    amend_generate_params gp = amend_generate_default_params();
    CHECK(gp.max_tokens > 0 && gp.temperature <= 0.0f && gp.stop_at_eos, "generate defaults");
}

static void test_null_everywhere(void) {
    amend_model *model = (amend_model *)0x1;
    EXPECT(amend_model_open(NULL, NULL, &model), AMEND_ERR_NULL_ARGUMENT, "path");
    CHECK(model == NULL, "out not cleared on failure");
    EXPECT(amend_model_open("x.gguf", NULL, NULL), AMEND_ERR_NULL_ARGUMENT, "out");
    amend_model_info info;
    EXPECT(amend_model_get_info(NULL, &info), AMEND_ERR_NULL_ARGUMENT, "model");
    EXPECT(amend_model_description(NULL, NULL, 0, NULL), AMEND_ERR_NULL_ARGUMENT, "model");
    amend_trust_store *trust = NULL;
    EXPECT(amend_trust_store_new(NULL, 1, &trust), AMEND_ERR_NULL_ARGUMENT, "keys");
    EXPECT(amend_trust_store_new(NULL, 0, &trust), AMEND_ERR_INVALID_ARGUMENT, "at least one");
    uint8_t key[AMEND_PUBLIC_KEY_LEN] = {0};
    EXPECT(amend_trust_store_new(key, SIZE_MAX, &trust), AMEND_ERR_INVALID_ARGUMENT, "n_keys");
    /* Above AMEND_MAX_TRUSTED_KEYS: refused before any key past the first is read. */
    EXPECT(amend_trust_store_new(key, AMEND_MAX_TRUSTED_KEYS + 1, &trust), AMEND_ERR_INVALID_ARGUMENT,
           "give 1 to 16 keys");
    amend_bundle *bundle = NULL;
    EXPECT(amend_bundle_load_file(NULL, NULL, "b.amend", &bundle), AMEND_ERR_NULL_ARGUMENT,
           "trust");
    EXPECT(amend_bundle_load_memory(NULL, NULL, NULL, 0, &bundle), AMEND_ERR_NULL_ARGUMENT,
           "trust");
    amend_session *session = NULL;
    EXPECT(amend_session_open(NULL, NULL, &session), AMEND_ERR_NULL_ARGUMENT, "model");
    EXPECT(amend_session_generate(NULL, "hi", 2, NULL, NULL, NULL, NULL),
           AMEND_ERR_NULL_ARGUMENT, "session");
    EXPECT(amend_session_cancel(NULL), AMEND_ERR_NULL_ARGUMENT, "session");
    amend_score score;
    EXPECT(amend_session_score(NULL, "a", 1, "b", 1, &score), AMEND_ERR_NULL_ARGUMENT,
           "session");
    EXPECT(amend_session_activate(NULL, NULL), AMEND_ERR_NULL_ARGUMENT, "session");
    EXPECT(amend_session_rollback_bundle(NULL, "id"), AMEND_ERR_NULL_ARGUMENT, "session");
    EXPECT(amend_session_set_lora_scale(NULL, "id", 1.0f), AMEND_ERR_NULL_ARGUMENT, "session");
    EXPECT(amend_session_rollback_edit(NULL, "id"), AMEND_ERR_NULL_ARGUMENT, "session");
    size_t n;
    EXPECT(amend_session_active_bundle_count(NULL, &n), AMEND_ERR_NULL_ARGUMENT, "session");
    EXPECT(amend_session_explain(NULL, NULL, NULL), AMEND_ERR_NULL_ARGUMENT, "session");
    EXPECT(amend_bundle_get_info(NULL, NULL), AMEND_ERR_NULL_ARGUMENT, "bundle");
    EXPECT(amend_bundle_id(NULL, NULL, 0, NULL), AMEND_ERR_NULL_ARGUMENT, "bundle");
    /* Free functions accept NULL. */
    amend_model_free(NULL);
    amend_session_free(NULL);
    amend_bundle_free(NULL);
    amend_trust_store_free(NULL);
    CHECK(amend_last_error_code() == AMEND_OK, "free(NULL) set an error");
}

static void test_forged_handles(void) {
    /* Pointers amend never returned are reported, not dereferenced. */
    amend_model *fake_model = (amend_model *)(uintptr_t)0xdeadbeef0;
    amend_session *fake_session = (amend_session *)(uintptr_t)0x10;
    amend_model_info info;
    EXPECT(amend_model_get_info(fake_model, &info), AMEND_ERR_INVALID_HANDLE, "amend_model");
    EXPECT(amend_session_generate(fake_session, "hi", 2, NULL, NULL, NULL, NULL),
           AMEND_ERR_INVALID_HANDLE, "amend_session");
    EXPECT(amend_session_cancel(fake_session), AMEND_ERR_INVALID_HANDLE, "amend_session");
    amend_model_free(fake_model);
    CHECK(amend_last_error_code() == AMEND_ERR_INVALID_HANDLE, "free of a forged handle");
}

/* RFC 8032 test vector 1: a valid ed25519 public key. */
static const uint8_t RFC8032_KEY[AMEND_PUBLIC_KEY_LEN] = {
    0xd7, 0x5a, 0x98, 0x01, 0x82, 0xb1, 0x0a, 0xb7, 0xd5, 0x4b, 0xfe, 0xd3, 0xc9, 0x64, 0x07, 0x3a,
    0x0e, 0xe1, 0x72, 0xf3, 0xda, 0xa6, 0x23, 0x25, 0xaf, 0x02, 0x1a, 0x68, 0xf7, 0x07, 0x51, 0x1a};

static void test_trust_store_lifecycle(void) {
    /* Not a curve point: y = 2 has no x on edwards25519. */
    uint8_t bad[2 * AMEND_PUBLIC_KEY_LEN] = {0};
    memcpy(bad, RFC8032_KEY, AMEND_PUBLIC_KEY_LEN);
    bad[AMEND_PUBLIC_KEY_LEN] = 2;
    amend_trust_store *trust = (amend_trust_store *)0x1;
    EXPECT(amend_trust_store_new(bad, 2, &trust), AMEND_ERR_INVALID_KEY, "key 1");
    CHECK(trust == NULL, "out set on failure");
    amend_result r = amend_trust_store_new(RFC8032_KEY, 1, &trust);
    CHECK(r == AMEND_OK, "trust store: %s: %s", amend_result_name(r), amend_last_error());
    if (r != AMEND_OK) return;
    /* A trust store is not a model: wrong-kind handles are caught. */
    amend_model_info info;
    EXPECT(amend_model_get_info((const amend_model *)trust, &info), AMEND_ERR_INVALID_HANDLE,
           "amend_model");
    amend_trust_store_free(trust);
    CHECK(amend_last_error_code() == AMEND_OK, "free: %s", amend_last_error());
    /* Double free and use after free are detected (handles are never reused). */
    amend_trust_store_free(trust);
    CHECK(amend_last_error_code() == AMEND_ERR_INVALID_HANDLE, "double free not detected");
    amend_bundle *bundle = NULL;
    EXPECT(amend_bundle_load_memory(trust, NULL, (const uint8_t *)"x", 1, &bundle),
           AMEND_ERR_INVALID_HANDLE, "amend_trust_store");
}

static void test_missing_model(void) {
    amend_model *model = NULL;
    EXPECT(amend_model_open("/nonexistent/model.gguf", NULL, &model), AMEND_ERR_IO,
           "not found");
    CHECK(model == NULL, "out set on failure");
    /* A file that is not GGUF. */
    char path[] = "/tmp/amend-misuse-XXXXXX";
    int fd = mkstemp(path);
    CHECK(fd >= 0, "mkstemp");
    if (fd < 0) return;
    CHECK(write(fd, "not a model at all, definitely not", 34) == 34, "write");
    close(fd);
    EXPECT(amend_model_open(path, NULL, &model), AMEND_ERR_MODEL_LOAD, "GGUF");
    unlink(path);
    /* Invalid UTF-8 in a path. */
    EXPECT(amend_model_open("/tmp/\xff\xfe.gguf", NULL, &model), AMEND_ERR_INVALID_UTF8,
           "UTF-8");
}

/* The scope model (issue 16): bad arguments and files, each with its specific code. */
static void test_scope_model_misuse(void) {
    amend_scope_model *scope = (amend_scope_model *)0x1;
    EXPECT(amend_scope_model_open(NULL, 0, &scope), AMEND_ERR_NULL_ARGUMENT, "path");
    CHECK(scope == NULL, "out not cleared on failure");
    EXPECT(amend_scope_model_open("x.gguf", 0, NULL), AMEND_ERR_NULL_ARGUMENT, "out");
    EXPECT(amend_scope_model_open_bytes(NULL, 5, 0, &scope), AMEND_ERR_NULL_ARGUMENT, "path");
    EXPECT(amend_scope_model_open_bytes((const uint8_t *)"", 0, 0, &scope),
           AMEND_ERR_INVALID_ARGUMENT, "empty");
    EXPECT(amend_scope_model_open("/tmp/\xff\xfe.gguf", 0, &scope), AMEND_ERR_INVALID_UTF8,
           "UTF-8");
    EXPECT(amend_scope_model_open("/nonexistent/scope.gguf", 513, &scope),
           AMEND_ERR_INVALID_ARGUMENT, "n_threads");
    scope = (amend_scope_model *)0x1;
    EXPECT(amend_scope_model_open("/nonexistent/scope.gguf", 0, &scope), AMEND_ERR_SCOPE_MODEL,
           "not found");
    CHECK(scope == NULL, "out not cleared on failure");
    EXPECT(amend_scope_model_open("/tmp", 0, &scope), AMEND_ERR_SCOPE_MODEL, "/tmp");
    char path[] = "/tmp/amend-misuse-scope-XXXXXX";
    int fd = mkstemp(path);
    CHECK(fd >= 0, "mkstemp");
    if (fd >= 0) {
        CHECK(write(fd, "not a scope model, not even a GGUF", 34) == 34, "write");
        close(fd);
        EXPECT(amend_scope_model_open_bytes((const uint8_t *)path, strlen(path), 1, &scope),
               AMEND_ERR_SCOPE_MODEL, "amend-misuse-scope");
        unlink(path);
    }
    EXPECT(amend_session_set_scope_model(NULL, NULL), AMEND_ERR_NULL_ARGUMENT, "session");
    EXPECT(amend_session_set_scope_model((amend_session *)(uintptr_t)0x10, NULL),
           AMEND_ERR_INVALID_HANDLE, "amend_session");
    amend_scope_model_free(NULL);
    CHECK(amend_last_error_code() == AMEND_OK, "free(NULL) set an error");
    amend_scope_model_free((amend_scope_model *)(uintptr_t)0xdeadbeef0);
    CHECK(amend_last_error_code() == AMEND_ERR_INVALID_HANDLE, "free of a forged handle");
}

/* Per-thread handles freed by a pthread key destructor, as C libraries clean up: it runs after
 * amend's own thread-local storage was destroyed, and used to abort the process. */
static pthread_key_t exit_key;
static amend_result exit_codes[2];

static void free_at_exit(void *p) {
    amend_trust_store_free((amend_trust_store *)p);
    exit_codes[0] = amend_last_error_code();
    amend_trust_store_free((amend_trust_store *)p); /* a double free, reported */
    exit_codes[1] = amend_last_error_code();
    CHECK(amend_last_error() != NULL && amend_last_error()[0] != 0, "no message at thread exit");
}

static void *exit_worker(void *arg) {
    (void)arg;
    amend_trust_store *t = NULL;
    /* A failure first: amend's message storage is in use on this thread. */
    EXPECT(amend_trust_store_new(NULL, 1, &t), AMEND_ERR_NULL_ARGUMENT, "keys");
    EXPECT_OK(amend_trust_store_new(RFC8032_KEY, 1, &t));
    pthread_setspecific(exit_key, t);
    return NULL;
}

static void test_free_at_thread_exit(void) {
    CHECK(pthread_key_create(&exit_key, free_at_exit) == 0, "pthread_key_create");
    pthread_t th;
    CHECK(pthread_create(&th, NULL, exit_worker, NULL) == 0, "pthread_create");
    pthread_join(th, NULL);
    pthread_key_delete(exit_key);
    CHECK(exit_codes[0] == AMEND_OK && exit_codes[1] == AMEND_ERR_INVALID_HANDLE,
          "at thread exit: free %s, double free %s", amend_result_name(exit_codes[0]),
          amend_result_name(exit_codes[1]));
}

/* ---- tests with a real model ---------------------------------------------------------- */

typedef struct {
    int n_calls;
    int stop_after;
    char text[4096];
    size_t len;
    amend_session *session;
    amend_result reentry;
} collect_t;

static bool collect(void *user_data, amend_token token, const char *text, size_t text_len) {
    collect_t *c = (collect_t *)user_data;
    (void)token;
    if (text_len > 0 && c->len + text_len < sizeof c->text) {
        memcpy(c->text + c->len, text, text_len);
        c->len += text_len;
        c->text[c->len] = 0;
    }
    if (token == AMEND_FLUSH_TOKEN) return true;
    c->n_calls++;
    if (c->session) {
        /* Re-entering the session from its own callback is refused, not a deadlock. */
        c->reentry = amend_session_generate(c->session, "x", 1, NULL, NULL, NULL, NULL);
        c->session = NULL;
    }
    return c->stop_after == 0 || c->n_calls < c->stop_after;
}

typedef struct {
    amend_session *session;
    int n_tokens;
} cancel_t;

static bool count_tokens(void *user_data, amend_token token, const char *text, size_t len) {
    (void)token, (void)text, (void)len;
    cancel_t *c = (cancel_t *)user_data;
    __atomic_add_fetch(&c->n_tokens, 1, __ATOMIC_SEQ_CST);
    return true;
}

static void *cancel_thread(void *arg) {
    cancel_t *c = (cancel_t *)arg;
    /* Wait until generation is running, then cancel from this thread. */
    for (int i = 0; i < 10000 && __atomic_load_n(&c->n_tokens, __ATOMIC_SEQ_CST) < 2; i++)
        usleep(1000);
    amend_result r = amend_session_cancel(c->session);
    return (void *)(intptr_t)r;
}

static void test_with_model(const char *path) {
    amend_model *model = NULL;
    amend_model_params mp = amend_model_default_params();
    EXPECT_OK(amend_model_open(path, &mp, &model));
    if (!model) return;
    amend_model_info info;
    EXPECT_OK(amend_model_get_info(model, &info));
    CHECK(info.n_layer > 0 && info.n_vocab > 0, "info %u %u", info.n_layer, info.n_vocab);
    size_t need = 0;
    EXPECT(amend_model_description(model, NULL, 0, &need), AMEND_ERR_BUFFER_TOO_SMALL,
           "too small");
    CHECK(need > 0, "description length");
    char desc[256];
    EXPECT_OK(amend_model_description(model, desc, sizeof desc, NULL));
    CHECK(strlen(desc) == need, "description %s", desc);

    amend_session_params sp = amend_session_default_params();
    sp.n_ctx = 256;
    amend_session *session = NULL;
    EXPECT_OK(amend_session_open(model, &sp, &session));
    if (!session) {
        amend_model_free(model);
        return;
    }
    /* Wrong-kind handle in a session slot. */
    EXPECT(amend_session_generate((amend_session *)model, "a", 1, NULL, NULL, NULL, NULL),
           AMEND_ERR_INVALID_HANDLE, "amend_session");

    /* Bad input. */
    const char bad[] = "The capital of \xc3\x28 is";
    EXPECT(amend_session_generate(session, bad, sizeof bad - 1, NULL, NULL, NULL, NULL),
           AMEND_ERR_INVALID_UTF8, "byte 15");
    EXPECT(amend_session_generate(session, NULL, 3, NULL, NULL, NULL, NULL),
           AMEND_ERR_NULL_ARGUMENT, "prompt");
    EXPECT(amend_session_generate(session, "abc", SIZE_MAX, NULL, NULL, NULL, NULL),
           AMEND_ERR_INVALID_ARGUMENT, "length");
    amend_generate_params gp = amend_generate_default_params();
    gp.top_p = 2.0f;
    EXPECT(amend_session_generate(session, "abc", 3, &gp, NULL, NULL, NULL),
           AMEND_ERR_INVALID_ARGUMENT, "top_p");

    /* A callback that stops generation after 3 tokens; it also tries to re-enter. */
    const char prompt[] = "The capital of France is";
    gp = amend_generate_default_params();
    gp.max_tokens = 16;
    gp.stop_at_eos = false;
    collect_t c = {0};
    c.stop_after = 3;
    c.session = session;
    amend_generation g;
    EXPECT_OK(amend_session_generate(session, prompt, strlen(prompt), &gp, collect, &c, &g));
    CHECK(c.n_calls == 3 && g.n_generated == 3 && g.stop_reason == AMEND_STOP_CALLBACK,
          "callback stop: calls %d generated %u reason %d", c.n_calls, g.n_generated,
          (int)g.stop_reason);
    CHECK(c.reentry == AMEND_ERR_BUSY, "re-entry gave %s", amend_result_name(c.reentry));

    /* Greedy generation is deterministic. */
    collect_t a = {0}, b = {0};
    gp.max_tokens = 8;
    EXPECT_OK(amend_session_generate(session, prompt, strlen(prompt), &gp, collect, &a, &g));
    CHECK(g.n_generated == 8 && g.stop_reason == AMEND_STOP_MAX_TOKENS, "8 tokens: %u",
          g.n_generated);
    EXPECT_OK(amend_session_generate(session, prompt, strlen(prompt), &gp, collect, &b, NULL));
    CHECK(a.len > 0 && strcmp(a.text, b.text) == 0, "not deterministic: \"%s\" vs \"%s\"",
          a.text, b.text);
    printf("greedy: %s|%s\n", prompt, a.text);

    /* Cancellation from a second thread. */
    cancel_t cc = {session, 0};
    pthread_t th;
    CHECK(pthread_create(&th, NULL, cancel_thread, &cc) == 0, "pthread_create");
    gp.max_tokens = 200;
    EXPECT(amend_session_generate(session, prompt, strlen(prompt), &gp, count_tokens, &cc, &g),
           AMEND_ERR_CANCELLED, "cancelled");
    void *thread_result = NULL;
    pthread_join(th, &thread_result);
    CHECK((amend_result)(intptr_t)thread_result == AMEND_OK, "cancel from thread failed");
    CHECK(g.stop_reason == AMEND_STOP_CANCELLED && g.n_generated < 200, "cancel: %u tokens",
          g.n_generated);
    /* The cancel was consumed: the next generation runs normally. */
    gp.max_tokens = 2;
    EXPECT_OK(amend_session_generate(session, prompt, strlen(prompt), &gp, NULL, NULL, &g));

    /* Teacher-forced scoring. */
    amend_score s1, s2;
    EXPECT_OK(amend_session_score(session, prompt, strlen(prompt), " Paris", 6, &s1));
    EXPECT_OK(amend_session_score(session, prompt, strlen(prompt), " Banana", 7, &s2));
    CHECK(s1.n_target_tokens >= 1 && s1.logprob_sum < 0 && s1.logprob_sum > s2.logprob_sum,
          "score Paris %f Banana %f", s1.logprob_sum, s2.logprob_sum);
    EXPECT(amend_session_score(session, prompt, strlen(prompt), "", 0, &s1),
           AMEND_ERR_INVALID_ARGUMENT, "target");
    EXPECT(amend_session_score(session, prompt, strlen(prompt), " x", 2, NULL),
           AMEND_ERR_NULL_ARGUMENT, "out");

    /* Bundle bytes that are not a bundle. */
    amend_trust_store *trust = NULL;
    EXPECT_OK(amend_trust_store_new(RFC8032_KEY, 1, &trust));
    if (trust) {
        amend_bundle *bundle = (amend_bundle *)0x1;
        amend_result r;
        static const uint8_t junk[64] = {'n', 'o', 't', ' ', 'a', ' ', 'b', 'u', 'n', 'd'};
        r = amend_bundle_load_memory(trust, model, junk, sizeof junk, &bundle);
        CHECK(r == AMEND_ERR_BUNDLE_FORMAT && strstr(amend_last_error(), "bad magic"),
              "junk bundle: %s: %s", amend_result_name(r), amend_last_error());
        CHECK(bundle == NULL, "out set on failure");
        amend_trust_store_free(trust);
    }

    /* Wrong order: free the model first; the session keeps it alive and still works. */
    amend_model_free(model);
    CHECK(amend_last_error_code() == AMEND_OK, "model free: %s", amend_last_error());
    EXPECT(amend_model_get_info(model, &info), AMEND_ERR_INVALID_HANDLE, "amend_model");
    amend_session *second = (amend_session *)0x1;
    EXPECT(amend_session_open(model, NULL, &second), AMEND_ERR_INVALID_HANDLE, "amend_model");
    CHECK(second == NULL, "out set on failure");
    gp.max_tokens = 1;
    EXPECT_OK(amend_session_generate(session, prompt, strlen(prompt), &gp, NULL, NULL, &g));
    amend_session_free(session);
    CHECK(amend_last_error_code() == AMEND_OK, "session free: %s", amend_last_error());
}

static void test_session_outlives_model(const char *path) {
    amend_model *model = NULL;
    amend_session *session = NULL;
    EXPECT_OK(amend_model_open(path, NULL, &model));
    amend_session_params sp = amend_session_default_params();
    sp.n_ctx = 128;
    EXPECT_OK(amend_session_open(model, &sp, &session));
    amend_model_free(model);
    amend_generate_params gp = amend_generate_default_params();
    gp.max_tokens = 2;
    amend_generation g;
    EXPECT_OK(amend_session_generate(session, "Hello", 5, &gp, NULL, NULL, &g));
    CHECK(g.n_generated >= 1, "generated %u", g.n_generated);
    amend_session_free(session);
    CHECK(amend_last_error_code() == AMEND_OK, "session free: %s", amend_last_error());
    EXPECT(amend_session_cancel(session), AMEND_ERR_INVALID_HANDLE, "amend_session");
    amend_session_free(session);
    CHECK(amend_last_error_code() == AMEND_ERR_INVALID_HANDLE, "double free not detected");
}

typedef struct {
    int n;
    char edit_id[64];
    char family[32];
    uint32_t n_fired, n_checked;
} explain_t;

static bool record_activity(void *user_data, const amend_edit_activity *a) {
    explain_t *e = (explain_t *)user_data;
    if (e->n++ == 0) {
        snprintf(e->edit_id, sizeof e->edit_id, "%s", a->edit_id);
        snprintf(e->family, sizeof e->family, "%s", a->family);
        e->n_fired = a->n_fired;
        e->n_checked = a->n_checked;
    }
    return true;
}

static uint8_t *read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    uint8_t *buf = malloc((size_t)n);
    if (buf && fread(buf, 1, (size_t)n, f) != (size_t)n) {
        free(buf);
        buf = NULL;
    }
    fclose(f);
    *len = (size_t)n;
    return buf;
}

/* Bundles written by `make_test_bundles MODEL DIR`. */
static void test_bundles(const char *model_path, const char *dir) {
    char path[4096];
    size_t key_len = 0;
    snprintf(path, sizeof path, "%s/key.raw", dir);
    uint8_t *key = read_file(path, &key_len);
    CHECK(key && key_len == AMEND_PUBLIC_KEY_LEN, "read %s", path);
    if (!key) return;
    amend_model *model = NULL;
    amend_trust_store *trust = NULL;
    EXPECT_OK(amend_model_open(model_path, NULL, &model));
    EXPECT_OK(amend_trust_store_new(key, 1, &trust));
    free(key);

    amend_bundle *bundle = NULL;
    snprintf(path, sizeof path, "%s/good.amend", dir);
    EXPECT_OK(amend_bundle_load_file(trust, model, path, &bundle));
    char id[64];
    size_t n = 0;
    EXPECT_OK(amend_bundle_id(bundle, id, sizeof id, &n));
    CHECK(strcmp(id, "test-good") == 0 && n == 9, "bundle id %s", id);
    amend_bundle_info bi;
    EXPECT_OK(amend_bundle_get_info(bundle, &bi));
    CHECK(bi.n_edits == 1 && bi.version == 1 && bi.size_bytes > 0, "info %u", bi.n_edits);
    EXPECT_OK(amend_bundle_edit_id(bundle, 0, id, sizeof id, NULL));
    CHECK(strcmp(id, "e-paris") == 0, "edit id %s", id);
    EXPECT(amend_bundle_edit_id(bundle, 1, id, sizeof id, NULL), AMEND_ERR_INVALID_ARGUMENT,
           "out of range");
    EXPECT(amend_bundle_id(bundle, id, 4, NULL), AMEND_ERR_BUFFER_TOO_SMALL, "10 needed");

    /* The same bytes from memory; then corrupted and truncated copies. */
    size_t len = 0;
    uint8_t *bytes = read_file(path, &len);
    CHECK(bytes != NULL, "read good.amend");
    amend_bundle *from_mem = NULL;
    EXPECT_OK(amend_bundle_load_memory(trust, model, bytes, len, &from_mem));
    amend_bundle_free(from_mem);
    bytes[len - 7] ^= 0x5a; /* inside the last section's data */
    amend_bundle *bad = (amend_bundle *)0x1;
    amend_result r = amend_bundle_load_memory(trust, model, bytes, len, &bad);
    CHECK((r == AMEND_ERR_BUNDLE_INTEGRITY || r == AMEND_ERR_SIGNATURE ||
           r == AMEND_ERR_BUNDLE_FORMAT) && bad == NULL,
          "corrupt bundle: %s: %s", amend_result_name(r), amend_last_error());
    CHECK(strstr(amend_last_error(), "invalid bundle") != NULL, "message: %s",
          amend_last_error());
    EXPECT(amend_bundle_load_memory(trust, model, bytes, 40, &bad), AMEND_ERR_BUNDLE_FORMAT,
           "truncated");
    memcpy(bytes, "XXXX", 4);
    EXPECT(amend_bundle_load_memory(trust, model, bytes, len, &bad), AMEND_ERR_BUNDLE_FORMAT,
           "magic");
    EXPECT(amend_bundle_load_memory(trust, model, NULL, 10, &bad), AMEND_ERR_NULL_ARGUMENT,
           "data");
    free(bytes);

    snprintf(path, sizeof path, "%s/other-model.amend", dir);
    EXPECT(amend_bundle_load_file(trust, model, path, &bad), AMEND_ERR_MODEL_MISMATCH,
           "another model");
    snprintf(path, sizeof path, "%s/untrusted.amend", dir);
    EXPECT(amend_bundle_load_file(trust, model, path, &bad), AMEND_ERR_UNTRUSTED_KEY,
           "unknown key");
    snprintf(path, sizeof path, "%s/missing.amend", dir);
    EXPECT(amend_bundle_load_file(trust, model, path, &bad), AMEND_ERR_IO, "missing.amend");

    /* Activation, listing, explanation and rollback. */
    amend_session *session = NULL;
    amend_session_params sp = amend_session_default_params();
    sp.n_ctx = 64;
    EXPECT_OK(amend_session_open(model, &sp, &session));
    EXPECT(amend_session_activate(session, NULL), AMEND_ERR_NULL_ARGUMENT, "bundle");
    EXPECT(amend_session_activate(session, (const amend_bundle *)trust),
           AMEND_ERR_INVALID_HANDLE, "amend_bundle");
    EXPECT(amend_session_rollback_bundle(session, "test-good"), AMEND_ERR_NOT_FOUND, "none");
    EXPECT_OK(amend_session_activate(session, bundle));
    EXPECT(amend_session_activate(session, bundle), AMEND_ERR_BUNDLE_DOWNGRADE, "replay");
    n = 0;
    EXPECT_OK(amend_session_active_bundle_count(session, &n));
    CHECK(n == 1, "active count %zu", n);
    EXPECT_OK(amend_session_active_bundle_id(session, 0, id, sizeof id, NULL));
    CHECK(strcmp(id, "test-good") == 0, "active id %s", id);
    EXPECT(amend_session_active_bundle_id(session, 1, id, sizeof id, NULL),
           AMEND_ERR_INVALID_ARGUMENT, "out of range");
    amend_generate_params gp = amend_generate_default_params();
    gp.max_tokens = 3;
    const char prompt[] = "The capital of France is";
    EXPECT_OK(amend_session_generate(session, prompt, strlen(prompt), &gp, NULL, NULL, NULL));
    explain_t ex = {0};
    EXPECT_OK(amend_session_explain(session, record_activity, &ex));
    CHECK(ex.n >= 1 && strcmp(ex.edit_id, "e-paris") == 0 && strcmp(ex.family, "codebook") == 0 &&
              ex.n_checked > 0 && ex.n_fired == 0,
          "explain: n %d edit %s family %s checked %u fired %u", ex.n, ex.edit_id, ex.family,
          ex.n_checked, ex.n_fired);
    EXPECT(amend_session_explain(session, NULL, NULL), AMEND_ERR_NULL_ARGUMENT, "callback");
    EXPECT_OK(amend_session_rollback_edit(session, "e-paris"));
    EXPECT(amend_session_rollback_edit(session, "e-paris"), AMEND_ERR_EDIT_CONFLICT,
           "already rolled back");
    EXPECT(amend_session_rollback_edit(session, "\xff"), AMEND_ERR_INVALID_UTF8, "edit_id");
    EXPECT_OK(amend_session_rollback_bundle(session, "test-good"));
    EXPECT_OK(amend_session_active_bundle_count(session, &n));
    CHECK(n == 0, "active after rollback %zu", n);
    EXPECT(amend_session_rollback_bundle(session, "test-good"), AMEND_ERR_NOT_FOUND,
           "test-good");

    /* A bundle that changes generation: a low-rank delta. */
    collect_t base = {0}, edited = {0}, rolled = {0};
    gp.max_tokens = 6;
    gp.stop_at_eos = false;
    EXPECT_OK(amend_session_generate(session, prompt, strlen(prompt), &gp, collect, &base, NULL));
    amend_bundle *lora = NULL;
    snprintf(path, sizeof path, "%s/lora.amend", dir);
    EXPECT_OK(amend_bundle_load_file(trust, model, path, &lora));
    EXPECT_OK(amend_session_activate(session, lora));
    amend_bundle_free(lora); /* the session keeps the active edits */
    EXPECT_OK(amend_session_generate(session, prompt, strlen(prompt), &gp, collect, &edited, NULL));
    CHECK(strcmp(base.text, edited.text) != 0, "the LoRA bundle changed nothing: %s", base.text);
    /* Its adapter scaled: 0 is the base model, 1 as compiled; refusals change nothing. */
    collect_t off = {0}, on = {0};
    EXPECT(amend_session_set_lora_scale(session, "test-lora", NAN), AMEND_ERR_INVALID_ARGUMENT,
           "LoRA scale");
    EXPECT(amend_session_set_lora_scale(session, "test-lora", 1e30f), AMEND_ERR_INVALID_ARGUMENT,
           "LoRA scale");
    EXPECT(amend_session_set_lora_scale(session, NULL, 0.0f), AMEND_ERR_NULL_ARGUMENT, "bundle_id");
    EXPECT(amend_session_set_lora_scale(session, "\xff", 0.0f), AMEND_ERR_INVALID_UTF8,
           "bundle_id");
    EXPECT(amend_session_set_lora_scale(session, "test-good", 0.0f), AMEND_ERR_NOT_FOUND,
           "test-good");
    EXPECT_OK(amend_session_set_lora_scale(session, "test-lora", 0.0f));
    EXPECT_OK(amend_session_generate(session, prompt, strlen(prompt), &gp, collect, &off, NULL));
    CHECK(strcmp(base.text, off.text) == 0, "scale 0 is not the base model: %s vs %s", base.text,
          off.text);
    EXPECT_OK(amend_session_set_lora_scale(session, "test-lora", 1.0f));
    EXPECT_OK(amend_session_generate(session, prompt, strlen(prompt), &gp, collect, &on, NULL));
    CHECK(strcmp(edited.text, on.text) == 0, "scale 1 is not the bundle as compiled: %s vs %s",
          edited.text, on.text);
    EXPECT_OK(amend_session_rollback_bundle(session, "test-lora"));
    EXPECT_OK(amend_session_generate(session, prompt, strlen(prompt), &gp, collect, &rolled, NULL));
    CHECK(strcmp(base.text, rolled.text) == 0, "rollback did not restore: %s vs %s", base.text,
          rolled.text);

    amend_bundle_free(bundle);
    amend_session_free(session);
    amend_trust_store_free(trust);
    amend_model_free(model);
}

static double score_of(amend_session *session, const char *prompt, const char *target) {
    amend_score sc = {0};
    EXPECT_OK(amend_session_score(session, prompt, strlen(prompt), target, strlen(target), &sc));
    return sc.logprob_sum;
}

/* serac.amend and scope-other.gguf from `make_test_bundles MODEL DIR SCOPE_MODEL`; the right
 * scope model from AMEND_SCOPE_MODEL. Skipped when any is absent. */
static void test_scope_bundles(const char *model_path, const char *dir) {
    char bundle_path[4096], other_path[4096];
    const char *scope_path = getenv("AMEND_SCOPE_MODEL");
    snprintf(bundle_path, sizeof bundle_path, "%s/serac.amend", dir);
    snprintf(other_path, sizeof other_path, "%s/scope-other.gguf", dir);
    if (!scope_path || access(scope_path, R_OK) != 0 || access(bundle_path, R_OK) != 0) {
        printf("misuse: no scope model or serac.amend, scope-model bundle tests skipped\n");
        return;
    }
    const char *prompt = "The capital of France is", *target = " Berlin";
    char key_path[4096];
    snprintf(key_path, sizeof key_path, "%s/key.raw", dir);
    size_t key_len = 0;
    uint8_t *key = read_file(key_path, &key_len);
    CHECK(key && key_len == AMEND_PUBLIC_KEY_LEN, "key.raw");
    amend_trust_store *trust = NULL;
    amend_model *model = NULL;
    amend_session *session = NULL;
    amend_bundle *bundle = NULL;
    if (key) EXPECT_OK(amend_trust_store_new(key, 1, &trust));
    free(key);
    EXPECT_OK(amend_model_open(model_path, NULL, &model));
    amend_session_params sp = amend_session_default_params();
    sp.n_ctx = 256;
    EXPECT_OK(amend_session_open(model, &sp, &session));
    EXPECT_OK(amend_bundle_load_file(trust, model, bundle_path, &bundle));
    if (!session || !bundle) goto out;
    double base = score_of(session, prompt, target);
    size_t n = 99;
    /* No scope model: refused whole. */
    EXPECT(amend_session_activate(session, bundle), AMEND_ERR_SCOPE_MODEL, "test-serac");
    EXPECT_OK(amend_session_active_bundle_count(session, &n));
    CHECK(n == 0, "%zu bundles active after a refused activation", n);
    CHECK(score_of(session, prompt, target) == base, "a refused bundle changed the score");
    /* Another scope model: MISMATCH, refused whole. */
    amend_scope_model *other = NULL, *right = NULL;
    EXPECT_OK(amend_scope_model_open(other_path, 1, &other));
    EXPECT_OK(amend_session_set_scope_model(session, other));
    amend_scope_model_free(other); /* the session keeps it alive */
    EXPECT(amend_session_activate(session, bundle), AMEND_ERR_SCOPE_MODEL_MISMATCH, "test-serac");
    EXPECT_OK(amend_session_active_bundle_count(session, &n));
    CHECK(n == 0, "%zu bundles active after a refused activation", n);
    CHECK(score_of(session, prompt, target) == base, "a refused bundle changed the score");
    /* A wrong-kind handle is not a scope model. */
    EXPECT(amend_session_set_scope_model(session, (const amend_scope_model *)trust),
           AMEND_ERR_INVALID_HANDLE, "amend_scope_model");
    /* The right one: the prompt routes to the memory. */
    EXPECT_OK(amend_scope_model_open(scope_path, 1, &right));
    EXPECT_OK(amend_session_set_scope_model(session, right));
    amend_scope_model_free(right);
    EXPECT_OK(amend_session_activate(session, bundle));
    double edited = score_of(session, prompt, target);
    CHECK(edited > base + 1.0, "routed %f vs base %f", edited, base);
    EXPECT(amend_session_set_scope_model(session, NULL), AMEND_ERR_SCOPE_MODEL, "test-serac");
out:
    amend_bundle_free(bundle);
    amend_session_free(session);
    amend_model_free(model);
    amend_trust_store_free(trust);
}

int main(int argc, char **argv) {
    test_basics();
    test_null_everywhere();
    test_forged_handles();
    test_trust_store_lifecycle();
    test_missing_model();
    test_scope_model_misuse();
    test_free_at_thread_exit();
    if (argc > 1) {
        test_with_model(argv[1]);
        test_session_outlives_model(argv[1]);
        if (argc > 2) {
            test_bundles(argv[1], argv[2]);
            test_scope_bundles(argv[1], argv[2]);
        } else printf("misuse: no bundle directory given, bundle tests skipped\n");
    } else {
        printf("misuse: no model given, model tests skipped\n");
    }
    CHECK(amend_live_handles() == 0, "%zu handles still live at exit", amend_live_handles());
    printf("%d passed, %d failed\n", n_pass, n_fail);
    return n_fail == 0 ? 0 : 1;
}
