/*
 * JNI shim: dev.amend.Native over the amend C ABI. Handles travel as jlong. Every failing
 * amend call becomes a dev.amend.AmendException(code, name, message). Strings arrive as UTF-8
 * byte arrays (not JNI "modified UTF-8"), so amend's own UTF-8 check sees the real bytes.
 */
#include <jni.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "amend.h"

#define H(p) ((void *)(uintptr_t)(p))
#define J(p) ((jlong)(uintptr_t)(p))

/* A Java String of `n` bytes of UTF-8 (not JNI's modified UTF-8, which NewStringUTF wants:
 * a 4-byte character, as in an id or a path amend quotes, is not valid there). */
static jstring utf8_string(JNIEnv *env, const char *s, size_t n) {
    jbyteArray bytes = (*env)->NewByteArray(env, (jsize)n);
    if (!bytes) return NULL;
    (*env)->SetByteArrayRegion(env, bytes, 0, (jsize)n, (const jbyte *)s);
    jclass str = (*env)->FindClass(env, "java/lang/String");
    jmethodID ctor = str ? (*env)->GetMethodID(env, str, "<init>", "([BLjava/lang/String;)V") : NULL;
    jstring cs = (*env)->NewStringUTF(env, "UTF-8");
    jstring out = (ctor && cs) ? (jstring)(*env)->NewObject(env, str, ctor, bytes, cs) : NULL;
    (*env)->DeleteLocalRef(env, bytes);
    if (str) (*env)->DeleteLocalRef(env, str);
    if (cs) (*env)->DeleteLocalRef(env, cs);
    return out;
}

static void throw_amend_msg(JNIEnv *env, amend_result r, const char *message) {
    jclass cls = (*env)->FindClass(env, "dev/amend/AmendException");
    if (!cls) return;
    jmethodID ctor = (*env)->GetMethodID(env, cls, "<init>", "(ILjava/lang/String;Ljava/lang/String;)V");
    if (!ctor) return;
    jstring name = (*env)->NewStringUTF(env, amend_result_name(r));
    jstring msg = utf8_string(env, message, strlen(message));
    if (!name || !msg) return;
    jobject ex = (*env)->NewObject(env, cls, ctor, (jint)r, name, msg);
    if (ex) (*env)->Throw(env, (jthrowable)ex);
}

static void throw_amend(JNIEnv *env, amend_result r) {
    throw_amend_msg(env, r, amend_last_error());
}

static void throw_iae(JNIEnv *env, const char *what) {
    jclass cls = (*env)->FindClass(env, "java/lang/IllegalArgumentException");
    if (cls) (*env)->ThrowNew(env, cls, what);
}

/* Returns nonzero (and throws) on failure. */
static int check(JNIEnv *env, amend_result r) {
    if (r == AMEND_OK) return 0;
    throw_amend(env, r);
    return 1;
}

static void throw_npe(JNIEnv *env, const char *what) {
    jclass cls = (*env)->FindClass(env, "java/lang/NullPointerException");
    if (cls) (*env)->ThrowNew(env, cls, what);
}

/* A malloc'd copy of a byte[] with a NUL after it (NULL + exception on failure). */
static char *bytes_of(JNIEnv *env, jbyteArray a, const char *what) {
    if (!a) {
        throw_npe(env, what);
        return NULL;
    }
    jsize n = (*env)->GetArrayLength(env, a);
    char *s = malloc((size_t)n + 1);
    if (!s) {
        jclass cls = (*env)->FindClass(env, "java/lang/OutOfMemoryError");
        if (cls) (*env)->ThrowNew(env, cls, what);
        return NULL;
    }
    (*env)->GetByteArrayRegion(env, a, 0, n, (jbyte *)s);
    s[n] = 0;
    return s;
}

/* A byte[] for a NUL-terminated C parameter (a path, an id, an option): one with a NUL byte
 * is refused (ERR_INVALID_ARGUMENT), since C would act on the part before it (another file,
 * another bundle). */
static char *cstr_of(JNIEnv *env, jbyteArray a, const char *what) {
    char *s = bytes_of(env, a, what);
    if (!s) return NULL;
    size_t n = (size_t)(*env)->GetArrayLength(env, a);
    if (strlen(s) != n) {
        char msg[160];
        snprintf(msg, sizeof msg, "%s contains a NUL byte (at byte %zu)", what, strlen(s));
        free(s);
        throw_amend_msg(env, AMEND_ERR_INVALID_ARGUMENT, msg);
        return NULL;
    }
    return s;
}

