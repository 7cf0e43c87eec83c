import XCTest
@testable import Amend

// Runs where a Swift toolchain exists (swift test, with AMEND_MODEL set and amend installed).
final class AmendTests: XCTestCase {
    func testStreamMatchesGenerate() async throws {
        guard let path = ProcessInfo.processInfo.environment["AMEND_MODEL"] else { throw XCTSkip("AMEND_MODEL not set") }
        let model = try Model(path: path)
        let session = try Session(model: model, contextLength: 256)
        var options = GenerateOptions()
        options.maxTokens = 8
        options.stopAtEos = false
        let full = try session.generate("The capital of France is", options: options)
        var streamed = ""
        for try await piece in session.tokens("The capital of France is", options: options) { streamed += piece }
        XCTAssertEqual(full, streamed)
    }

    func testScopeModelMissingAndNotBertThrow() throws {
        XCTAssertThrowsError(try ScopeModel(path: "/nonexistent-scope.gguf")) { error in
            XCTAssertEqual((error as? AmendError)?.code, AmendError.scopeModel)
        }
        guard let path = ProcessInfo.processInfo.environment["AMEND_MODEL"] else { throw XCTSkip("AMEND_MODEL not set") }
        XCTAssertThrowsError(try ScopeModel(path: path)) { error in
            XCTAssertEqual((error as? AmendError)?.code, AmendError.scopeModel)
        }
    }

    func testProviderOptionLinesAndRefusals() throws {
        XCTAssertNil(Model.optionLines([:]))
        XCTAssertEqual(Model.optionLines(["b": "2", "a": "1"]), "a=1\nb=2")
        guard let path = ProcessInfo.processInfo.environment["AMEND_MODEL"] else { throw XCTSkip("AMEND_MODEL not set") }
        // The CPU EP takes no provider options, and an option needs a key: both refused before
        // any library loads (102, AMEND_ERR_INVALID_ARGUMENT).
        XCTAssertThrowsError(try Model(path: path, backend: .onnxRuntime(ep: "cpu", epOptions: ["x": "1"]))) { error in
            XCTAssertEqual((error as? AmendError)?.code, 102)
        }
        XCTAssertThrowsError(try Model(path: path, backend: .onnxRuntime(ep: "openvino", epOptions: ["": "1"]))) { error in
            XCTAssertEqual((error as? AmendError)?.code, 102)
        }
    }

    func testMissingModelThrows() {
        XCTAssertThrowsError(try Model(path: "/nonexistent.gguf")) { error in
            XCTAssertEqual((error as? AmendError)?.code, 108)
        }
    }
}
