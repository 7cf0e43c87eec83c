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
    /// File name stem of the outputs (no '/').
    #[arg(long, default_value = "trace")]
    name: String,
    /// Noise samples averaged per measurement (1..=100; each multiplies the trace's work).
    #[arg(long, default_value_t = 3,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new()
              .range(1..=locate::MAX_SAMPLES as u64))]
    samples: usize,
    /// Noise σ in multiples of the embeddings' standard deviation (> 0, at most 100).
    #[arg(long, default_value_t = 3.0, value_parser = parse_noise)]
    noise: f32,
    /// Layers restored together for the FFN/attention traces (1..=n_layer, default n_layer/4;
    /// not with --residual-only, which traces no window).
    #[arg(long, conflicts_with = "residual_only",
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1024))]
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

/// Largest noise scale accepted: far past ROME's 3, where the subject is already noise.
const MAX_NOISE: f32 = 100.0;

fn parse_noise(s: &str) -> Result<f32, String> {
    match s.parse::<f32>() {
        // A scale of 0 corrupts nothing: the trace would measure no effect at all.
        Ok(x) if x > 0.0 && x <= MAX_NOISE => Ok(x),
        _ => Err(format!(
            "{s:?} is not a noise scale in (0, {MAX_NOISE}] (multiples of the embeddings' σ)"
        )),
    }
}

/// Longest `--name`: `{name}.json` plus write_atomic's temporary suffix must fit in a file name.
const MAX_NAME_BYTES: usize = 200;

/// The outputs' paths (json, png), checked before the trace so that minutes of tracing are not
/// the first to find a bad --out-dir/--name. Nothing is created here.
fn output_paths(args: &Args) -> anyhow::Result<(PathBuf, PathBuf)> {
    let name = &args.name;
    if name.trim().is_empty() || name.contains('/') || name.len() > MAX_NAME_BYTES {
        anyhow::bail!(
            "--name {name:?}: give a file name stem (not empty, no '/', at most {MAX_NAME_BYTES} bytes); the outputs are --out-dir/NAME.json and .png"
        );
    }
    let dir = &args.out_dir;
    match std::fs::metadata(dir) {
        Ok(md) if !md.is_dir() => anyhow::bail!(
            "--out-dir {}: that is a {}, not a directory",
            dir.display(),
            if md.is_file() {
                "file"
            } else {
                amend_edits::fsutil::kind_name(&md.file_type())
            }
        ),
        Ok(_) => {}
        Err(_) => {
            // Created (before the trace) by `CreatedDirs::create`, whose error says why it
            // cannot be; a file in the way is named here.
            let ancestor = dir
                .ancestors()
                .skip(1)
                .map(|a| {
                    if a.as_os_str().is_empty() {
                        Path::new(".")
                    } else {
                        a
                    }
                })
                .find(|a| std::fs::symlink_metadata(a).is_ok())
                .unwrap_or(Path::new("."));
            if !ancestor.is_dir() {
                anyhow::bail!(
                    "--out-dir {}: {} is not a directory",
                    dir.display(),
                    ancestor.display()
                );
            }
        }
    }
    let json = dir.join(format!("{name}.json"));
    let png = dir.join(format!("{name}.png"));
    if dir.is_dir() {
        // Both are renamed into place, so an existing one must be a regular file.
        crate::check_output_path("--out-dir/--name", &json, true)?;
        crate::check_output_path("--out-dir/--name", &png, true)?;
    }
    // Either output renamed over the model (or a link to it) would replace it with the trace.
    crate::check_outputs_apart(
        &[("--out-dir/--name", &json), ("--out-dir/--name", &png)],
        &[("--model", &args.model)],
    )?;
    Ok((json, png))
}