/* A count that C takes unsigned: a negative one is refused, not clamped or wrapped. */
static int negative(JNIEnv *env, jint v, const char *what) {
    if (v >= 0) return 0;
    char msg[160];
    snprintf(msg, sizeof msg, "%s is %d: it must not be negative", what, (int)v);
    throw_iae(env, msg);
    return 1;
}


/* A string accessor of the amend (buf, buf_len, out_len) kind; `index` is ignored by
 * accessors that take none. Wrappers keep every call through its exact C prototype. */
typedef amend_result (*getter_t)(const void *h, size_t index, char *buf, size_t len, size_t *out_len);

static amend_result g_model_description(const void *h, size_t i, char *b, size_t n, size_t *o) {
    (void)i;
    return amend_model_description((const amend_model *)h, b, n, o);
}
static amend_result g_bundle_id(const void *h, size_t i, char *b, size_t n, size_t *o) {
    (void)i;
    return amend_bundle_id((const amend_bundle *)h, b, n, o);
}
static amend_result g_bundle_edit_id(const void *h, size_t i, char *b, size_t n, size_t *o) {
    return amend_bundle_edit_id((const amend_bundle *)h, i, b, n, o);
}
static amend_result g_active_bundle_id(const void *h, size_t i, char *b, size_t n, size_t *o) {
    return amend_session_active_bundle_id((const amend_session *)h, i, b, n, o);
}

/* Size query, copy, then a Java String decoded as UTF-8 (not modified UTF-8). */
static jstring string_out(JNIEnv *env, getter_t fn, const void *h, size_t index) {
    size_t n = 0;
    amend_result r = fn(h, index, NULL, 0, &n);
    if (r != AMEND_OK && r != AMEND_ERR_BUFFER_TOO_SMALL) {
        throw_amend(env, r);
        return NULL;
    }
    char *buf = malloc(n + 1);
    if (!buf) return NULL;
    jstring s = NULL;
    if (!check(env, fn(h, index, buf, n + 1, NULL))) s = utf8_string(env, buf, n);
    free(buf);
    return s;
}

JNIEXPORT jstring JNICALL Java_dev_amend_Native_version(JNIEnv *env, jclass c) {
    (void)c;
    return (*env)->NewStringUTF(env, amend_version());
}

JNIEXPORT jstring JNICALL Java_dev_amend_Native_resultName(JNIEnv *env, jclass c, jint code) {
    (void)c;
    return (*env)->NewStringUTF(env, amend_result_name((int32_t)code));
}

JNIEXPORT jint JNICALL Java_dev_amend_Native_abiVersion(JNIEnv *env, jclass c) {
    (void)env, (void)c;
    return (jint)amend_abi_version();
}

JNIEXPORT jlong JNICALL Java_dev_amend_Native_liveHandles(JNIEnv *env, jclass c) {
    (void)env, (void)c;
    return (jlong)amend_live_handles();
}

JNIEXPORT jlong JNICALL Java_dev_amend_Native_modelOpen(JNIEnv *env, jclass c, jbyteArray path,
                                                        jboolean use_mmap, jint n_threads,
                                                        jint backend, jbyteArray ep,
                                                        jbyteArray ort_library,
                                                        jbyteArray edit_slots,
                                                        jboolean cpu_fallback,
                                                        jlong static_chunk,
                                                        jlong static_window,
                                                        jbyteArray ep_options,
                                                        jboolean private_copy) {
    (void)c;
    if (negative(env, n_threads, "nThreads")) return 0;
    /* Optional strings: a null array is the C NULL default. */
    char *p = cstr_of(env, path, "path");
    char *e = (p && ep && !(*env)->ExceptionCheck(env)) ? cstr_of(env, ep, "ep") : NULL;
    char *l = (p && ort_library && !(*env)->ExceptionCheck(env)) ? cstr_of(env, ort_library, "ortLibrary") : NULL;
    char *s = (p && edit_slots && !(*env)->ExceptionCheck(env)) ? cstr_of(env, edit_slots, "editSlots") : NULL;
    char *o = (p && ep_options && !(*env)->ExceptionCheck(env)) ? cstr_of(env, ep_options, "epOptions") : NULL;
    amend_model *m = NULL;
    if (p && !(*env)->ExceptionCheck(env)) {
        amend_model_params mp = amend_model_default_params();
        mp.use_mmap = use_mmap;
        mp.n_threads = (uint32_t)n_threads;
        /* A negative number stays out of range: amend refuses it (ERR_INVALID_ARGUMENT). */
        mp.backend = (amend_backend)(uint32_t)backend;
        mp.ep = e;
        mp.ort_library = l;
        mp.edit_slots = s;
        mp.cpu_fallback = cpu_fallback;
        /* A negative size becomes a huge one: amend refuses it (ERR_INVALID_ARGUMENT). */
        mp.static_chunk = (size_t)static_chunk;
        mp.static_window = (size_t)static_window;
        mp.ep_options = o;
        mp.private_copy = private_copy;
        check(env, amend_model_open(p, &mp, &m));
    }
    free(p);
    free(e);
    free(l);
    free(s);
    free(o);
    return J(m);
}

