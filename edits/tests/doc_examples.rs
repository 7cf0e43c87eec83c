//! docs/bundle-format.md's descriptor examples decode with the bundle reader, and their JSON
//! encodes to the documented bytes: the spec cannot drift from the wire format again (it once
//! gave the memory embedder as `{layer, pooling}`, missing `site`).

use amend_edits::bundle::reader::decode_body;
use amend_edits::bundle::{
    CodebookDesc, LowRankDesc, LowRankGgufDesc, MemoryDesc, PatchNeuronsDesc, Payload, PayloadKind,
};

struct Example {
    kind: u16,
    json: String,
    bytes: Vec<u8>,
}

/// Every `#### N name` heading followed by a ```json block and a ```hex block.
fn examples() -> Vec<Example> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/bundle-format.md");
    let doc = std::fs::read_to_string(path).expect("docs/bundle-format.md");
    let mut out = Vec::new();
    let mut kind = None;
    let mut json = None;
    let mut lines = doc.lines();
    while let Some(line) = lines.next() {
        if let Some(h) = line.strip_prefix("#### ") {
            kind = h
                .split_whitespace()
                .next()
                .and_then(|n| n.parse::<u16>().ok());
        } else if line == "```json" || line == "```hex" {
            let block: Vec<&str> = lines.by_ref().take_while(|l| *l != "```").collect();
            if line == "```json" {
                json = Some(block.join("\n"));
            } else {
                let bytes = block
                    .join(" ")
                    .split_whitespace()
                    .map(|b| u8::from_str_radix(b, 16).expect("hex byte"))
                    .collect();
                out.push(Example {
                    kind: kind.expect("an example under a `#### N name` heading"),
                    json: json.take().expect("a json block before the hex block"),
                    bytes,
                });
            }
        }
    }
    out
}

fn check<T>(e: &Example, wrap: fn(T) -> Payload)
where
    T: serde::de::DeserializeOwned + serde::Serialize + PartialEq + std::fmt::Debug,
{
    let value: T = serde_json::from_str(&e.json)
        .unwrap_or_else(|err| panic!("kind {}: the JSON does not match the struct: {err}", e.kind));
    let encoded = postcard::to_allocvec(&value).unwrap();
    let hex = |b: &[u8]| {
        b.iter()
            .map(|x| format!("{x:02x}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert_eq!(
        hex(&encoded),
        hex(&e.bytes),
        "kind {}: the documented bytes are not the JSON's encoding",
        e.kind
    );
    let kind = PayloadKind::from_code(e.kind).expect("a known payload kind");
    let decoded = decode_body(kind, &e.bytes).unwrap_or_else(|| {
        panic!(
            "kind {}: the reader cannot decode the documented bytes",
            e.kind
        )
    });
    assert_eq!(decoded, wrap(value), "kind {}", e.kind);
}

#[test]
fn every_payload_kind_has_a_decoding_example() {
    let all = examples();
    for &kind in PayloadKind::ALL {
        let e = all
            .iter()
            .find(|e| e.kind == kind as u16)
            .unwrap_or_else(|| panic!("docs/bundle-format.md has no example of {}", kind.name()));
        match kind {
            PayloadKind::Codebook => check::<CodebookDesc>(e, Payload::Codebook),
            PayloadKind::PatchNeurons => check::<PatchNeuronsDesc>(e, Payload::PatchNeurons),
            PayloadKind::LowRank => check::<LowRankDesc>(e, Payload::LowRank),
            PayloadKind::LowRankGguf => check::<LowRankGgufDesc>(e, Payload::LowRankGguf),
            PayloadKind::Memory => check::<MemoryDesc>(e, Payload::Memory),
        }
    }
    assert_eq!(all.len(), PayloadKind::ALL.len());
}
