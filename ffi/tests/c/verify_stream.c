/* amend_verify_stream_*: the streaming verifier from C, in a caller-owned state struct.
 * Usage: verify_stream BUNDLES_DIR (from ffi/examples/make_test_bundles: key.raw, good.amend,
 * lora.amend, untrusted.amend). Exit 0 when every check holds. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "amend.h"

static int failures = 0;

#define EXPECT(call, want, what)                                                           \
    do {                                                                                   \
        amend_result got_ = (call);                                                        \
        if (got_ != (want)) {                                                              \
            fprintf(stderr, "FAIL %s: got %s, want %s (%s)\n", (what),                     \
                    amend_result_name(got_), amend_result_name(want), amend_last_error()); \
            failures++;                                                                    \
        }                                                                                  \
    } while (0)

static uint8_t *slurp(const char *dir, const char *name, size_t *len) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "rb");
    if (!f) {
        perror(path);
        exit(2);
    }
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    uint8_t *buf = malloc((size_t)n + 1);
    if (!buf || fread(buf, 1, (size_t)n, f) != (size_t)n) {
        perror(path);
        exit(2);
    }
    fclose(f);
    *len = (size_t)n;
    return buf;
}

/* Static state: no allocation by anyone for the verifier. */
static amend_verify_stream_state state;

/* Stream `len` bytes in chunks of `chunk`; the first non-OK code, else finish's. */
static amend_result stream(const uint8_t *key, const uint8_t *b, size_t len, size_t chunk) {
    amend_result r = amend_verify_stream_init(&state, sizeof state, key, 1);
    if (r != AMEND_OK) return r;
    for (size_t at = 0; at < len; at += chunk) {
        size_t n = len - at < chunk ? len - at : chunk;
        r = amend_verify_stream_update(&state, b + at, n);
        if (r != AMEND_OK) return r;
    }
    return amend_verify_stream_finish(&state);
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s BUNDLES_DIR\n", argv[0]);
        return 2;
    }
    size_t key_len, good_len, lora_len, untrusted_len;
    uint8_t *key = slurp(argv[1], "key.raw", &key_len);
    uint8_t *good = slurp(argv[1], "good.amend", &good_len);
    uint8_t *lora = slurp(argv[1], "lora.amend", &lora_len);
    uint8_t *untrusted = slurp(argv[1], "untrusted.amend", &untrusted_len);
    if (key_len != AMEND_PUBLIC_KEY_LEN) return 2;

    if (sizeof(amend_verify_stream_state) != AMEND_VERIFY_STREAM_STATE_SIZE) {
        fprintf(stderr, "FAIL sizeof(amend_verify_stream_state) != AMEND_VERIFY_STREAM_STATE_SIZE\n");
        failures++;
    }
    /* Misuse: each its own code. */
    EXPECT(amend_verify_stream_init(&state, sizeof state - 8, key, 1), AMEND_ERR_STATE_SIZE,
           "state of the wrong size");
    EXPECT(amend_verify_stream_init(&state, sizeof state + 8, key, 1), AMEND_ERR_STATE_SIZE,
           "state of the wrong size (larger)");
    EXPECT(amend_verify_stream_init(NULL, sizeof state, key, 1), AMEND_ERR_NULL_ARGUMENT,
           "NULL state");
    EXPECT(amend_verify_stream_update(&state, good, 1), AMEND_ERR_INVALID_ARGUMENT,
           "update on a state that was never initialised");
    EXPECT(amend_verify_stream_init(&state, sizeof state, key, 0), AMEND_ERR_INVALID_ARGUMENT,
           "no keys");
    EXPECT(amend_verify_stream_init(&state, sizeof state, NULL, 1), AMEND_ERR_NULL_ARGUMENT,
           "NULL keys");
    {
        uint8_t bad_key[32] = {2}; /* y = 2 is not on the curve */
        EXPECT(amend_verify_stream_init(&state, sizeof state, bad_key, 1), AMEND_ERR_INVALID_KEY,
               "invalid key");
    }
    EXPECT(amend_verify_stream_init(&state, sizeof state, key, 1), AMEND_OK, "init");
    EXPECT(amend_verify_stream_update(&state, NULL, 0), AMEND_OK, "empty chunk");
    EXPECT(amend_verify_stream_update(&state, NULL, 5), AMEND_ERR_NULL_ARGUMENT, "NULL chunk");

    /* Valid bundles at several chunk sizes. */
    size_t chunks[] = {1, 7, 64, 4096, 1 << 20};
    for (size_t i = 0; i < sizeof chunks / sizeof chunks[0]; i++) {
        EXPECT(stream(key, good, good_len, chunks[i]), AMEND_OK, "good.amend");
        if (chunks[i] >= 64) EXPECT(stream(key, lora, lora_len, chunks[i]), AMEND_OK, "lora.amend");
    }
    /* Ends early; continues past the declared length; corrupt; untrusted. */
    EXPECT(stream(key, good, good_len - 1, 7), AMEND_ERR_BUNDLE_TRUNCATED, "truncated by 1 byte");
    EXPECT(stream(key, good, 10, 3), AMEND_ERR_BUNDLE_TRUNCATED, "truncated in the header");
    {
        uint8_t *more = malloc(good_len + 1);
        memcpy(more, good, good_len);
        more[good_len] = 0;
        EXPECT(stream(key, more, good_len + 1, 4096), AMEND_ERR_BUNDLE_TOO_LONG, "one byte too many");
        EXPECT(amend_verify_stream_finish(&state), AMEND_ERR_BUNDLE_TOO_LONG, "error sticks");
        free(more);
    }
    {
        uint8_t *bad = malloc(lora_len);
        memcpy(bad, lora, lora_len);
        bad[lora_len / 2] ^= 0x10; /* inside the large low-rank section */
        EXPECT(stream(key, bad, lora_len, 4096), AMEND_ERR_BUNDLE_INTEGRITY, "flipped payload bit");
        memcpy(bad, lora, lora_len);
        bad[70] ^= 1; /* in the manifest */
        EXPECT(stream(key, bad, lora_len, 4096), AMEND_ERR_SIGNATURE, "flipped manifest bit");
        free(bad);
    }
    EXPECT(stream(key, untrusted, untrusted_len, 512), AMEND_ERR_UNTRUSTED_KEY, "untrusted key");

    printf("verify_stream: state %zu bytes; good.amend %zu B, lora.amend %zu B streamed; %d failure(s)\n",
           sizeof state, good_len, lora_len, failures);
    free(key);
    free(good);
    free(lora);
    free(untrusted);
    return failures ? 1 : 0;
}