/* The path goes through amend_scope_model_open_bytes: its exact bytes, UTF-8 or not. */
JNIEXPORT jlong JNICALL Java_dev_amend_Native_scopeModelOpen(JNIEnv *env, jclass c,
                                                             jbyteArray path, jint n_threads) {
    (void)c;
    if (negative(env, n_threads, "nThreads")) return 0;
    /* A NUL inside is amend's to refuse (amend_scope_model_open_bytes). */
    char *p = bytes_of(env, path, "path");
    if (!p) return 0;
    size_t n = (size_t)(*env)->GetArrayLength(env, path);
    amend_scope_model *m = NULL;
    amend_result r = amend_scope_model_open_bytes((const uint8_t *)p, n, (uint32_t)n_threads, &m);
    free(p);
    check(env, r);
    return J(m);
}

JNIEXPORT void JNICALL Java_dev_amend_Native_scopeModelFree(JNIEnv *env, jclass c, jlong m) {
    (void)env, (void)c;
    amend_scope_model_free(H(m));
}

/* m == 0: no scope model. */
JNIEXPORT void JNICALL Java_dev_amend_Native_sessionSetScopeModel(JNIEnv *env, jclass c, jlong s,
                                                                  jlong m) {
    (void)c;
    check(env, amend_session_set_scope_model(H(s), H(m)));
}

JNIEXPORT void JNICALL Java_dev_amend_Native_modelFree(JNIEnv *env, jclass c, jlong m) {
    (void)env, (void)c;
    amend_model_free(H(m));
}

JNIEXPORT jstring JNICALL Java_dev_amend_Native_modelDescription(JNIEnv *env, jclass c, jlong m) {
    (void)c;
    return string_out(env, g_model_description, H(m), 0);
}

JNIEXPORT jintArray JNICALL Java_dev_amend_Native_modelInfo(JNIEnv *env, jclass c, jlong m) {
    (void)c;
    amend_model_info i;
    if (check(env, amend_model_get_info(H(m), &i))) return NULL;
    jint v[9] = {(jint)i.n_layer, (jint)i.n_embd,    (jint)i.n_ff,        (jint)i.n_head, (jint)i.n_head_kv,
                 (jint)i.n_vocab, (jint)i.n_ctx_train, (jint)i.bos, (jint)i.eos};
    jintArray a = (*env)->NewIntArray(env, 9);
    if (a) (*env)->SetIntArrayRegion(env, a, 0, 9, v);
    return a;
}

JNIEXPORT jlong JNICALL Java_dev_amend_Native_trustStoreNew(JNIEnv *env, jclass c, jbyteArray keys,
                                                            jint n_keys) {
    (void)c;
    if (!keys) {
        throw_npe(env, "keys");
        return 0;
    }
    jsize len = (*env)->GetArrayLength(env, keys);
    if (n_keys < 0 || (size_t)len < (size_t)n_keys * AMEND_PUBLIC_KEY_LEN) {
        jclass cls = (*env)->FindClass(env, "java/lang/IllegalArgumentException");
        if (cls) (*env)->ThrowNew(env, cls, "keys is shorter than n_keys * 32 bytes");
        return 0;
    }
    jbyte *k = (*env)->GetByteArrayElements(env, keys, NULL);
    amend_trust_store *t = NULL;
    amend_result r = amend_trust_store_new((const uint8_t *)k, (size_t)n_keys, &t);
    (*env)->ReleaseByteArrayElements(env, keys, k, JNI_ABORT);
    check(env, r);
    return J(t);
}

