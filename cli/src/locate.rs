//! `amend locate`: causal tracing of one fact, as a heatmap PNG, JSON numbers and a
//! recommended edit layer.

use std::path::{Path, PathBuf};

use amend_compiler::locate::{self, SiteTrace, TraceConfig, TraceResult};
use amend_runtime::Model;
use anyhow::Context;
use plotters::prelude::*;

/// Embedded so heatmaps render the same everywhere without system fonts (DejaVu Sans Mono,
/// Bitstream Vera license: cli/assets/DejaVuSansMono-LICENSE.txt).
const FONT: &[u8] = include_bytes!("../assets/DejaVuSansMono.ttf");
const FONT_NAME: &str = "amend-mono";

#[derive(clap::Args)]
pub struct Args {
    /// GGUF model.
    #[arg(long, env = "AMEND_MODEL")]
    model: PathBuf,
    /// The fact's prompt, e.g. "The capital of France is".
    #[arg(long)]
    prompt: String,
    /// The subject whose tokens are corrupted (must occur in the prompt), e.g. "France".
    #[arg(long)]
    subject: String,
    /// The answer whose first token's probability is traced, e.g. "Paris".
    #[arg(long)]
    target: String,
    /// Directory for trace.png and trace.json (created if missing).
    #[arg(long, default_value = ".")]
    out_dir: PathBuf,
    /// File name stem of the outputs.
    #[arg(long, default_value = "trace")]
    name: String,
    /// Noise samples averaged per measurement.
    #[arg(long, default_value_t = 3)]
    samples: usize,
    /// Noise σ in multiples of the embeddings' standard deviation.
    #[arg(long, default_value_t = 3.0)]
    noise: f32,
    /// Layers restored together for the FFN/attention traces (default n_layer/4).
    #[arg(long)]
    window: Option<usize>,
    /// Trace only the residual stream (a third of the work).
    #[arg(long)]
    residual_only: bool,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Threads (default: all cores).
    #[arg(long, value_parser = crate::parse_threads)]
    threads: Option<usize>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let model = Model::open(&args.model, Default::default())
        .with_context(|| format!("loading model {}", args.model.display()))?;
    let config = TraceConfig {
        noise_scale: args.noise,
        samples: args.samples,
        window: args.window,
        seed: args.seed,
        components: !args.residual_only,
        subject_last_only: false,
        n_threads: args.threads,
    };
    let bar = crate::progress_bar(0, "runs");
    bar.set_message("tracing");
    let result = locate::trace(
        &model,
        &args.prompt,
        &args.subject,
        &args.target,
        &config,
        |done, total| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        },
    )?;
    bar.finish_and_clear();

    std::fs::create_dir_all(&args.out_dir)
        .with_context(|| format!("creating {}", args.out_dir.display()))?;
    let json_path = args.out_dir.join(format!("{}.json", args.name));
    std::fs::write(&json_path, serde_json::to_string_pretty(&result)? + "\n")
        .with_context(|| format!("writing {}", json_path.display()))?;
    let png_path = args.out_dir.join(format!("{}.png", args.name));
    render_heatmap(&result, &png_path)?;

    println!(
        "p(\"{}\") clean {:.4}, subject corrupted {:.4}",
        args.target, result.p_clean, result.p_corrupt
    );
    let s = result.subject_tokens.end - 1;
    let best = |t: &SiteTrace| {
        let row = &t.p[s];
        let l = (0..row.len()).fold(0, |b, i| if row[i] > row[b] { i } else { b });
        (l, row[l])
    };
    let (l, p) = best(&result.residual);
    println!("residual stream at the last subject token: best layer {l} (p {p:.4})");
    for t in result.ffn.iter().chain(&result.attn) {
        let (l, p) = best(t);
        println!(
            "{} (window {}) at the last subject token: best layer {l} (p {p:.4})",
            t.site, t.window
        );
    }
    println!("recommended edit layer: {}", result.recommended_layer);
    println!("wrote {} and {}", png_path.display(), json_path.display());
    Ok(())
}

