package dev.amend;

import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.Paths;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.List;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.TimeUnit;

/**
 * Tests of the Java binding against libamend (no JUnit on these machines: a small runner that
 * ends with "N passed, N failed"). Needs AMEND_MODEL; AMEND_TEST_BUNDLES and
 * AMEND_REFERENCE_BIN enable the bundle and Rust-parity tests.
 */
public final class AmendTest {
    private static int passed, failed;
    private static final String PROMPT = "The capital of France is";

    interface Body { void run() throws Exception; }

    private static void test(String name, Body body) {
        try {
            body.run();
            passed++;
            System.out.println("ok   " + name);
        } catch (Throwable t) {
            failed++;
            System.out.println("FAIL " + name + ": " + t);
            t.printStackTrace(System.out);
        }
    }

    private static void check(boolean cond, String what) {
        if (!cond) throw new AssertionError(what);
    }

    private static AmendException expect(int code, Body body) throws Exception {
        try {
            body.run();
        } catch (AmendException e) {
            check(e.code() == code, "expected code " + code + ", got " + e.code() + " " + e.getMessage());
            return e;
        }
        throw new AssertionError("expected AmendException " + code);
    }

    /** This process's memory mappings (Linux). */
    private static String maps() throws java.io.IOException {
        return new String(Files.readAllBytes(Paths.get("/proc/self/maps")), StandardCharsets.UTF_8);
    }