JNIEXPORT void JNICALL Java_dev_amend_Native_trustStoreFree(JNIEnv *env, jclass c, jlong t) {
    (void)env, (void)c;
    amend_trust_store_free(H(t));
}

JNIEXPORT jlong JNICALL Java_dev_amend_Native_bundleLoadFile(JNIEnv *env, jclass c, jlong t, jlong m,
                                                             jbyteArray path) {
    (void)c;
    /* The path's exact bytes: amend refuses a NUL inside (amend_bundle_load_file_bytes). */
    char *p = bytes_of(env, path, "path");
    if (!p) return 0;
    amend_bundle *b = NULL;
    size_t n = (size_t)(*env)->GetArrayLength(env, path);
    amend_result r = amend_bundle_load_file_bytes(H(t), H(m), (const uint8_t *)p, n, &b);
    free(p);
    check(env, r);
    return J(b);
}

JNIEXPORT jlong JNICALL Java_dev_amend_Native_bundleLoadMemory(JNIEnv *env, jclass c, jlong t, jlong m,
                                                               jbyteArray data) {
    (void)c;
    if (!data) {
        throw_npe(env, "data");
        return 0;
    }
    jsize n = (*env)->GetArrayLength(env, data);
    jbyte *d = (*env)->GetByteArrayElements(env, data, NULL);
    amend_bundle *b = NULL;
    amend_result r = amend_bundle_load_memory(H(t), H(m), (const uint8_t *)d, (size_t)n, &b);
    (*env)->ReleaseByteArrayElements(env, data, d, JNI_ABORT);
    check(env, r);
    return J(b);
}

JNIEXPORT void JNICALL Java_dev_amend_Native_bundleFree(JNIEnv *env, jclass c, jlong b) {
    (void)env, (void)c;
    amend_bundle_free(H(b));
}

JNIEXPORT jstring JNICALL Java_dev_amend_Native_bundleId(JNIEnv *env, jclass c, jlong b) {
    (void)c;
    return string_out(env, g_bundle_id, H(b), 0);
}

JNIEXPORT jint JNICALL Java_dev_amend_Native_bundleEditCount(JNIEnv *env, jclass c, jlong b) {
    (void)c;
    amend_bundle_info i;
    if (check(env, amend_bundle_get_info(H(b), &i))) return 0;
    return (jint)i.n_edits;
}

JNIEXPORT jstring JNICALL Java_dev_amend_Native_bundleEditId(JNIEnv *env, jclass c, jlong b, jint index) {
    (void)c;
    return string_out(env, g_bundle_edit_id, H(b), index < 0 ? SIZE_MAX : (size_t)index);
}

JNIEXPORT jlong JNICALL Java_dev_amend_Native_sessionOpen(JNIEnv *env, jclass c, jlong m, jint n_ctx,
                                                          jint n_threads) {
    (void)c;
    if (negative(env, n_ctx, "nCtx") || negative(env, n_threads, "nThreads")) return 0;
    amend_session_params sp = amend_session_default_params();
    if (n_ctx > 0) sp.n_ctx = (uint32_t)n_ctx;
    sp.n_threads = (uint32_t)n_threads;
    amend_session *s = NULL;
    check(env, amend_session_open(H(m), &sp, &s));
    return J(s);
}

JNIEXPORT void JNICALL Java_dev_amend_Native_sessionFree(JNIEnv *env, jclass c, jlong s) {
    (void)env, (void)c;
    amend_session_free(H(s));
}

JNIEXPORT void JNICALL Java_dev_amend_Native_sessionActivate(JNIEnv *env, jclass c, jlong s, jlong b) {
    (void)c;
    check(env, amend_session_activate(H(s), H(b)));
}

JNIEXPORT void JNICALL Java_dev_amend_Native_sessionRollbackBundle(JNIEnv *env, jclass c, jlong s,
                                                                   jbyteArray id) {
    (void)c;
    char *p = cstr_of(env, id, "bundleId");
    if (!p) return;
    amend_result r = amend_session_rollback_bundle(H(s), p);
    free(p);
    check(env, r);
}

JNIEXPORT void JNICALL Java_dev_amend_Native_sessionRollbackEdit(JNIEnv *env, jclass c, jlong s,
                                                                 jbyteArray id) {
    (void)c;
    char *p = cstr_of(env, id, "editId");
    if (!p) return;
    amend_result r = amend_session_rollback_edit(H(s), p);
    free(p);
    check(env, r);
}

