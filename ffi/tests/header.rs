//! include/amend.h must be what cbindgen generates from this crate: fails when it is stale.
//! Regenerate with `AMEND_BLESS=1 cargo test --release -p amend-ffi --test header`.

use std::path::PathBuf;

/// `amend_result` as Rust source, rendered from the one definition in `ffi/src/error.rs` (a
/// `macro_rules!` table, which cbindgen cannot expand).
fn result_enum_src() -> String {
    use amend::amend_result;
    let mut s = String::new();
    for d in amend_result::DOC {
        s += &format!("///{d}\n");
    }
    s += "#[repr(C)]\npub enum amend_result {\n";
    for &c in amend_result::ALL {
        for d in c.doc() {
            s += &format!("    ///{d}\n");
        }
        s += &format!("    {} = {},\n", c.name(), c as i32);
    }
    s + "}\n"
}

fn generate() -> String {
    let crate_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let config =
        cbindgen::Config::from_file(crate_dir.join("cbindgen.toml")).expect("cbindgen.toml");
    // One file per thread: the tests generate concurrently.
    let tid =
        format!("{:?}", std::thread::current().id()).replace(|c: char| !c.is_alphanumeric(), "");
    let enum_src =
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("amend_result-{tid}.rs"));
    std::fs::write(&enum_src, result_enum_src()).expect("write amend_result.rs");
    let mut out = Vec::new();
    cbindgen::Builder::new()
        .with_src(&enum_src)
        .with_crate(&crate_dir)
        .with_config(config)
        .generate()
        .expect("cbindgen failed to parse ffi/src")
        .write(&mut out);
    String::from_utf8(out).expect("header is UTF-8")
}

#[test]
fn header_is_up_to_date() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../include/amend.h");
    let fresh = generate();
    if std::env::var_os("AMEND_BLESS").is_some() {
        std::fs::write(&path, &fresh).expect("write include/amend.h");
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    if committed != fresh {
        let line = committed
            .lines()
            .zip(fresh.lines())
            .position(|(a, b)| a != b)
            .map_or_else(
                || "at the end".to_string(),
                |i| format!("from line {}", i + 1),
            );
        panic!(
            "include/amend.h is stale (differs {line}); regenerate with \
             `AMEND_BLESS=1 cargo test --release -p amend-ffi --test header` and commit it"
        );
    }
}

#[test]
fn header_declares_every_entry_point() {
    // Every `#[no_mangle] pub extern "C" fn` in ffi/src must appear in the header (cbindgen
    // silently skips items it cannot express).
    let header = generate();
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut n = 0;
    for entry in std::fs::read_dir(src).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        for (i, _) in text.match_indices("pub extern \"C\" fn ") {
            let rest = &text[i + "pub extern \"C\" fn ".len()..];
            let name = &rest[..rest.find('(').unwrap()];
            assert!(
                header.contains(&format!(" {name}(")) || header.contains(&format!("*{name}(")),
                "{name} missing from amend.h"
            );

            n += 1;
        }
    }
    assert!(n >= 20, "found only {n} entry points");
}

#[test]
fn header_constants_are_literals() {
    // cbindgen copies a constant's initializer verbatim: one naming a Rust item would be an
    // undefined identifier in C.
    let header = generate();
    let mut n = 0;
    for line in header
        .lines()
        .filter(|l| l.starts_with("#define AMEND_") && !l.contains("AMEND_H"))
    {
        let value = line.split_whitespace().nth(2).expect("a value");
        assert!(
            value.parse::<i64>().is_ok(),
            "non-literal constant in amend.h: {line}"
        );
        n += 1;
    }
    assert!(n >= 4, "found {n} constants");
}
