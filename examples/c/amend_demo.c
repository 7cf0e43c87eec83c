/*
 * amend C example: open the default model, load a signed patch bundle, and generate the same
 * prompt before and after activating it.
 *
 *   amend_demo [--model MODEL.gguf] [--bundle FILE.amend --key PUBKEY_HEX] [--prompt TEXT]
 *              [--scope-model SCOPE.gguf] [--tokens N] [--seed S] [--temperature T] [--ids]
 *
 * --scope-model opens the scope model a retrieval-memory (serac) bundle routes with, e.g.
 * ~/.cache/amend/all-minilm-l6-v2-q8_0.gguf; without it such a bundle is refused
 * (AMEND_ERR_SCOPE_MODEL) and nothing of it is applied.
 *
 * The model defaults to $AMEND_MODEL, then ~/.cache/amend/gemma3-270m-q4_k_m.gguf. Build:
 *   cc amend_demo.c $(pkg-config --cflags --libs amend-static) -o amend_demo
 * or with CMake: find_package(amend) and link amend::amend (see CMakeLists.txt here).
 */
#include <amend.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Prints the failed call, its result code and amend's message, then exits. */
static void check(amend_result r, const char *what) {
    if (r != AMEND_OK) {
        fprintf(stderr, "amend_demo: %s failed: %s: %s\n", what, amend_result_name(r),
                amend_last_error());
        exit(1);
    }
}

static int print_ids; /* --ids: also print the generated token ids (compared with Rust's) */
static amend_token ids[1024];

/* Token callback: stream the text to stdout. user_data counts tokens. */
static bool print_token(void *user_data, amend_token token, const char *text, size_t len) {
    int *n = (int *)user_data;
    if (token != AMEND_FLUSH_TOKEN && *n < 1024) ids[(*n)++] = token;
    fwrite(text, 1, len, stdout);
    fflush(stdout);
    return true; /* keep going; false would stop generation here */
}

static void generate(amend_session *session, const char *label, const char *prompt,
                     const amend_generate_params *params) {
    int n = 0;
    amend_generation g;
    printf("%s: %s", label, prompt);
    check(amend_session_generate(session, prompt, strlen(prompt), params, print_token, &n, &g),
          "amend_session_generate");
    printf("\n  (%u prompt tokens, %u generated, %.0f tok/s)\n", g.n_prompt_tokens,
           g.n_generated, g.decode_tok_s);
    if (print_ids) {
        printf("%s ids:", label);
        for (int i = 0; i < n; i++) printf(" %d", ids[i]);
        printf("\n");
    }
}

static int parse_hex_key(const char *hex, uint8_t key[AMEND_PUBLIC_KEY_LEN]) {
    if (strlen(hex) != 2 * AMEND_PUBLIC_KEY_LEN) return -1;
    for (int i = 0; i < AMEND_PUBLIC_KEY_LEN; i++) {
        unsigned v;
        if (sscanf(hex + 2 * i, "%2x", &v) != 1) return -1;
        key[i] = (uint8_t)v;
    }
    return 0;
}

int main(int argc, char **argv) {
    const char *model_path = getenv("AMEND_MODEL");
    const char *bundle_path = NULL, *key_hex = NULL, *scope_path = NULL;
    const char *prompt = "The capital of France is";
    char default_path[4096];
    amend_generate_params params = amend_generate_default_params();
    params.max_tokens = 16;

    for (int i = 1; i < argc; i += 2) {
        if (!strcmp(argv[i], "--ids")) {
            print_ids = 1;
            i--;
            continue;
        }
        if (i + 1 >= argc) {
            fprintf(stderr, "amend_demo: %s needs a value\n", argv[i]);
            return 2;
        }
        if (!strcmp(argv[i], "--model")) model_path = argv[i + 1];
        else if (!strcmp(argv[i], "--bundle")) bundle_path = argv[i + 1];
        else if (!strcmp(argv[i], "--key")) key_hex = argv[i + 1];
        else if (!strcmp(argv[i], "--scope-model")) scope_path = argv[i + 1];
        else if (!strcmp(argv[i], "--prompt")) prompt = argv[i + 1];
        else if (!strcmp(argv[i], "--tokens")) params.max_tokens = (uint32_t)atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--seed")) params.seed = (uint32_t)strtoul(argv[i + 1], 0, 10);
        else if (!strcmp(argv[i], "--temperature")) params.temperature = (float)atof(argv[i + 1]);
        else {
            fprintf(stderr, "amend_demo: unknown option %s\n", argv[i]);
            return 2;
        }
    }
    if (!model_path || !*model_path) {
        /* Where scripts/fetch-model.sh puts it: $AMEND_CACHE, else ~/.cache/amend. */
        const char *cache = getenv("AMEND_CACHE");
        const char *home = getenv("HOME");
        if (cache && *cache)
            snprintf(default_path, sizeof default_path, "%s/gemma3-270m-q4_k_m.gguf", cache);
        else
            snprintf(default_path, sizeof default_path, "%s/.cache/amend/gemma3-270m-q4_k_m.gguf",
                     home ? home : ".");
        model_path = default_path;
    }
    printf("amend %s (ABI %u)\n", amend_version(), amend_abi_version());

    amend_model *model = NULL;
    check(amend_model_open(model_path, NULL, &model), "amend_model_open");
    char desc[128];
    check(amend_model_description(model, desc, sizeof desc, NULL), "amend_model_description");
    amend_model_info info;
    check(amend_model_get_info(model, &info), "amend_model_get_info");
    printf("model: %s (%u layers, n_embd %u)\n", desc, info.n_layer, info.n_embd);

    amend_session *session = NULL;
    check(amend_session_open(model, NULL, &session), "amend_session_open");
    if (scope_path) {
        amend_scope_model *scope = NULL;
        check(amend_scope_model_open(scope_path, 0, &scope), "amend_scope_model_open");
        check(amend_session_set_scope_model(session, scope), "amend_session_set_scope_model");
        amend_scope_model_free(scope); /* the session keeps it alive */
    }
    generate(session, "before", prompt, &params);

    amend_trust_store *trust = NULL;
    amend_bundle *bundle = NULL;
    if (bundle_path) {
        uint8_t key[AMEND_PUBLIC_KEY_LEN];
        if (!key_hex || parse_hex_key(key_hex, key) != 0) {
            fprintf(stderr, "amend_demo: --bundle needs --key with 64 hex digits\n");
            return 2;
        }
        check(amend_trust_store_new(key, 1, &trust), "amend_trust_store_new");
        check(amend_bundle_load_file(trust, model, bundle_path, &bundle), "amend_bundle_load_file");
        amend_bundle_info bi;
        check(amend_bundle_get_info(bundle, &bi), "amend_bundle_get_info");
        char id[256];
        check(amend_bundle_id(bundle, id, sizeof id, NULL), "amend_bundle_id");
        printf("bundle %s: %u edits\n", id, bi.n_edits);
        check(amend_session_activate(session, bundle), "amend_session_activate");
        generate(session, "after ", prompt, &params);

        check(amend_session_rollback_bundle(session, id), "amend_session_rollback_bundle");
        generate(session, "rolled back", prompt, &params);
    } else {
        printf("(no --bundle given: nothing to apply)\n");
    }

    /* Free in any order; each free accepts NULL. */
    amend_session_free(session);
    amend_bundle_free(bundle);
    amend_trust_store_free(trust);
    amend_model_free(model);
    return 0;
}