JNIEXPORT void JNICALL Java_dev_amend_Native_sessionSetLoraScale(JNIEnv *env, jclass c, jlong s,
                                                                 jbyteArray id, jfloat scale) {
    (void)c;
    char *p = cstr_of(env, id, "bundleId");
    if (!p) return;
    amend_result r = amend_session_set_lora_scale(H(s), p, scale);
    free(p);
    check(env, r);
}

JNIEXPORT jobjectArray JNICALL Java_dev_amend_Native_sessionActiveBundles(JNIEnv *env, jclass c, jlong s) {
    (void)c;
    size_t n = 0;
    if (check(env, amend_session_active_bundle_count(H(s), &n))) return NULL;
    jclass str = (*env)->FindClass(env, "java/lang/String");
    jobjectArray out = (*env)->NewObjectArray(env, (jsize)n, str, NULL);
    for (size_t i = 0; out && i < n; i++) {
        jstring id = string_out(env, g_active_bundle_id, H(s), i);
        if (!id) return NULL;
        (*env)->SetObjectArrayElement(env, out, (jsize)i, id);
    }
    return out;
}

typedef struct {
    JNIEnv *env;
    jclass cls;
    jmethodID ctor;
    jobject list; /* java.util.ArrayList */
    jmethodID add;
} explain_t;

static bool explain_cb(void *user_data, const amend_edit_activity *a) {
    explain_t *e = (explain_t *)user_data;
    JNIEnv *env = e->env;
    jstring b = utf8_string(env, a->bundle_id, strlen(a->bundle_id));
    jstring id = utf8_string(env, a->edit_id, strlen(a->edit_id));
    jstring f = utf8_string(env, a->family, strlen(a->family));
    if (!b || !id || !f) return false;
    jobject o = (*env)->NewObject(env, e->cls, e->ctor, b, id, f, (jint)a->layer, (jint)a->n_fired,
                                  (jint)a->n_checked);
    if (!o) return false;
    (*env)->CallBooleanMethod(env, e->list, e->add, o);
    if ((*env)->ExceptionCheck(env)) return false;
    (*env)->DeleteLocalRef(env, o);
    (*env)->DeleteLocalRef(env, b);
    (*env)->DeleteLocalRef(env, id);
    (*env)->DeleteLocalRef(env, f);
    return !(*env)->ExceptionCheck(env);
}

JNIEXPORT jobjectArray JNICALL Java_dev_amend_Native_sessionExplain(JNIEnv *env, jclass c, jlong s) {
    (void)c;
    explain_t e = {env, NULL, NULL, NULL, NULL};
    e.cls = (*env)->FindClass(env, "dev/amend/EditActivity");
    if (!e.cls) return NULL;
    e.ctor = (*env)->GetMethodID(env, e.cls, "<init>",
                                 "(Ljava/lang/String;Ljava/lang/String;Ljava/lang/String;III)V");
    jclass list_cls = (*env)->FindClass(env, "java/util/ArrayList");
    if (!e.ctor || !list_cls) return NULL;
    jmethodID list_ctor = (*env)->GetMethodID(env, list_cls, "<init>", "()V");
    e.add = (*env)->GetMethodID(env, list_cls, "add", "(Ljava/lang/Object;)Z");
    e.list = list_ctor ? (*env)->NewObject(env, list_cls, list_ctor) : NULL;
    if (!e.list || !e.add) return NULL;
    amend_result r = amend_session_explain(H(s), explain_cb, &e);
    if ((*env)->ExceptionCheck(env) || check(env, r)) return NULL;
    jmethodID size = (*env)->GetMethodID(env, list_cls, "size", "()I");
    jmethodID get = (*env)->GetMethodID(env, list_cls, "get", "(I)Ljava/lang/Object;");
    if (!size || !get) return NULL;
    jint n = (*env)->CallIntMethod(env, e.list, size);
    if ((*env)->ExceptionCheck(env)) return NULL;
    jobjectArray out = (*env)->NewObjectArray(env, n, e.cls, NULL);
    for (jint i = 0; out && i < n; i++) {
        jobject o = (*env)->CallObjectMethod(env, e.list, get, i);
        if ((*env)->ExceptionCheck(env)) return NULL;
        (*env)->SetObjectArrayElement(env, out, i, o);
        (*env)->DeleteLocalRef(env, o);
    }
    return out;
}

