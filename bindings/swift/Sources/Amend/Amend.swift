// Thin Swift API over the amend C ABI (include/amend.h). Every failing call throws
// AmendError with the result code and amend's message. Handles are freed in deinit.
// Thread rules are the C API's: Model, TrustStore and Bundle are immutable and Sendable;
// a Session is used by one task at a time (a concurrent call throws .busy), and cancel()
// works from anywhere.
import CAmend
import Foundation

public struct AmendError: Error, CustomStringConvertible {
    /// The amend_result value.
    public let code: Int32
    /// e.g. "AMEND_ERR_MODEL_MISMATCH".
    public let name: String
    public let message: String
    public var description: String { "\(name): \(message)" }

    static let cancelled: Int32 = 205
    static let busy: Int32 = 105
    static let invalidArgument: Int32 = 102
    /// AMEND_ERR_SCOPE_MODEL: a bundle needs a scope model the session lacks, or the scope-model
    /// file is missing, not a regular file, corrupt or not a `bert` encoder.
    public static let scopeModel: Int32 = 314
    /// AMEND_ERR_SCOPE_MODEL_MISMATCH: the bundle was compiled against another scope model.
    public static let scopeModelMismatch: Int32 = 315
    /// AMEND_ERR_BUNDLE_UNVERIFIED: the bundle requires edits verified on this backend.
    public static let bundleUnverified: Int32 = 316
}

@inline(__always)
func check(_ r: amend_result) throws {
    if r != AMEND_OK {
        throw AmendError(
            code: Int32(r.rawValue),
            name: String(cString: amend_result_name(Int32(r.rawValue))),
            message: String(cString: amend_last_error()))
    }
}

public enum Amend {
    public static var version: String { String(cString: amend_version()) }
    public static var abiVersion: UInt32 { amend_abi_version() }
}

/// Throws for text with a NUL: passed as a C string it would be cut there, and amend would act
/// on another path or id ("model.gguf\0junk" opening "model.gguf").
func refuseNul(_ s: String, _ what: String) throws {
    if s.utf8.contains(0) {
        throw AmendError(
            code: AmendError.invalidArgument, name: "AMEND_ERR_INVALID_ARGUMENT",
            message: "\(what) holds a NUL character")
    }
}

/// `body` with a C string for `s`, or NULL for nil; text with a NUL throws (see refuseNul).
func withOptionalCString<R>(_ s: String?, _ what: String, _ body: (UnsafePointer<CChar>?) throws -> R) throws -> R {
    guard let s else { return try body(nil) }
    try refuseNul(s, what)
    return try s.withCString { try body($0) }
}

/// `body` with the UTF-8 bytes of `s` and their count. The buffer is never empty (a NUL is
/// appended and not counted), so its base address exists even for "".
func withUTF8Bytes<R>(_ s: String, _ body: (UnsafePointer<CChar>, Int) throws -> R) rethrows -> R {
    var bytes = Array(s.utf8)
    let count = bytes.count
    bytes.append(0)
    return try bytes.withUnsafeBufferPointer { b in
        try b.baseAddress!.withMemoryRebound(to: CChar.self, capacity: b.count) { try body($0, count) }
    }
}

public final class Model: @unchecked Sendable {
    let handle: OpaquePointer

    /// Which engine runs the model (amend_model_params.backend and its options).
    public enum Backend: Sendable {
        /// llama.cpp on the CPU.
        case llamaCpp
        /// ONNX Runtime on an execution provider ("cpu", "openvino[:CPU|GPU|NPU]", "coreml", ...);
        /// `library` nil: $AMEND_ORT_LIB, else what scripts/fetch-ort.sh installed; `editSlots`
        /// the graph's edit slots (docs/backends.md); `cpuFallback` lets nodes the EP does not
        /// take run on the CPU EP; `staticShapes` (chunk, window) fixes every shape, as QNN
        /// needs (sessions' n_ctx at most `window`); `epOptions` are the execution provider's
        /// own options (QNN's "backend_path", OpenVINO's "load_config"), each replacing
        /// amend's default of the same key.
        case onnxRuntime(ep: String = "cpu", library: String? = nil, editSlots: String? = nil,
                         cpuFallback: Bool = false, staticShapes: (chunk: Int, window: Int)? = nil,
                         epOptions: [String: String] = [:])
    }

