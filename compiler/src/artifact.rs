//! Trained files the project ships (the scope head, the scope model's tuned factors): written as
//! safetensors whose bytes depend only on their contents, with how they were made in the
//! metadata, so a shipped file can be traced to its recipe and rebuilt (`make
//! scope-head-check`).

use std::collections::BTreeMap;

/// Metadata key of the command that made the file (`amend VERSION scope-model ...`, data files
/// by name, every option).
pub const TRAINED_WITH: &str = "trained_with";
/// Metadata key of the training sets' `sha256  file name` lines (as `sha256sum` prints them).
pub const DATA_SHA256: &str = "data_sha256";

/// `safetensors::serialize`, with the JSON header written again with its keys sorted: the crate
/// builds the header from hash maps, in an order that changes from run to run, so the same
/// tensors and metadata gave different bytes. Padding stays a multiple of 8 bytes; the tensor
/// data and its offsets do not move.
pub fn serialize<'a>(
    tensors: Vec<(String, safetensors::tensor::TensorView<'a>)>,
    metadata: BTreeMap<String, String>,
) -> Result<Vec<u8>, String> {
    let md = (!metadata.is_empty()).then(|| metadata.into_iter().collect());
    let bytes = safetensors::serialize(tensors, md).map_err(|e| e.to_string())?;
    let n = bytes
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()) as usize)
        .filter(|&n| bytes.len() >= 8 + n)
        .ok_or("serialized header out of bounds")?;
    let header: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..8 + n]).map_err(|e| format!("serialized header: {e}"))?;
    // serde_json's map keeps insertion order when a dependency turns on `preserve_order`: the
    // metadata goes through a BTreeMap of its own.
    let header = header
        .into_iter()
        .map(|(k, v)| {
            let v = match (k.as_str(), v) {
                ("__metadata__", serde_json::Value::Object(m)) => {
                    serde_json::to_value(m.into_iter().collect::<BTreeMap<_, _>>())
                        .map_err(|e| e.to_string())?
                }
                (_, v) => v,
            };
            Ok((k, v))
        })
        .collect::<Result<BTreeMap<_, _>, String>>()?;
    let mut json = serde_json::to_vec(&header).map_err(|e| e.to_string())?;
    json.resize(json.len().next_multiple_of(8), b' ');
    let mut out = Vec::with_capacity(8 + json.len() + bytes.len() - 8 - n);
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    out.extend_from_slice(&bytes[8 + n..]);
    Ok(out)
}
