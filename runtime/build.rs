//! Compiles the C++ shim that keeps llama.cpp's exceptions from unwinding into Rust.

fn main() {
    println!("cargo:rerun-if-changed=src/shim.cpp");
    cc::Build::new()
        .cpp(true)
        .std("c++17")
        // llama-cpp-sys-2 already links the C++ runtime; linking it again would change the
        // native libraries a static link needs (pinned in ffi/pkgconfig/amend.pc.in).
        .cpp_link_stdlib(None)
        .file("src/shim.cpp")
        .compile("amend_llama_shim");
}