pub fn run(args: Args) -> anyhow::Result<()> {
    for (flag, v) in [
        ("--prompt", &args.prompt),
        ("--subject", &args.subject),
        ("--target", &args.target),
    ] {
        if v.trim().is_empty() {
            anyhow::bail!("{flag} is empty (or only whitespace); give the fact's text");
        }
    }
    if !args.prompt.contains(args.subject.as_str()) {
        anyhow::bail!(
            "--subject {:?} does not occur in --prompt {:?}",
            args.subject,
            args.prompt
        );
    }
    let (json_path, png_path) = output_paths(&args)?;
    // Before any work: a directory that cannot take the outputs (full, read-only) is found now,
    // not after minutes of tracing; one this command creates goes again if it fails.
    let mut created = CreatedDirs::create(&args.out_dir)?;
    probe_out_dir(&args.out_dir, &args.name, MIN_OUTPUT_BYTES)?;
    let model = Model::open(&args.model, Default::default())
        .with_context(|| format!("loading model {}", args.model.display()))?;
    let n_layer = model.info().n_layer as usize;
    if let Some(w) = args.window {
        if w > n_layer {
            anyhow::bail!("--window {w}: the model has {n_layer} layers; give 1..={n_layer}");
        }
    }
    let config = TraceConfig {
        noise_scale: args.noise,
        samples: args.samples,
        window: args.window,
        seed: args.seed,
        components: !args.residual_only,
        subject_last_only: false,
        n_threads: args.threads,
    };
    // The cost up front: the work grows with the square of the prompt's length (every traced
    // position re-runs the rest of the prompt), and a long prompt takes hours.
    let plan = locate::plan(&model, &args.prompt, &args.subject, &args.target, &config)?;
    eprintln!(
        "locate: {} forward runs of {} tokens each ({} positions x {} layers x {} sites x {} samples, plus the clean run and {} corrupted baseline runs)",
        plan.forward_runs,
        plan.tokens_per_run,
        plan.positions,
        plan.n_layer,
        plan.sites,
        plan.samples,
        plan.samples
    );
    let bar = crate::progress_bar(0, "runs");
    bar.set_message("tracing");
    let mut timer: Option<std::time::Instant> = None;
    let result = locate::trace(
        &model,
        &args.prompt,
        &args.subject,
        &args.target,
        &config,
        |done, total| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
            // The first corrupted measurement (`samples` runs) times all the others.
            match (done, timer) {
                (0, _) => timer = Some(std::time::Instant::now()),
                (1, Some(t0)) => {
                    let one = t0.elapsed();
                    let rest = one.mul_f64(total.saturating_sub(1) as f64);
                    bar.suspend(|| {
                        eprintln!(
                            "locate: the first measurement took {}; about {} for the other {}",
                            duration(one),
                            duration(rest),
                            total.saturating_sub(1)
                        )
                    });
                    timer = None;
                }
                _ => {}
            }
        },
    )?;
    bar.finish_and_clear();

    // Both outputs are made in memory and staged beside their names before either is put in
    // place: a failure (no space, a read-only directory) leaves the old NAME.json and NAME.png
    // of an earlier trace as they were, and no temporary file.
    let png = render_heatmap(&result)?;
    let json = serde_json::to_string_pretty(&result)? + "\n";
    let staged = [(&json_path, json.as_bytes()), (&png_path, &png[..])]
        .into_iter()
        .map(|(path, data)| {
            amend_edits::fsutil::stage(path, data, None).with_context(|| {
                format!(
                    "writing {} ({} bytes); nothing was written",
                    path.display(),
                    data.len()
                )
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    amend_edits::fsutil::commit_all(staged)?;
    created.keep();

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

/// "0.42 s", "3 min 20 s", "2 h 5 min".
fn duration(d: std::time::Duration) -> String {
    let s = d.as_secs_f64();
    if s < 60.0 {
        format!("{s:.2} s")
    } else if s < 3600.0 {
        format!("{} min {} s", (s / 60.0) as u64, (s % 60.0) as u64)
    } else {
        format!(
            "{} h {} min",
            (s / 3600.0) as u64,
            ((s % 3600.0) / 60.0) as u64
        )
    }
}

/// Less than any trace's two outputs take (the smallest heatmap alone is larger).
const MIN_OUTPUT_BYTES: usize = 8192;

/// The directories `create` made for --out-dir (outermost first), removed again on drop
/// unless `keep` was called: a failed locate leaves no empty directory behind.
struct CreatedDirs(Vec<PathBuf>);

impl CreatedDirs {
    fn create(dir: &Path) -> anyhow::Result<CreatedDirs> {
        let missing: Vec<PathBuf> = dir
            .ancestors()
            .filter(|a| !a.as_os_str().is_empty())
            .take_while(|a| std::fs::symlink_metadata(a).is_err())
            .map(Path::to_path_buf)
            .collect();
        let mut made = CreatedDirs(Vec::new());
        for d in missing.into_iter().rev() {
            std::fs::create_dir(&d).with_context(|| {
                format!("--out-dir {}: creating {}", dir.display(), d.display())
            })?;
            made.0.push(d);
        }
        Ok(made)
    }

    fn keep(&mut self) {
        self.0.clear();
    }
}

impl Drop for CreatedDirs {
    fn drop(&mut self) {
        // remove_dir: only an empty directory goes (never anything another process put there).
        for d in self.0.iter().rev() {
            let _ = std::fs::remove_dir(d);
        }
    }
}

/// Writes (atomically) and removes `len` bytes in --out-dir, so a full or read-only directory
/// is refused before the trace rather than after it.
fn probe_out_dir(dir: &Path, name: &str, len: usize) -> anyhow::Result<()> {
    amend_edits::fsutil::probe_write(&dir.join(format!(".{name}.probe")), len).with_context(|| {
        format!(
            "--out-dir {}: cannot write {len} bytes there (a trace's outputs need more); nothing was traced",
            dir.display()
        )
    })
}

/// One panel per traced site: tokens down, layers across, colour = p(target) restored. Returns
/// the PNG file's bytes.
pub fn render_heatmap(result: &TraceResult) -> anyhow::Result<Vec<u8>> {
    // Registering twice (several renders in one process) is harmless.
    let _ = plotters::style::register_font(FONT_NAME, FontStyle::Normal, FONT);
    let mut panels: Vec<Panel> = vec![(
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
    let mut rgb = vec![0u8; width as usize * height as usize * 3];
    draw_heatmap(result, &panels, &mut rgb, (width, height))?;
    encode_png(width, height, &rgb)
}

/// A traced site's panel: its trace, colour and title.
type Panel<'a> = (&'a SiteTrace, (u8, u8, u8), String);

/// Draws the heatmap into `rgb` (RGB8, `size` pixels).
fn draw_heatmap(
    result: &TraceResult,
    panels: &[Panel],
    rgb: &mut [u8],
    size: (u32, u32),
) -> anyhow::Result<()> {
    let n_tok = result.tokens.len();
    let n_layer = result.n_layer as usize;
    let root = BitMapBackend::with_buffer(rgb, size).into_drawing_area();
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
    for (area, (trace, rgb, title)) in root.split_evenly((1, panels.len())).iter().zip(panels) {
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
    root.present()?;
    Ok(())
}

/// The heatmap as PNG bytes (RGB8): encoded in memory, since plotters' own encoder writes only
/// to a path and locate places its outputs with the one atomic writer.
fn encode_png(width: u32, height: u32, rgb: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, width, height);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    // Flat colour blocks: the best compression and per-row filters keep the file near
    // plotters' own (about 20 KB on gemma3, 3.5x smaller than the defaults).
    enc.set_compression(png::Compression::Best);
    enc.set_adaptive_filter(png::AdaptiveFilterType::Adaptive);
    let mut w = enc.write_header()?;
    w.write_image_data(rgb)?;
    w.finish()?;
    Ok(out)
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
        let bytes = render_heatmap(&r).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        assert_eq!(&bytes[12..16], b"IHDR");
        // 2 panels of 170 + 22 x 18 pixels, 150 + 28 x 6 rows.
        assert_eq!(&bytes[16..24], &[0, 0, 4, 108, 0, 0, 1, 62]);
        assert!(
            bytes.len() > 2000 && bytes.len() < 200_000,
            "{}",
            bytes.len()
        );
    }

    /// The encoded heatmap is a PNG the `png` crate's decoder reads back pixel for pixel.
    #[test]
    fn png_round_trips() {
        let rgb: Vec<u8> = (0..4 * 2 * 3).map(|i| (i * 10) as u8).collect();
        let bytes = encode_png(4, 2, &rgb).unwrap();
        let mut r = png::Decoder::new(std::io::Cursor::new(&bytes))
            .read_info()
            .unwrap();
        let mut buf = vec![0; r.output_buffer_size()];
        let info = r.next_frame(&mut buf).unwrap();
        assert_eq!((info.width, info.height), (4, 2));
        assert_eq!(&buf[..info.buffer_size()], &rgb[..]);
    }
}