    /// `KEY=VALUE` lines for amend_model_params.ep_options, nil when there are none. A key or
    /// value with "=" misplaced or a newline is amend's to refuse; a NUL throws when the lines
    /// are passed (it would cut them).
    static func optionLines(_ options: [String: String]) -> String? {
        if options.isEmpty { return nil }
        return options.keys.sorted().map { "\($0)=\(options[$0]!)" }.joined(separator: "\n")
    }

    /// `privateCopy` (llama.cpp, Linux; default true) runs from a sealed in-memory copy of the
    /// file, so a process that rewrites or truncates the file after open changes nothing this
    /// model computes; false maps the file itself.
    public init(path: String, backend: Backend = .llamaCpp, threads: UInt32 = 0,
                privateCopy: Bool = true) throws {
        var out: OpaquePointer? = nil
        var params = amend_model_default_params()
        params.n_threads = threads
        params.private_copy = privateCopy
        try refuseNul(path, "path")
        switch backend {
        case .llamaCpp:
            try check(amend_model_open(path, &params, &out))
        case let .onnxRuntime(ep, library, editSlots, cpuFallback, staticShapes, epOptions):
            params.backend = amend_backend(AMEND_BACKEND_ONNXRUNTIME)
            params.cpu_fallback = cpuFallback
            if let st = staticShapes {
                // A negative size is refused by amend (a huge size_t), never trapped here.
                params.static_chunk = st.chunk < 0 ? Int.max : st.chunk
                params.static_window = st.window < 0 ? Int.max : st.window
            }
            // The strings are borrowed for the call only, as amend.h states.
            try withOptionalCString(ep, "ep") { e in
                params.ep = e
                try withOptionalCString(library, "library") { l in
                    params.ort_library = l
                    try withOptionalCString(editSlots, "editSlots") { s in
                        params.edit_slots = s
                        try withOptionalCString(Model.optionLines(epOptions), "epOptions") { o in
                            params.ep_options = o
                            try check(amend_model_open(path, &params, &out))
                        }
                    }
                }
            }
        }
        handle = out!
    }

    deinit { amend_model_free(handle) }

    public var description: String {
        var len = 0
        _ = amend_model_description(handle, nil, 0, &len)
        var buf = [CChar](repeating: 0, count: len + 1)
        guard amend_model_description(handle, &buf, buf.count, nil) == AMEND_OK else { return "" }
        return String(cString: buf)
    }

    public var layerCount: UInt32 {
        var info = amend_model_info()
        return amend_model_get_info(handle, &info) == AMEND_OK ? info.n_layer : 0
    }
}

public final class TrustStore: @unchecked Sendable {
    let handle: OpaquePointer

    /// Each key is a 32-byte ed25519 public key.
    public init(keys: [[UInt8]]) throws {
        let blob = keys.flatMap { $0 }
        var out: OpaquePointer? = nil
        try blob.withUnsafeBufferPointer { b in
            try check(amend_trust_store_new(b.baseAddress, keys.count, &out))
        }
        handle = out!
    }

    deinit { amend_trust_store_free(handle) }
}

public final class Bundle: @unchecked Sendable {
    let handle: OpaquePointer

    init(handle: OpaquePointer) { self.handle = handle }

    public static func load(file path: String, trust: TrustStore, model: Model) throws -> Bundle {
        // The path's bytes through amend_bundle_load_file_bytes: a NUL is refused by amend,
        // not cut at.
        let bytes = Array(path.utf8)
        var out: OpaquePointer? = nil
        try bytes.withUnsafeBufferPointer { b in
            try check(amend_bundle_load_file_bytes(trust.handle, model.handle, b.baseAddress, b.count, &out))
        }
        return Bundle(handle: out!)
    }

    public static func load(data: [UInt8], trust: TrustStore, model: Model) throws -> Bundle {
        var out: OpaquePointer? = nil
        try data.withUnsafeBufferPointer { b in
            try check(amend_bundle_load_memory(trust.handle, model.handle, b.baseAddress, b.count, &out))
        }
        return Bundle(handle: out!)
    }

    deinit { amend_bundle_free(handle) }

    public var id: String {
        var len = 0
        _ = amend_bundle_id(handle, nil, 0, &len)
        var buf = [CChar](repeating: 0, count: len + 1)
        guard amend_bundle_id(handle, &buf, buf.count, nil) == AMEND_OK else { return "" }
        return String(cString: buf)
    }
}

