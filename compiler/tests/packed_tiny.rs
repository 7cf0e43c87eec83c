//! Packed sequences in the compiler's forward: several prompts run as one stream
//! (`Model::run_packed`, what a ROME/MEMIT training step with KL prompts does) give each
//! prompt's rows as if it ran alone: on the llama-family tiny models, and on gemma3 (sliding
//! window layers, q/k norms) when the real model is present.

mod common;

use amend_compiler::Compiler;
use amend_runtime::Architecture;
use candle_core::Tensor;

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn packed_sequences_match_separate_runs() {
    let mut models: Vec<_> = [
        Architecture::Llama,
        Architecture::Qwen2,
        Architecture::Qwen3,
    ]
    .into_iter()
    .map(common::tiny_path)
    .collect();
    models.extend(common::real_model_path());
    for path in models {
        let c = Compiler::open(&path).unwrap();
        let arch = c.fwd.cfg.arch;
        let f = &c.fwd;
        let prompts: [&[u32]; 3] = [&[1, 5, 9, 2, 7, 3, 11], &[4, 4, 8], &[2, 13, 6, 1, 9]];
        let alone: Vec<Tensor> = prompts
            .iter()
            .map(|p| {
                f.run_layers(0, f.embed(p, &mut ()).unwrap(), &mut ())
                    .unwrap()
            })
            .collect();
        let streams: Vec<Tensor> = prompts
            .iter()
            .map(|p| f.embed(p, &mut ()).unwrap())
            .collect();
        let lens: Vec<usize> = prompts.iter().map(|p| p.len()).collect();
        let packed = f
            .run_packed(
                0..f.cfg.n_layer,
                Tensor::cat(&streams, 0).unwrap(),
                &lens,
                &mut (),
            )
            .unwrap();
        let mut off = 0;
        for (a, n) in alone.iter().zip(&lens) {
            let rows = packed.narrow(0, off, *n).unwrap();
            // Relative to the stream's scale (gemma3's residual reaches the thousands): only
            // the matmuls' blocking may differ with the row count.
            let d = max_diff(a, &rows)
                / a.abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
            eprintln!("{arch:?}: prompt at row {off}: max relative difference {d:.2e}");
            assert!(
                d < 1e-5,
                "{arch:?}: prompt at row {off} differs by {d} when packed"
            );
            off += n;
        }
        // The lengths must cover the stream exactly.
        let x = Tensor::cat(&streams, 0).unwrap();
        assert!(f.run_packed(0..f.cfg.n_layer, x, &[7, 3], &mut ()).is_err());
    }
}