    public static void main(String[] args) throws Exception {
        String model = System.getenv("AMEND_MODEL");
        check(model != null && Files.isRegularFile(Paths.get(model)), "AMEND_MODEL must name the model file");
        String bundles = System.getenv("AMEND_TEST_BUNDLES");
        String reference = System.getenv("AMEND_REFERENCE_BIN");

        test("version", () -> check(Amend.version().split("\\.").length == 3 && Amend.abiVersion() == 2, Amend.version()));
        test("Result constants match amend_result_name", () -> {
            // Every code the library names is a Result constant of that name, and back.
            java.util.Map<Integer, String> lib = new java.util.TreeMap<>();
            for (int code = -1; code < 1000; code++) {
                String name = Native.resultName(code);
                if (!name.equals("AMEND_UNKNOWN_RESULT")) lib.put(code, name);
            }
            java.util.Map<Integer, String> ours = new java.util.TreeMap<>();
            for (java.lang.reflect.Field f : Result.class.getFields()) {
                ours.put(f.getInt(null), "AMEND_" + f.getName());
            }
            check(lib.equals(ours), "library " + lib + " vs Result.java " + ours);
        });
        test("missing model", () -> {
            AmendException e = expect(Result.ERR_IO, () -> new Model("/nonexistent/model.gguf"));
            check(e.getMessage().contains("not found"), e.getMessage());
            check(e.codeName().equals("AMEND_ERR_IO"), e.codeName());
        });

        test("backend choice", () -> {
            expect(Result.ERR_INVALID_ARGUMENT, () -> new Model(model, new ModelOptions().backend(7)));
            expect(Result.ERR_INVALID_ARGUMENT, () -> new Model(model,
                    new ModelOptions().backend(ModelOptions.BACKEND_ONNXRUNTIME).editSlots("cb:nope")));
            // Provider options reach amend: the CPU EP takes none (refused before any library loads).
            expect(Result.ERR_INVALID_ARGUMENT, () -> new Model(model,
                    new ModelOptions().backend(ModelOptions.BACKEND_ONNXRUNTIME).epOption("num_of_threads", "1")));
            String cache = System.getenv("AMEND_CACHE");
            if (cache == null || cache.isEmpty()) cache = System.getProperty("user.home") + "/.cache/amend";
            String lib = System.getenv("AMEND_ORT_LIB");
            if (lib == null) lib = cache + "/ort/cpu/libonnxruntime.so.1.32.0";
            if (!new java.io.File(lib).exists()) {
                if ("1".equals(System.getenv("AMEND_REQUIRE_MODEL"))) throw new AssertionError(lib + " missing (make ort)");
                System.out.println("  (skipped: " + lib + " missing)");
                return;
            }
            // The same greedy tokens on ONNX Runtime (CPU EP) as on llama.cpp.
            GenerateOptions g = new GenerateOptions().maxTokens(4);
            try (Model o = new Model(model, new ModelOptions().backend(ModelOptions.BACKEND_ONNXRUNTIME).ep("cpu").nThreads(1));
                 Session so = new Session(o, 256, 0);
                 Model l = new Model(model);
                 Session sl = new Session(l, 256, 0)) {
                List<Integer> got = so.generate(PROMPT, g).tokens, want = sl.generate(PROMPT, g).tokens;
                check(got.equals(want), got + " vs " + want);
                // Fixed shapes: the same tokens; a context beyond the window is refused.
                try (Model st = new Model(model, new ModelOptions().backend(ModelOptions.BACKEND_ONNXRUNTIME)
                        .nThreads(1).staticShapes(16, 256))) {
                    expect(Result.ERR_INVALID_ARGUMENT, () -> new Session(st, 512, 0));
                    try (Session ss = new Session(st, 256, 0)) {
                        List<Integer> fixed = ss.generate(PROMPT, g).tokens;
                        check(fixed.equals(want), fixed + " vs " + want);
                    }
                }
                expect(Result.ERR_INVALID_ARGUMENT, () -> new Model(model,
                        new ModelOptions().backend(ModelOptions.BACKEND_ONNXRUNTIME).staticShapes(16, 0)));
            }
        });

        test("privateCopy: a sealed copy the file's rewrites cannot reach, or the mapped file", () -> {
            Path file = Files.createTempFile("amend-java-", ".gguf");
            try {
                Files.copy(Paths.get(model), file, java.nio.file.StandardCopyOption.REPLACE_EXISTING);
                GenerateOptions g = new GenerateOptions().maxTokens(6).stopAtEos(false);
                List<Integer> mapped;
                try (Model m = new Model(file.toString(), new ModelOptions().privateCopy(false));
                     Session s = new Session(m, 256, 0)) {
                    check(maps().contains(file.toString()), "privateCopy(false): llama.cpp maps the file");
                    mapped = s.generate(PROMPT, g).tokens;
                }
                try (Model m = new Model(file.toString(), new ModelOptions());
                     Session s = new Session(m, 256, 0)) {
                    check(!maps().contains(file.toString()), "the default maps a private copy, not the file");
                    List<Integer> before = s.generate(PROMPT, g).tokens;
                    check(before.equals(mapped), before + " vs " + mapped);
                    // Truncated under the open model: a mapped file would end the JVM with SIGBUS.
                    try (java.io.RandomAccessFile f = new java.io.RandomAccessFile(file.toFile(), "rw")) {
                        f.setLength(f.length() / 2);
                    }
                    List<Integer> after = s.generate(PROMPT, g).tokens;
                    check(after.equals(before), after + " vs " + before);
                }
            } finally {
                Files.deleteIfExists(file);
            }
        });

        try (Model m = new Model(model); Session s = new Session(m, 512, 0)) {
            test("model info", () -> check(m.nLayer() == 18 && m.nEmbd() == 640 && m.description().contains("gemma3"), m.description()));
            test("greedy deterministic", () -> {
                GenerateOptions o = new GenerateOptions().maxTokens(8).stopAtEos(false);
                Generation a = s.generate(PROMPT, o), b = s.generate(PROMPT, o);
                check(a.tokens.size() == 8 && a.tokens.equals(b.tokens) && a.text.equals(b.text), a.text + " vs " + b.text);
                check(a.stopReason == Generation.STOP_MAX_TOKENS, "stop " + a.stopReason);
            });
            test("listener stops generation", () -> {
                List<Integer> seen = new ArrayList<>();
                Generation g = s.generate(PROMPT, new GenerateOptions().maxTokens(16).stopAtEos(false),
                        (t, text) -> { seen.add(t); return seen.size() < 3; });
                check(seen.size() == 3 && g.stopReason == Generation.STOP_CALLBACK, "seen " + seen);
            });
            test("listener exception propagates", () -> {
                try {
                    s.generate(PROMPT, new GenerateOptions().maxTokens(4), (t, text) -> { throw new IllegalStateException("boom"); });
                    throw new AssertionError("no exception");
                } catch (IllegalStateException e) {
                    check(e.getMessage().equals("boom"), e.getMessage());
                }
                check(s.generate(PROMPT, new GenerateOptions().maxTokens(1).stopAtEos(false)).tokens.size() == 1, "usable after");
            });
            test("re-entry is busy", () -> {
                List<Integer> codes = new ArrayList<>();
                s.generate(PROMPT, new GenerateOptions().maxTokens(4), (t, text) -> {
                    try { s.generate("x", new GenerateOptions().maxTokens(1)); } catch (AmendException e) { codes.add(e.code()); }
                    return false;
                });
                check(codes.equals(Arrays.asList(Result.ERR_BUSY)), "codes " + codes);
            });
            test("cancel from another thread", () -> {
                CountDownLatch started = new CountDownLatch(1);
                Thread t = new Thread(() -> {
                    try { started.await(60, TimeUnit.SECONDS); } catch (InterruptedException e) { return; }
                    s.cancel();
                });
                t.start();
                expect(Result.ERR_CANCELLED, () -> s.generate(PROMPT, new GenerateOptions().maxTokens(400).stopAtEos(false),
                        (tok, text) -> { started.countDown(); return true; }));
                t.join();
            });
            test("bad UTF-8 prompt", () -> {
                byte[] bad = "The capital of \u00c3( is".getBytes(StandardCharsets.ISO_8859_1);
                AmendException e = expect(Result.ERR_INVALID_UTF8, () -> s.generate(bad, new GenerateOptions().maxTokens(2), null));
                check(e.getMessage().contains("byte 15"), e.getMessage());
            });
            test("score", () -> {
                Score paris = s.score(PROMPT, " Paris"), banana = s.score(PROMPT, " banana");
                check(paris.nTargetTokens >= 1 && paris.logprobSum < 0 && paris.logprobSum > banana.logprobSum,
                        paris.logprobSum + " vs " + banana.logprobSum);
            });
            test("forged handle", () -> expect(Result.ERR_INVALID_HANDLE, () -> Native.sessionCancel(0xdead0L)));
            test("null handle", () -> expect(Result.ERR_NULL_ARGUMENT, () -> Native.sessionCancel(0L)));
            test("rollback unknown bundle", () -> expect(Result.ERR_NOT_FOUND, () -> s.rollbackBundle("nope")));
            test("LoRA scale of an unknown bundle", () -> expect(Result.ERR_NOT_FOUND, () -> s.setLoraScale("nope", 0.5f)));
            // C reads these NUL-terminated: it would act on the part before the NUL.
            test("a NUL inside a path or id is refused, not cut at", () -> {
                AmendException e = expect(Result.ERR_INVALID_ARGUMENT, () -> new Model(model + "\0.ignored"));
                check(e.getMessage().contains("NUL"), e.getMessage());
                e = expect(Result.ERR_INVALID_ARGUMENT, () -> s.rollbackBundle("nope\0tail"));
                check(e.getMessage().contains("bundleId contains a NUL byte (at byte 4)"), e.getMessage());
                expect(Result.ERR_INVALID_ARGUMENT, () -> s.rollbackEdit("nope\0tail"));
                // RFC 8032 test vector 1: a valid ed25519 public key.
                byte[] rfc = {(byte) 0xd7, 0x5a, (byte) 0x98, 0x01, (byte) 0x82, (byte) 0xb1, 0x0a, (byte) 0xb7,
                    (byte) 0xd5, 0x4b, (byte) 0xfe, (byte) 0xd3, (byte) 0xc9, 0x64, 0x07, 0x3a, 0x0e, (byte) 0xe1,
                    0x72, (byte) 0xf3, (byte) 0xda, (byte) 0xa6, 0x23, 0x25, (byte) 0xaf, 0x02, 0x1a, 0x68,
                    (byte) 0xf7, 0x07, 0x51, 0x1a};
                try (TrustStore trust = new TrustStore(rfc)) {
                    expect(Result.ERR_INVALID_ARGUMENT, () -> Bundle.loadFile(trust, m, "/nonexistent.amend\0x"));
                }
            });
            // They used to be clamped to 0: maxTokens -1 generated nothing, topK -1 turned top-k off.
            test("negative counts are refused, not clamped", () -> {
                for (Body b : new Body[] {
                        () -> s.generate(PROMPT, new GenerateOptions().maxTokens(-1)),
                        () -> s.generate(PROMPT, new GenerateOptions().maxTokens(1).topK(-1)),
                        () -> new Session(m, -1, 0),
                        () -> new Session(m, 64, -1),
                        () -> new Model(model, true, -1),
                        () -> new ScopeModel(model, -1)}) {
                    try {
                        b.run();
                        throw new AssertionError("accepted a negative count");
                    } catch (IllegalArgumentException e) {
                        check(e.getMessage().contains("must not be negative"), e.getMessage());
                    }
                }
            });
            // A message quoting a 4-byte character arrives whole (not as JNI modified UTF-8).
            test("messages keep 4-byte characters", () -> {
                AmendException e = expect(Result.ERR_NOT_FOUND, () -> s.rollbackBundle("id-\uD83D\uDE00"));
                check(e.getMessage().contains("id-\uD83D\uDE00"), e.getMessage());
            });
            if (reference != null) {
                test("same tokens as the Rust API (seed 42, temperature 0.8)", () -> {
                    Process p = new ProcessBuilder(reference, "--model", model, "--tokens", "12", "--seed", "42",
                            "--temperature", "0.8").redirectErrorStream(false).start();
                    String want;
                    try (BufferedReader r = new BufferedReader(new InputStreamReader(p.getInputStream(), StandardCharsets.UTF_8))) {
                        want = r.readLine();
                    }
                    check(p.waitFor() == 0 && want != null, "reference failed");
                    Generation g = s.generate(PROMPT, new GenerateOptions().maxTokens(12).seed(42).temperature(0.8f));
                    StringBuilder got = new StringBuilder();
                    for (int t : g.tokens) got.append(got.length() == 0 ? "" : " ").append(t);
                    check(got.toString().equals(want.trim()), "java " + got + " vs rust " + want);
                });
            }
            if (bundles != null) {
                test("bundles: load, inspect, reject", () -> {
                    byte[] key = Files.readAllBytes(Paths.get(bundles, "key.raw"));
                    try (TrustStore trust = new TrustStore(key)) {
                        try (Bundle b = Bundle.loadFile(trust, m, Paths.get(bundles, "good.amend").toString())) {
                            check(b.id().equals("test-good") && b.editCount() == 1 && b.editId(0).equals("e-paris"), b.id());
                            expect(Result.ERR_INVALID_ARGUMENT, () -> b.editId(5));
                        }
                        byte[] data = Files.readAllBytes(Paths.get(bundles, "good.amend"));
                        Bundle.loadBytes(trust, m, data).close();
                        expect(Result.ERR_BUNDLE_FORMAT, () -> Bundle.loadBytes(trust, m, Arrays.copyOf(data, 40)));
                        AmendException e = expect(Result.ERR_MODEL_MISMATCH,
                                () -> Bundle.loadFile(trust, m, Paths.get(bundles, "other-model.amend").toString()));
                        check(e.getMessage().contains("another model"), e.getMessage());
                        expect(Result.ERR_UNTRUSTED_KEY, () -> Bundle.loadFile(trust, m, Paths.get(bundles, "untrusted.amend").toString()));
                    }
                });
                test("bundles: activate, explain, roll back", () -> {
                    byte[] key = Files.readAllBytes(Paths.get(bundles, "key.raw"));
                    try (TrustStore trust = new TrustStore(key);
                         Bundle good = Bundle.loadFile(trust, m, Paths.get(bundles, "good.amend").toString())) {
                        s.activate(good);
                        expect(Result.ERR_BUNDLE_DOWNGRADE, () -> s.activate(good));
                        check(s.activeBundles().equals(Arrays.asList("test-good")), "active " + s.activeBundles());
                        s.generate(PROMPT, new GenerateOptions().maxTokens(2));
                        List<EditActivity> acts = s.explain();
                        check(acts.size() == 1 && acts.get(0).editId.equals("e-paris") && acts.get(0).nChecked > 0, "explain " + acts);
                        s.rollbackEdit("e-paris");
                        expect(Result.ERR_EDIT_CONFLICT, () -> s.rollbackEdit("e-paris"));
                        s.rollbackBundle("test-good");
                        check(s.activeBundles().isEmpty(), "active after rollback");
                    }
                });
                test("bundles: LoRA scale 0 is the base model, 1 the bundle", () -> {
                    // A session of its own: the versions of a channel only move forward in one.
                    try (Session ls = new Session(m, 256, 0);
                         TrustStore trust = new TrustStore(Files.readAllBytes(Paths.get(bundles, "key.raw")));
                         Bundle b = Bundle.loadFile(trust, m, Paths.get(bundles, "lora.amend").toString())) {
                        double base = ls.score(PROMPT, " Paris").logprobSum;
                        ls.activate(b);
                        double edited = ls.score(PROMPT, " Paris").logprobSum;
                        check(edited != base, "the bundle changed nothing");
                        ls.setLoraScale("test-lora", 0f);
                        check(ls.score(PROMPT, " Paris").logprobSum == base, "scale 0 is not the base model");
                        AmendException e = expect(Result.ERR_INVALID_ARGUMENT, () -> ls.setLoraScale("test-lora", Float.NaN));
                        check(e.getMessage().contains("LoRA scale"), e.getMessage());
                        expect(Result.ERR_INVALID_ARGUMENT, () -> ls.setLoraScale("test-lora", 1e30f));
                        check(ls.score(PROMPT, " Paris").logprobSum == base, "a refusal changed the scale");
                        ls.setLoraScale("test-lora", 1f);
                        check(ls.score(PROMPT, " Paris").logprobSum == edited, "scale 1 is not the bundle");
                    }
                });
                String scope = System.getenv("AMEND_SCOPE_MODEL");
                if (scope != null && Files.isRegularFile(Paths.get(bundles, "serac.amend"))) {
                    test("scope model: a serac bundle needs its own", () -> {
                        String france = "The capital of France is", berlin = " Berlin";
                        double base = s.score(france, berlin).logprobSum;
                        try (TrustStore trust = new TrustStore(Files.readAllBytes(Paths.get(bundles, "key.raw")));
                             Bundle b = Bundle.loadFile(trust, m, Paths.get(bundles, "serac.amend").toString())) {
                            AmendException e = expect(Result.ERR_SCOPE_MODEL, () -> s.activate(b));
                            check(e.getMessage().contains("test-serac"), e.getMessage());
                            check(s.activeBundles().isEmpty() && s.score(france, berlin).logprobSum == base, "applied without a scope model");
                            try (ScopeModel other = new ScopeModel(Paths.get(bundles, "scope-other.gguf").toString(), 1)) {
                                s.setScopeModel(other);
                            }
                            expect(Result.ERR_SCOPE_MODEL_MISMATCH, () -> s.activate(b));
                            check(s.activeBundles().isEmpty() && s.score(france, berlin).logprobSum == base, "applied with another scope model");
                            try (ScopeModel right = new ScopeModel(scope)) {
                                s.setScopeModel(right);
                            }
                            s.activate(b);
                            double edited = s.score(france, berlin).logprobSum;
                            check(edited > base + 1.0, "routed " + edited + " vs base " + base);
                            boolean fired = false;
                            for (EditActivity a : s.explain()) fired |= a.family.equals("memory") && a.nFired >= 1;
                            check(fired, "no memory fired: " + s.explain());
                            expect(Result.ERR_SCOPE_MODEL, () -> s.setScopeModel(null));
                            s.rollbackBundle("test-serac");
                            s.setScopeModel(null);
                        }
                    });
                }
                if (reference != null) {
                    test("same tokens as the Rust API with a bundle applied", () -> {
                        String lora = Paths.get(bundles, "lora.amend").toString();
                        Process p = new ProcessBuilder(reference, "--model", model, "--tokens", "12", "--seed", "3",
                                "--temperature", "0.9", "--bundle", lora, "--key", Paths.get(bundles, "key.raw").toString()).start();
                        String want;
                        try (BufferedReader r = new BufferedReader(new InputStreamReader(p.getInputStream(), StandardCharsets.UTF_8))) {
                            want = r.readLine();
                        }
                        check(p.waitFor() == 0 && want != null, "reference failed");
                        GenerateOptions o = new GenerateOptions().maxTokens(12).seed(3).temperature(0.9f);
                        Generation base = s.generate(PROMPT, o);
                        try (TrustStore trust = new TrustStore(Files.readAllBytes(Paths.get(bundles, "key.raw")));
                             Bundle b = Bundle.loadFile(trust, m, lora)) {
                            s.activate(b);
                        }
                        Generation g = s.generate(PROMPT, o);
                        s.rollbackBundle("test-lora");
                        StringBuilder got = new StringBuilder();
                        for (int t : g.tokens) got.append(got.length() == 0 ? "" : " ").append(t);
                        check(got.toString().equals(want.trim()), "java " + got + " vs rust " + want);
                        check(!g.tokens.equals(base.tokens), "the bundle changed nothing");
                    });
                }
            }
        }
        test("scope model: bad files and arguments", () -> {
            Path dir = Files.createTempDirectory("amend-java-scope");
            try {
                AmendException e = expect(Result.ERR_SCOPE_MODEL, () -> new ScopeModel(dir.resolve("missing.gguf").toString()));
                check(e.getMessage().contains("not found"), e.getMessage());
                Path junk = dir.resolve("junk.gguf");
                Files.write(junk, "not a gguf file at all".getBytes(StandardCharsets.UTF_8));
                expect(Result.ERR_SCOPE_MODEL, () -> new ScopeModel(junk.toString()));
                expect(Result.ERR_SCOPE_MODEL, () -> new ScopeModel(model));
                expect(Result.ERR_INVALID_ARGUMENT, () -> new ScopeModel(junk.toString(), 513));
                expect(Result.ERR_INVALID_ARGUMENT, () -> new ScopeModel(new byte[0], 0));
                expect(Result.ERR_NULL_ARGUMENT, () -> Native.sessionSetScopeModel(0L, 0L));
                expect(Result.ERR_INVALID_HANDLE, () -> Native.sessionSetScopeModel(0xdead0L, 0L));
                Files.delete(junk);
            } finally {
                Files.delete(dir);
            }
        });
        test("use after close", () -> {
            Model m = new Model(model);
            Session s = new Session(m, 128, 0);
            m.close();
            check(s.generate(PROMPT, new GenerateOptions().maxTokens(1).stopAtEos(false)).tokens.size() == 1, "session outlives model");
            s.close();
            expect(Result.ERR_INVALID_HANDLE, () -> s.generate(PROMPT, new GenerateOptions().maxTokens(1)));
            s.close();
        });
        test("no leaked handles", () -> check(Amend.liveHandles() == 0, "live " + Amend.liveHandles()));
        System.out.println(passed + " passed, " + failed + " failed");
        System.exit(failed == 0 ? 0 : 1);
    }
}
