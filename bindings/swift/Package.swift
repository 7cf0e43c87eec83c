// swift-tools-version:5.7
// Swift bindings for amend: a module map over include/amend.h (CAmend) and a thin Swift API
// (Amend) that streams tokens as an AsyncSequence. Link against an installed amend
// (ffi/install.sh): pkg-config finds the header and library.
import PackageDescription

let package = Package(
    name: "Amend",
    platforms: [.macOS(.v12), .iOS(.v15)],
    products: [
        .library(name: "Amend", targets: ["Amend"]),
    ],
    targets: [
        .systemLibrary(name: "CAmend", path: "Sources/CAmend", pkgConfig: "amend"),
        .target(name: "Amend", dependencies: ["CAmend"]),
        .testTarget(name: "AmendTests", dependencies: ["Amend"]),
    ]
)