public struct GenerateOptions: Sendable {
    public var maxTokens: UInt32 = 128
    public var temperature: Float = 0
    public var seed: UInt32 = 0
    public var stopAtEos = true
    public init() {}
}

public struct Score: Sendable {
    public let targetTokens: UInt32
    public let logprobSum: Double
    public let logprobMean: Double
}

/// Boxes the per-call Swift callback for the C `void *user_data`.
private final class TokenSink {
    let onToken: (Int32, String) -> Bool
    init(_ onToken: @escaping (Int32, String) -> Bool) { self.onToken = onToken }
}

private func tokenTrampoline(
    _ userData: UnsafeMutableRawPointer?, _ token: amend_token,
    _ text: UnsafePointer<CChar>?, _ len: Int
) -> Bool {
    let sink = Unmanaged<TokenSink>.fromOpaque(userData!).takeUnretainedValue()
    // Text pieces are whole UTF-8 characters (amend holds back partial ones).
    let piece = text.map { String(decoding: UnsafeRawBufferPointer(start: $0, count: len), as: UTF8.self) } ?? ""
    return sink.onToken(token, piece)
}

/// The scope model that routes retrieval memories: a `bert` GGUF such as
/// ~/.cache/amend/all-minilm-l6-v2-q8_0.gguf (scripts/fetch-scope-model.sh). Open it once and
/// give it to every session that activates serac bundles (`Session.setScopeModel`); sessions
/// keep it alive, so it may be released while they are open. Immutable and Sendable.
public final class ScopeModel: @unchecked Sendable {
    let handle: OpaquePointer

    /// Throws AmendError `scopeModel` (314) for a file that is missing, not a regular file,
    /// corrupt or not a `bert` encoder. `threads`: at most 512; 0 = one (docs/runtime.md).
    public init(path: String, threads: UInt32 = 0) throws {
        // The path's bytes through amend_scope_model_open_bytes (no NUL needed).
        let bytes = Array(path.utf8)
        var out: OpaquePointer? = nil
        try bytes.withUnsafeBufferPointer { b in
            try check(amend_scope_model_open_bytes(b.baseAddress, b.count, threads, &out))
        }
        handle = out!
    }

    deinit { amend_scope_model_free(handle) }
}

public final class Session: @unchecked Sendable {
    let handle: OpaquePointer
    let model: Model

    public init(model: Model, contextLength: UInt32 = 0) throws {
        var params = amend_session_default_params()
        if contextLength > 0 { params.n_ctx = contextLength }
        var out: OpaquePointer? = nil
        try check(amend_session_open(model.handle, &params, &out))
        handle = out!
        self.model = model
    }

    deinit { amend_session_free(handle) }

    /// Throws `scopeModel` / `scopeModelMismatch` for a bundle whose memories need a scope model
    /// this session lacks / has another one of; nothing of it is applied then.
    public func activate(_ bundle: Bundle) throws { try check(amend_session_activate(handle, bundle.handle)) }
    /// The scope model this session's bundles route their memories with (nil: none). Set it
    /// before activating such a bundle; the session keeps it alive. Refused while an active
    /// bundle needs the current one.
    public func setScopeModel(_ scope: ScopeModel?) throws {
        try check(amend_session_set_scope_model(handle, scope?.handle))
    }
    public func rollback(bundleId: String) throws {
        try refuseNul(bundleId, "bundleId")
        try check(amend_session_rollback_bundle(handle, bundleId))
    }
    /// Scales the low-rank adapters of active bundle `bundleId` from the next request on: 1 as
    /// compiled, 0 disables them, negative subtracts them. Throws AMEND_ERR_INVALID_ARGUMENT for
    /// a NaN, infinite or |scale| > 100 and AMEND_ERR_NOT_FOUND for an id no active bundle has;
    /// the scale in use is then unchanged.
    public func setLoraScale(bundleId: String, scale: Float) throws {
        try refuseNul(bundleId, "bundleId")
        try check(amend_session_set_lora_scale(handle, bundleId, scale))
    }
    public func rollback(editId: String) throws {
        try refuseNul(editId, "editId")
        try check(amend_session_rollback_edit(handle, editId))
    }

