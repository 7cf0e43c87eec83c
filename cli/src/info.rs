//! `amend info`: a model's dimensions and the hook sites found in its graph.

use std::path::PathBuf;

use amend_runtime::{HookPoint, Site};

#[derive(clap::Args)]
pub struct Args {
    /// GGUF model file.
    #[arg(long, env = "AMEND_MODEL")]
    pub model: PathBuf,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let model = crate::run::open_model(&args.model, None)?;
    let i = model.info();
    println!("model          {}", args.model.display());
    println!("description    {}", i.description);
    println!("architecture   {}", i.architecture);
    println!("quantization   {}", i.quantization);
    println!("parameters     {}", i.n_params);
    println!(
        "size           {:.1} MiB",
        i.size_bytes as f64 / (1024.0 * 1024.0)
    );
    println!("layers         {}", i.n_layer);
    println!("n_embd         {}", i.n_embd);
    println!("n_ff           {}", i.n_ff);
    println!("heads          {} (kv {})", i.n_head, i.n_head_kv);
    println!("vocab          {}", i.n_vocab);
    println!("context        {} (training)", i.n_ctx_train);
    println!(
        "bos/eos        {:?}/{:?} (add bos: {})",
        i.bos, i.eos, i.add_bos
    );
    println!();
    println!(
        "hook sites (graph node names; N = layer 0..={}):",
        i.n_layer.saturating_sub(1)
    );
    for site in Site::ALL {
        let layer = if site == Site::Embeddings { 0 } else { 1 };
        let shown = match model.node_name(HookPoint::new(layer, site)) {
            Ok(name) if site == Site::Embeddings => format!("{name} (layer 0 only)"),
            Ok(name) => name.replacen(&format!("-{layer}"), "-N", 1),
            Err(e) => format!("unavailable: {e}"),
        };
        println!("  {:<13} {shown}", site.name());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn prints_a_tiny_model() {
        let p = std::env::temp_dir().join(format!("amend-cli-info-{}.gguf", std::process::id()));
        amend_runtime::testutil::write_tiny_model(&p, amend_runtime::Architecture::Qwen3, 1)
            .unwrap();
        super::run(super::Args { model: p }).unwrap();
    }
}