/// One panel per traced site: tokens down, layers across, colour = p(target) restored.
pub fn render_heatmap(result: &TraceResult, path: &Path) -> anyhow::Result<()> {
    // Registering twice (several renders in one process) is harmless.
    let _ = plotters::style::register_font(FONT_NAME, FontStyle::Normal, FONT);
    let mut panels: Vec<(&SiteTrace, (u8, u8, u8), String)> = vec![(
        &result.residual,
        (94, 60, 153),
        "residual stream (single layer)".to_string(),
    )];
    if let Some(t) = &result.ffn {
        panels.push((
            t,
            (35, 139, 69),
            format!("FFN output (window {})", t.window),
        ));
    }
    if let Some(t) = &result.attn {
        panels.push((
            t,
            (203, 24, 29),
            format!("attention output (window {})", t.window),
        ));
    }
    let n_tok = result.tokens.len();
    let n_layer = result.n_layer as usize;
    let panel_w = 170 + 22 * n_layer as u32;
    let height = 150 + 28 * n_tok as u32;
    let width = panel_w * panels.len() as u32;
    let root = BitMapBackend::new(path, (width, height)).into_drawing_area();
    root.fill(&WHITE)?;
    let caption = format!(
        "{}  ->  \"{}\"   p clean {:.3}, corrupted {:.3}, noise σ {:.2}, {} samples",
        result.prompt,
        result.target,
        result.p_clean,
        result.p_corrupt,
        result.noise_std,
        result.samples
    );
    let root = root.titled(&caption, (FONT_NAME, 15))?;
    let labels: Vec<String> = result
        .tokens
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let t = if t.is_empty() {
                "<bos>".to_string()
            } else {
                t.replace('\n', "\\n")
            };
            if result.subject_tokens.contains(&i) {
                format!("{t}*")
            } else {
                t
            }
        })
        .collect();
    // A shared scale across panels so they compare directly.
    let vmax = panels
        .iter()
        .flat_map(|(t, _, _)| t.p.iter().flatten())
        .copied()
        .fold(result.p_clean, f32::max)
        .max(1e-6);
    for (area, (trace, rgb, title)) in root.split_evenly((1, panels.len())).iter().zip(&panels) {
        let mut chart = ChartBuilder::on(area)
            .caption(title, (FONT_NAME, 14))
            .margin(8)
            .x_label_area_size(34)
            .y_label_area_size(110)
            // A segmented range a..b has b - a + 1 segments.
            .build_cartesian_2d(
                (0..n_layer.saturating_sub(1)).into_segmented(),
                (0..n_tok.saturating_sub(1)).into_segmented(),
            )?;
        chart
            .configure_mesh()
            .disable_mesh()
            .x_desc("layer")
            .x_labels(n_layer)
            .x_label_formatter(&|x| match x {
                // Every other layer keeps the labels readable.
                SegmentValue::CenterOf(l) if l % 2 == 0 => l.to_string(),
                _ => String::new(),
            })
            .y_labels(n_tok)
            .y_label_formatter(&|y| match y {
                // Row 0 (the first token) at the top.
                SegmentValue::CenterOf(y) if *y < n_tok => labels[n_tok - 1 - *y].clone(),
                _ => String::new(),
            })
            .label_style((FONT_NAME, 12))
            .axis_desc_style((FONT_NAME, 12))
            .draw()?;
        let (r, g, b) = *rgb;
        chart.draw_series(trace.p.iter().enumerate().flat_map(|(t, row)| {
            let y = n_tok - 1 - t;
            row.iter().enumerate().map(move |(l, &p)| {
                let a = (p / vmax).clamp(0.0, 1.0) as f64;
                let mix = |c: u8| (255.0 - (255.0 - c as f64) * a).round() as u8;
                Rectangle::new(
                    [
                        (SegmentValue::Exact(l), SegmentValue::Exact(y)),
                        (SegmentValue::Exact(l + 1), SegmentValue::Exact(y + 1)),
                    ],
                    RGBColor(mix(r), mix(g), mix(b)).filled(),
                )
            })
        }))?;
    }
    root.present()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_a_png() {
        let p = |n: usize, l: usize| {
            (0..n)
                .map(|t| {
                    (0..l)
                        .map(|i| (t * l + i) as f32 / (n * l) as f32)
                        .collect()
                })
                .collect()
        };
        let r = TraceResult {
            prompt: "The capital of France is".into(),
            subject: "France".into(),
            target: "Paris".into(),
            target_token: 1,
            tokens: vec![
                "".into(),
                "The".into(),
                " capital".into(),
                " of".into(),
                " France".into(),
                " is".into(),
            ],
            subject_tokens: 4..5,
            n_layer: 18,
            p_clean: 0.5,
            p_corrupt: 0.1,
            noise_std: 1.0,
            samples: 1,
            residual: SiteTrace {
                site: "residual_out".into(),
                window: 1,
                p: p(6, 18),
            },
            ffn: Some(SiteTrace {
                site: "ffn_output".into(),
                window: 4,
                p: p(6, 18),
            }),
            attn: None,
            recommended_layer: 3,
        };
        let path = std::env::temp_dir().join(format!("amend-heatmap-{}.png", std::process::id()));
        render_heatmap(&r, &path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
        assert!(bytes.len() > 2000);
        std::fs::remove_file(&path).unwrap();
    }
}
