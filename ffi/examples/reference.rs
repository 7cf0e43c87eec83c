//! Generates with the Rust API (amend_runtime) and prints the token ids, one line, space
//! separated: the reference the C example and the Python/Java binding tests compare against
//! ("same tokens as the Rust API for the same seed").
//!
//! reference --model M --prompt P [--tokens N] [--seed S] [--temperature T]
//!           [--bundle FILE --key RAW_PUBLIC_KEY_FILE]...

use std::ops::ControlFlow;
use std::sync::Arc;

use amend_edits::ed25519_dalek::VerifyingKey;
use amend_edits::keys::TrustStore;
use amend_edits::{AddOptions, Bundle, EditSet};
use amend_runtime::{GenerateParams, Model, ModelOptions, Session, SessionOptions};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut model = std::env::var("AMEND_MODEL").unwrap_or_default();
    let mut prompt = "The capital of France is".to_string();
    let mut params = GenerateParams {
        max_tokens: 16,
        ..Default::default()
    };
    let mut bundles = Vec::new();
    let mut key = None;
    let args: Vec<String> = std::env::args().skip(1).collect();
    for pair in args.chunks(2) {
        let [flag, value] = pair else {
            return Err(format!("missing value after {}", pair[0]).into());
        };
        match flag.as_str() {
            "--model" => model = value.clone(),
            "--prompt" => prompt = value.clone(),
            "--tokens" => params.max_tokens = value.parse()?,
            "--seed" => params.seed = value.parse()?,
            "--temperature" => params.temperature = value.parse()?,
            "--bundle" => bundles.push(value.clone()),
            "--key" => key = Some(std::fs::read(value)?),
            other => return Err(format!("unknown option {other}").into()),
        }
    }
    let model = Model::open(&model, ModelOptions::default())?;
    let mut session = Session::new(&model, SessionOptions::default())?;
    if !bundles.is_empty() {
        let key = key.ok_or("--bundle needs --key")?;
        let key: [u8; 32] = key
            .as_slice()
            .try_into()
            .map_err(|_| "key file must hold 32 bytes")?;
        let trust = TrustStore::with_key(VerifyingKey::from_bytes(&key)?);
        let binding = amend_edits::fingerprint::model_binding(model.path())?;
        let set = Arc::new(EditSet::new(binding, TrustStore::new()));
        for path in &bundles {
            set.add(
                Arc::new(Bundle::open_file(path, &trust)?),
                AddOptions::default(),
            )?;
        }
        session.set_edit_set(Some(set))?;
    }
    let out = session.generate(&prompt, &params, |_| ControlFlow::Continue(()))?;
    let ids: Vec<String> = out.tokens.iter().map(|t| t.to_string()).collect();
    println!("{}", ids.join(" "));
    Ok(())
}