    /// Ids of the active bundles, bottom to top.
    public func activeBundles() throws -> [String] {
        var n = 0
        try check(amend_session_active_bundle_count(handle, &n))
        return try (0..<n).map { i in
            var len = 0
            _ = amend_session_active_bundle_id(handle, i, nil, 0, &len)
            var buf = [CChar](repeating: 0, count: len + 1)
            try check(amend_session_active_bundle_id(handle, i, &buf, buf.count, nil))
            return String(cString: buf)
        }
    }

    /// What the active edits did during the last generation or scoring:
    /// (bundle id, edit id, family, fired, checked) per edit.
    public func explain() throws -> [(bundle: String, edit: String, family: String, fired: UInt32, checked: UInt32)] {
        final class Box { var items: [(bundle: String, edit: String, family: String, fired: UInt32, checked: UInt32)] = [] }
        let box = Box()
        let ud = Unmanaged.passUnretained(box).toOpaque()
        try check(amend_session_explain(handle, { ud, a in
            let box = Unmanaged<Box>.fromOpaque(ud!).takeUnretainedValue()
            let a = a!.pointee
            box.items.append((String(cString: a.bundle_id), String(cString: a.edit_id),
                              String(cString: a.family), a.n_fired, a.n_checked))
            return true
        }, ud))
        withExtendedLifetime(box) {}
        return box.items
    }

    /// Stops the running generation within one token; callable from any thread or task.
    public func cancel() { _ = amend_session_cancel(handle) }

    /// Generates synchronously, calling `onToken` for each piece; return false to stop.
    @discardableResult
    public func generate(
        _ prompt: String, options: GenerateOptions = GenerateOptions(),
        onToken: @escaping (Int32, String) -> Bool = { _, _ in true }
    ) throws -> String {
        var params = amend_generate_default_params()
        params.max_tokens = options.maxTokens
        params.temperature = options.temperature
        params.seed = options.seed
        params.stop_at_eos = options.stopAtEos
        var text = ""
        let sink = TokenSink { token, piece in
            text += piece
            return token == -1 ? true : onToken(token, piece)
        }
        let userData = Unmanaged.passUnretained(sink).toOpaque()
        var result = amend_generation()
        // An empty prompt reaches amend (which refuses it) instead of trapping on a nil buffer.
        let r = withUTF8Bytes(prompt) { cp, n in
            amend_session_generate(handle, cp, n, &params, tokenTrampoline, userData, &result)
        }
        withExtendedLifetime(sink) {}
        try check(r)
        return text
    }

    /// Set once by the consumer of `tokens`, read by the generating thread.
    private final class StopFlag: @unchecked Sendable {
        private let lock = NSLock()
        private var stopped = false
        func stop() { lock.lock(); stopped = true; lock.unlock() }
        var isStopped: Bool { lock.lock(); defer { lock.unlock() }; return stopped }
    }

    /// Streams generated text as an AsyncSequence. Generation runs on a separate thread;
    /// cancelling the consuming task (or ending iteration early) stops it at the next token.
    /// It stops through the token callback, not cancel(): a cancel made after the generation
    /// ended would be kept by amend and fail the session's next generation.
    public func tokens(
        _ prompt: String, options: GenerateOptions = GenerateOptions()
    ) -> AsyncThrowingStream<String, Error> {
        AsyncThrowingStream { continuation in
            let flag = StopFlag()
            let worker = Thread {
                do {
                    try self.generate(prompt, options: options) { _, piece in
                        if !piece.isEmpty { continuation.yield(piece) }
                        return !flag.isStopped
                    }
                    continuation.finish()
                } catch {
                    continuation.finish(throwing: error)
                }
            }
            continuation.onTermination = { @Sendable termination in
                if case .cancelled = termination { flag.stop() }
            }
            worker.start()
        }
    }

    /// Teacher-forced log-probability of `target` after `prompt` with the active edits.
    public func score(prompt: String, target: String) throws -> Score {
        var s = amend_score()
        // Empty text reaches amend (which refuses it) instead of trapping on a nil buffer.
        let r = withUTF8Bytes(prompt) { pc, pn in
            withUTF8Bytes(target) { tc, tn in
                amend_session_score(handle, pc, pn, tc, tn, &s)
            }
        }
        try check(r)
        return Score(targetTokens: s.n_target_tokens, logprobSum: s.logprob_sum, logprobMean: s.logprob_mean)
    }
}