typedef struct {
    JNIEnv *env;
    jobject sink;
    jmethodID on_token;
} sink_t;

static bool token_cb(void *user_data, amend_token token, const char *text, size_t len) {
    sink_t *s = (sink_t *)user_data;
    JNIEnv *env = s->env;
    if ((*env)->ExceptionCheck(env)) return false;
    jbyteArray bytes = (*env)->NewByteArray(env, (jsize)len);
    if (!bytes) return false;
    (*env)->SetByteArrayRegion(env, bytes, 0, (jsize)len, (const jbyte *)text);
    jboolean go_on = (*env)->CallBooleanMethod(env, s->sink, s->on_token, (jint)token, bytes);
    (*env)->DeleteLocalRef(env, bytes);
    /* A Java exception stops generation; it propagates when the native method returns. */
    if ((*env)->ExceptionCheck(env)) return false;
    return go_on == JNI_TRUE;
}

JNIEXPORT jintArray JNICALL Java_dev_amend_Native_sessionGenerate(JNIEnv *env, jclass c, jlong s,
                                                                  jbyteArray prompt, jint max_tokens,
                                                                  jfloat temperature, jint top_k,
                                                                  jfloat top_p, jfloat min_p, jint seed,
                                                                  jboolean stop_at_eos, jobject sink) {
    (void)c;
    if (!prompt) {
        throw_npe(env, "prompt");
        return NULL;
    }
    if (negative(env, max_tokens, "maxTokens") || negative(env, top_k, "topK")) return NULL;
    amend_generate_params gp = amend_generate_default_params();
    gp.max_tokens = (uint32_t)max_tokens;
    gp.temperature = temperature;
    gp.top_k = (uint32_t)top_k;
    gp.top_p = top_p;
    gp.min_p = min_p;
    gp.seed = (uint32_t)seed;
    gp.stop_at_eos = stop_at_eos == JNI_TRUE;
    sink_t st = {env, sink, NULL};
    if (sink) {
        jclass cls = (*env)->GetObjectClass(env, sink);
        st.on_token = (*env)->GetMethodID(env, cls, "onToken", "(I[B)Z");
        if (!st.on_token) return NULL;
    }
    jsize n = (*env)->GetArrayLength(env, prompt);
    char *p = malloc((size_t)n + 1);
    if (!p) return NULL;
    (*env)->GetByteArrayRegion(env, prompt, 0, n, (jbyte *)p);
    amend_generation g;
    memset(&g, 0, sizeof g);
    amend_result r = amend_session_generate(H(s), p, (size_t)n, &gp, sink ? token_cb : NULL, &st, &g);
    free(p);
    if ((*env)->ExceptionCheck(env)) return NULL;
    if (check(env, r)) return NULL;
    jint v[3] = {(jint)g.n_prompt_tokens, (jint)g.n_generated, (jint)g.stop_reason};
    jintArray a = (*env)->NewIntArray(env, 3);
    if (a) (*env)->SetIntArrayRegion(env, a, 0, 3, v);
    return a;
}

JNIEXPORT void JNICALL Java_dev_amend_Native_sessionCancel(JNIEnv *env, jclass c, jlong s) {
    (void)c;
    check(env, amend_session_cancel(H(s)));
}

JNIEXPORT jdoubleArray JNICALL Java_dev_amend_Native_sessionScore(JNIEnv *env, jclass c, jlong s,
                                                                  jbyteArray prompt, jbyteArray target) {
    (void)c;
    char *p = bytes_of(env, prompt, "prompt");
    if (!p) return NULL;
    char *t = bytes_of(env, target, "target");
    if (!t) {
        free(p);
        return NULL;
    }
    amend_score sc;
    amend_result r = amend_session_score(H(s), p, (size_t)(*env)->GetArrayLength(env, prompt), t,
                                         (size_t)(*env)->GetArrayLength(env, target), &sc);
    free(p);
    free(t);
    if (check(env, r)) return NULL;
    jdouble v[4] = {sc.n_target_tokens, sc.logprob_sum, sc.logprob_mean, sc.n_argmax_match};
    jdoubleArray a = (*env)->NewDoubleArray(env, 4);
    if (a) (*env)->SetDoubleArrayRegion(env, a, 0, 4, v);
    return a;
}
