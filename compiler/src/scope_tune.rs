//! Tuning the scope model: low-rank (LoRA) factors on all-MiniLM-L6-v2's top layers, trained
//! contrastively so that a rephrase of a prompt lands nearer the prompt than the same subject
//! under another relation does (issue 16's hard case, which no head over the frozen model's
//! features separated: docs/eval.md). The factors are a small safetensors file
//! (`data/scope-tune.safetensors`) that `amend scope-model convert --tune` merges into the
//! GGUF, so the runtime runs a plain `bert` model and nothing about routing changes.
//!
//! The forward is plain BERT in candle-core, read top to bottom in [`Bert::layer`]: embeddings,
//! then per layer self-attention and a GELU feed-forward, each with a residual and a LayerNorm;
//! mean pooling over every token ([CLS] and [SEP] included), as the runtime pools. Layers below
//! the tuned ones are frozen, so their outputs are computed once per text and cached.
//!
//! Training pairs (InfoNCE, each positive against its item's negatives, plus the other items'
//! texts where the item allows it):
//! - labelled records: the prompt against its rephrases (positives), its same-subject and
//!   same-relation locality prompts (negatives); the same with the subject replaced by "it",
//!   which is what relation groups and the relation term compare;
//! - a relation lexicon: two templates of one relation about one subject (positives) against
//!   templates of other relations about the same subject (negatives).

use std::collections::HashMap;
use std::path::Path;

use amend_edits::families::strip_subject;
use amend_runtime::ScopeModel;
use candle_core::{DType, Device, Tensor, Var, D};

use crate::dataset::synthetic::Rng;
use crate::dataset::EditRecord;
use crate::error::{CompileError, Result};
use crate::methods::optim::Adam;
use crate::methods::relation_groups::Lexicon;
use crate::scope_model::{read_json, BertConfig};

/// The projections a tune adapts, by checkpoint module name.
pub const TUNED_MODULES: [&str; 6] = [
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
];

/// The most lexicon items per relation per epoch (each is texts to encode every epoch).
pub const MAX_LEXICON_ITEMS: usize = 1000;

/// Most epochs a tune takes (the default is 3; one epoch over the built-in sets is minutes):
/// more is a typo that would run for days, not a choice.
pub const MAX_EPOCHS: usize = 1000;

/// Hyperparameters of [`tune`].
#[derive(Clone, Debug)]
pub struct TuneOptions {
    /// Top layers adapted (of 6).
    pub layers: usize,
    pub rank: usize,
    /// LoRA's alpha / rank.
    pub scale: f32,
    pub epochs: usize,
    pub lr: f64,
    /// InfoNCE temperature on cosines.
    pub temperature: f32,
    /// Items per step.
    pub batch: usize,
    /// Lexicon items per relation per epoch (each with a fresh subject and templates).
    pub lexicon_items: usize,
    /// Other relations' templates per lexicon item (its negatives).
    pub lexicon_negatives: usize,
    pub seed: u64,
    pub threads: usize,
}

impl Default for TuneOptions {
    fn default() -> Self {
        TuneOptions {
            layers: 4,
            rank: 16,
            scale: 2.0,
            epochs: 3,
            lr: 1e-3,
            temperature: 0.05,
            batch: 32,
            lexicon_items: 2,
            lexicon_negatives: 4,
            seed: 1,
            threads: 2,
        }
    }
}

impl TuneOptions {
    /// Checks the options against the checkpoint's config.json (its layer count and hidden
    /// size), before anything is loaded or allocated. Errors name the CLI's flags.
    pub fn check(&self, cfg: &BertConfig) -> Result<()> {
        let flag = |f: &str, v: &dyn std::fmt::Display, range: String| {
            Err(bad(format!("--{f} {v} is outside {range}")))
        };
        if self.layers == 0 || self.layers > cfg.n_layer {
            return flag(
                "layers",
                &self.layers,
                format!("1..={} (the checkpoint's layer count)", cfg.n_layer),
            );
        }
        if self.rank == 0 || self.rank > cfg.n_embd {
            return flag(
                "rank",
                &self.rank,
                format!("1..={} (the checkpoint's hidden size)", cfg.n_embd),
            );
        }
        if self.epochs == 0 || self.epochs > MAX_EPOCHS {
            return flag("epochs", &self.epochs, format!("1..={MAX_EPOCHS}"));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return flag("lr", &self.lr, "finite numbers > 0".into());
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return flag(
                "temperature",
                &self.temperature,
                "finite numbers > 0".into(),
            );
        }
        if self.lexicon_items > MAX_LEXICON_ITEMS {
            return flag(
                "lexicon-items",
                &self.lexicon_items,
                format!("0..={MAX_LEXICON_ITEMS}"),
            );
        }
        if !self.scale.is_finite() {
            return Err(bad("the LoRA scale must be finite"));
        }
        Ok(())
    }
}

fn bad(what: impl Into<String>) -> CompileError {
    CompileError::Hparams(format!("scope tune: {}", what.into()))
}

/// One LoRA pair on a `[out, in]` projection: `W + scale * B A`, A `[rank, in]`, B `[out, rank]`.
pub struct LoraPair {
    pub a: Var,
    pub b: Var,
}

/// all-MiniLM-L6-v2 in candle (f32), optionally with LoRA pairs on its top layers.
pub struct Bert {
    w: HashMap<String, Tensor>,
    n_layer: usize,
    n_head: usize,
    eps: f64,
    pub lora: HashMap<String, LoraPair>,
    pub scale: f32,
}

impl Bert {
    /// Loads `model.safetensors` and `config.json` of a sentence-transformers checkpoint.
    pub fn load(dir: &Path) -> Result<Bert> {
        let cfg = BertConfig::read(dir)?;
        let (n_layer, n_head, eps) = (cfg.n_layer, cfg.n_head, cfg.eps as f64);
        let raw = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu)?;
        let w = raw
            .into_iter()
            .map(|(k, v)| (k.strip_prefix("bert.").unwrap_or(&k).to_string(), v))
            .filter(|(k, _)| k != "embeddings.position_ids")
            .map(|(k, v)| Ok((k, v.to_dtype(DType::F32)?)))
            .collect::<Result<HashMap<_, _>>>()?;
        // The shapes config.json gives: the options were checked against its sizes.
        for (k, v) in &w {
            cfg.check_tensor(k, v.dims(), None)?;
        }
        Ok(Bert {
            w,
            n_layer,
            n_head,
            eps,
            lora: HashMap::new(),
            scale: 1.0,
        })
    }

    pub fn n_layer(&self) -> usize {
        self.n_layer
    }

    fn t(&self, name: &str) -> Result<&Tensor> {
        self.w
            .get(name)
            .ok_or_else(|| bad(format!("checkpoint lacks {name}")))
    }

    /// Adds zero-effect LoRA pairs (B = 0) on the top `layers` layers' projections.
    pub fn add_lora(&mut self, layers: usize, rank: usize, scale: f32, seed: u64) -> Result<()> {
        let mut rng = Rng::new(seed);
        self.scale = scale;
        for l in self.n_layer.saturating_sub(layers)..self.n_layer {
            for m in TUNED_MODULES {
                let name = format!("encoder.layer.{l}.{m}");
                let (out, inp) = self.t(&format!("{name}.weight"))?.dims2()?;
                let std = 1.0 / (inp as f32).sqrt();
                // Uniform with the variance of N(0, 1/in).
                let a: Vec<f32> = (0..rank * inp)
                    .map(|_| rng.sym() * std * 3f32.sqrt())
                    .collect();
                let a = Var::from_tensor(&Tensor::from_vec(a, (rank, inp), &Device::Cpu)?)?;
                let b = Var::zeros((out, rank), DType::F32, &Device::Cpu)?;
                self.lora.insert(name, LoraPair { a, b });
            }
        }
        Ok(())
    }

    /// The trainable variables, in a fixed order.
    pub fn vars(&self) -> Vec<Var> {
        let mut names: Vec<&String> = self.lora.keys().collect();
        names.sort();
        names
            .into_iter()
            .flat_map(|n| [self.lora[n].a.clone(), self.lora[n].b.clone()])
            .collect()
    }

    /// `x [n, in]` through the projection `name` (LoRA included when present).
    fn linear(&self, name: &str, x: &Tensor) -> Result<Tensor> {
        let w = self.t(&format!("{name}.weight"))?;
        let b = self.t(&format!("{name}.bias"))?;
        let mut y = x.matmul(&w.t()?)?.broadcast_add(b)?;
        if let Some(p) = self.lora.get(name) {
            let d = x
                .matmul(&p.a.as_tensor().t()?)?
                .matmul(&p.b.as_tensor().t()?)?;
            y = (y + (d * self.scale as f64)?)?;
        }
        Ok(y)
    }

    fn layer_norm(&self, name: &str, x: &Tensor) -> Result<Tensor> {
        let mu = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mu)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let y = xc.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        Ok(y.broadcast_mul(self.t(&format!("{name}.weight"))?)?
            .broadcast_add(self.t(&format!("{name}.bias"))?)?)
    }

    /// Token ids (with [CLS] and [SEP]) -> the embedding layer's output `[len, d]`.
    pub fn embed(&self, ids: &[u32]) -> Result<Tensor> {
        let n = ids.len();
        let ids_t = Tensor::from_vec(ids.to_vec(), n, &Device::Cpu)?;
        let pos = Tensor::arange(0u32, n as u32, &Device::Cpu)?;
        let x = self
            .t("embeddings.word_embeddings.weight")?
            .embedding(&ids_t)?
            .add(
                &self
                    .t("embeddings.position_embeddings.weight")?
                    .embedding(&pos)?,
            )?
            .broadcast_add(&self.t("embeddings.token_type_embeddings.weight")?.get(0)?)?;
        self.layer_norm("embeddings.LayerNorm", &x)
    }

    /// One encoder layer over a padded batch `x [b, len, d]`; `mask [b, 1, 1, len]` is 0 for a
    /// token and a large negative number for padding.
    pub fn layer(&self, l: usize, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, n, d) = x.dims3()?;
        let h = self.n_head;
        let hd = d / h;
        let p = format!("encoder.layer.{l}");
        let flat = x.reshape((b * n, d))?;
        let heads = |t: Tensor| -> Result<Tensor> {
            Ok(t.reshape((b, n, h, hd))?.transpose(1, 2)?.contiguous()?)
        };
        let q = heads(self.linear(&format!("{p}.attention.self.query"), &flat)?)?;
        let k = heads(self.linear(&format!("{p}.attention.self.key"), &flat)?)?;
        let v = heads(self.linear(&format!("{p}.attention.self.value"), &flat)?)?;
        let scores = (q.matmul(&k.t()?)? / (hd as f64).sqrt())?.broadcast_add(mask)?;
        let probs = softmax_last(&scores)?;
        let ctx = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b * n, d))?;
        let attn = self.linear(&format!("{p}.attention.output.dense"), &ctx)?;
        let x1 = self.layer_norm(&format!("{p}.attention.output.LayerNorm"), &(flat + attn)?)?;
        let up = self
            .linear(&format!("{p}.intermediate.dense"), &x1)?
            .gelu_erf()?;
        let down = self.linear(&format!("{p}.output.dense"), &up)?;
        let x2 = self.layer_norm(&format!("{p}.output.LayerNorm"), &(x1 + down)?)?;
        Ok(x2.reshape((b, n, d))?)
    }
}

fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&m)?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)
}

/// Texts as token ids with the frozen layers' output cached, and the tuned layers on top.
pub struct Encoder {
    pub bert: Bert,
    /// First tuned layer; layers below are frozen.
    pub first: usize,
    ids: Vec<Vec<u32>>,
    frozen: Vec<Tensor>,
    index: HashMap<String, usize>,
    cls: u32,
    sep: u32,
}

impl Encoder {
    /// `dir`'s tokenizer.json gives the [CLS] and [SEP] ids.
    pub fn new(bert: Bert, first: usize, dir: &Path) -> Result<Encoder> {
        let tok = read_json(dir, "tokenizer.json")?;
        let id = |t: &str| {
            tok.pointer(&format!("/model/vocab/{t}"))
                .and_then(|v| v.as_u64())
                .map(|v| v as u32)
                .ok_or_else(|| bad(format!("tokenizer.json lacks {t}")))
        };
        let (cls, sep) = (id("[CLS]")?, id("[SEP]")?);
        Ok(Encoder {
            bert,
            first,
            ids: Vec::new(),
            frozen: Vec::new(),
            index: HashMap::new(),
            cls,
            sep,
        })
    }

    /// The text's index, tokenizing it (the runtime's tokenizer) the first time.
    pub fn add(&mut self, scope: &ScopeModel, text: &str) -> Result<usize> {
        if let Some(&i) = self.index.get(text) {
            return Ok(i);
        }
        let mut t: Vec<u32> = scope
            .tokenize(text)
            .map_err(|e| bad(format!("{text:?}: {e}")))?
            .into_iter()
            .map(|t| t as u32)
            .collect();
        t.truncate(amend_runtime::SCOPE_MAX_TOKENS - 2);
        let mut ids = Vec::with_capacity(t.len() + 2);
        ids.push(self.cls);
        ids.extend(t);
        ids.push(self.sep);
        let i = self.ids.len();
        self.ids.push(ids);
        self.index.insert(text.to_string(), i);
        Ok(i)
    }

    /// Runs the frozen layers once for every text added since the last call.
    pub fn cache_frozen(&mut self) -> Result<()> {
        let todo: Vec<usize> = (self.frozen.len()..self.ids.len()).collect();
        for chunk in todo.chunks(64) {
            let (x, mask) = self.pad(chunk, |i| self.bert.embed(&self.ids[i]))?;
            let mut x = x;
            for l in 0..self.first {
                x = self.bert.layer(l, &x, &mask)?;
            }
            for (j, &i) in chunk.iter().enumerate() {
                let n = self.ids[i].len();
                self.frozen.push(x.get(j)?.narrow(0, 0, n)?.contiguous()?);
            }
        }
        Ok(())
    }

    fn pad(
        &self,
        texts: &[usize],
        rows: impl Fn(usize) -> Result<Tensor>,
    ) -> Result<(Tensor, Tensor)> {
        let n = texts.iter().map(|&i| self.ids[i].len()).max().unwrap_or(1);
        let mut xs = Vec::with_capacity(texts.len());
        let mut mask = Vec::with_capacity(texts.len() * n);
        for &i in texts {
            let x = rows(i)?;
            let len = x.dim(0)?;
            let x = if len < n {
                Tensor::cat(
                    &[&x, &x.zeros_like()?.narrow(0, 0, 1)?.repeat((n - len, 1))?],
                    0,
                )?
            } else {
                x
            };
            xs.push(x);
            mask.extend((0..n).map(|p| if p < len { 0f32 } else { -1e4 }));
        }
        let mask = Tensor::from_vec(mask, (texts.len(), 1, 1, n), &Device::Cpu)?;
        Ok((Tensor::stack(&xs, 0)?, mask))
    }

    /// Unit mean-pooled embeddings `[texts, d]` through the tuned layers (differentiable).
    pub fn pooled(&self, texts: &[usize]) -> Result<Tensor> {
        let (mut x, mask) = self.pad(texts, |i| Ok(self.frozen[i].clone()))?;
        for l in self.first..self.bert.n_layer() {
            x = self.bert.layer(l, &x, &mask)?;
        }
        // Mean over real tokens: padding weighs 0.
        let keep = mask
            .squeeze(1)?
            .squeeze(1)?
            .ge(-1.0)?
            .to_dtype(DType::F32)?;
        let sum = x.broadcast_mul(&keep.unsqueeze(2)?)?.sum(1)?;
        let mean = sum.broadcast_div(&keep.sum_keepdim(1)?)?;
        let norm = mean.sqr()?.sum_keepdim(1)?.sqrt()?;
        Ok(mean.broadcast_div(&norm)?)
    }
}

/// One training item: an anchor, positives and negatives (text indices). `key` names its
/// relation: other items' texts serve as negatives only for `in_batch` items of another key.
#[derive(Clone, Debug)]
struct Item {
    anchor: usize,
    pos: Vec<usize>,
    neg: Vec<usize>,
    in_batch: bool,
    key: String,
}

/// What a tune did.
#[derive(Clone, Debug, Default)]
pub struct TuneReport {
    pub items: usize,
    pub texts: usize,
    pub steps: usize,
    pub last_loss: f32,
    /// The last [`hard_case_auc`] on the validation records (NaN without them).
    pub validation_auc: (f64, f64),
    pub seconds: f64,
}

fn record_items(
    enc: &mut Encoder,
    scope: &ScopeModel,
    records: &[EditRecord],
) -> Result<Vec<Item>> {
    let mut items = Vec::new();
    for r in records {
        if r.rephrase_prompts.is_empty() {
            continue;
        }
        let negs: Vec<&str> = r
            .locality
            .iter()
            .filter(|p| {
                matches!(
                    p.kind.as_str(),
                    "Subject_Specificity" | "Relation_Specificity"
                )
            })
            .map(|p| p.prompt.as_str())
            .collect();
        let add = |enc: &mut Encoder, t: &str| enc.add(scope, t);
        let anchor = add(enc, &r.prompt)?;
        let pos = r
            .rephrase_prompts
            .iter()
            .map(|t| add(enc, t))
            .collect::<Result<_>>()?;
        let neg = negs.iter().map(|t| add(enc, t)).collect::<Result<_>>()?;
        items.push(Item {
            anchor,
            pos,
            neg,
            in_batch: true,
            key: format!("record:{}", r.id),
        });
        // The same with the subject replaced by "it" (relation groups' and the relation term's
        // view); same-relation probes are then the same relation, so only same-subject ones stay.
        let Some(s) = r.subject.as_deref().filter(|s| !s.is_empty()) else {
            continue;
        };
        let Some(a) = strip_subject(&r.prompt, s) else {
            continue;
        };
        let pos: Vec<String> = r
            .rephrase_prompts
            .iter()
            .filter_map(|t| strip_subject(t, s))
            .collect();
        let neg: Vec<String> = r
            .locality
            .iter()
            .filter(|p| p.kind == "Subject_Specificity")
            .filter_map(|p| strip_subject(&p.prompt, s))
            .collect();
        if pos.is_empty() || neg.is_empty() {
            continue;
        }
        let anchor = add(enc, &a)?;
        let pos = pos.iter().map(|t| add(enc, t)).collect::<Result<_>>()?;
        let neg = neg.iter().map(|t| add(enc, t)).collect::<Result<_>>()?;
        items.push(Item {
            anchor,
            pos,
            neg,
            in_batch: false,
            key: format!("stripped:{}", r.id),
        });
    }
    Ok(items)
}

#[allow(clippy::too_many_arguments)]
fn lexicon_items(
    enc: &mut Encoder,
    scope: &ScopeModel,
    lex: &Lexicon,
    subjects: &[String],
    per_group: usize,
    negatives: usize,
    rng: &mut Rng,
) -> Result<Vec<Item>> {
    let groups = lex.names.len();
    let by_group: Vec<Vec<&str>> = (0..groups)
        .map(|g| {
            lex.templates
                .iter()
                .zip(&lex.template_group)
                .filter(|(_, &tg)| tg as usize == g)
                .map(|(t, _)| t.as_str())
                .collect()
        })
        .collect();
    let mut items = Vec::new();
    for (g, ts) in by_group.iter().enumerate() {
        if ts.len() < 2 || groups < 2 {
            continue;
        }
        for k in 0..per_group {
            let s = &subjects[rng.below(subjects.len())];
            // Alternate the subject's name and "it" (what relation groups compare).
            let subj = if k % 2 == 0 { s.as_str() } else { "it" };
            let a = rng.below(ts.len());
            let mut b = rng.below(ts.len() - 1);
            if b >= a {
                b += 1;
            }
            let fill = |t: &str| t.replacen("{}", subj, 1);
            let anchor = enc.add(scope, &fill(ts[a]))?;
            let pos = vec![enc.add(scope, &fill(ts[b]))?];
            let mut neg = Vec::with_capacity(negatives);
            for _ in 0..negatives {
                let mut og = rng.below(groups - 1);
                if og >= g {
                    og += 1;
                }
                let ots = &by_group[og];
                if ots.is_empty() {
                    continue;
                }
                neg.push(enc.add(scope, &fill(ots[rng.below(ots.len())]))?);
            }
            items.push(Item {
                anchor,
                pos,
                neg,
                in_batch: subj != "it",
                key: format!("group:{}", lex.names[g]),
            });
        }
    }
    Ok(items)
}

/// The InfoNCE loss of a batch of items.
fn batch_loss(enc: &Encoder, items: &[&Item], temperature: f32) -> Result<Tensor> {
    // Every text of the batch once.
    let mut texts: Vec<usize> = Vec::new();
    let mut at: HashMap<usize, usize> = HashMap::new();
    let mut slot = |t: usize, texts: &mut Vec<usize>| -> usize {
        *at.entry(t).or_insert_with(|| {
            texts.push(t);
            texts.len() - 1
        })
    };
    let mut anchors = Vec::new();
    let mut targets = Vec::new();
    let mut rows: Vec<(usize, usize, usize)> = Vec::new(); // (item, anchor slot, target slot)
    let mut item_slots: Vec<(Vec<usize>, Vec<usize>)> = Vec::new();
    for (k, it) in items.iter().enumerate() {
        let a = slot(it.anchor, &mut texts);
        let pos: Vec<usize> = it.pos.iter().map(|&t| slot(t, &mut texts)).collect();
        let neg: Vec<usize> = it.neg.iter().map(|&t| slot(t, &mut texts)).collect();
        for &p in &pos {
            rows.push((k, a, p));
        }
        let mut own = vec![a];
        own.extend(&pos);
        item_slots.push((own, neg));
    }
    let n = texts.len();
    let mut mask = vec![f32::NEG_INFINITY; rows.len() * n];
    for (r, &(k, a, p)) in rows.iter().enumerate() {
        anchors.push(a as u32);
        targets.push(p as u32);
        let m = &mut mask[r * n..(r + 1) * n];
        m[p] = 0.0;
        for &s in &item_slots[k].1 {
            m[s] = 0.0;
        }
        if items[k].in_batch {
            for (j, other) in items.iter().enumerate() {
                if j == k || !other.in_batch || other.key == items[k].key {
                    continue;
                }
                for &s in item_slots[j].0.iter().chain(&item_slots[j].1) {
                    if !item_slots[k].0.contains(&s) {
                        m[s] = 0.0;
                    }
                }
            }
        }
    }
    let e = enc.pooled(&texts)?;
    let a = e.index_select(&Tensor::from_vec(anchors, rows.len(), &Device::Cpu)?, 0)?;
    let sims = (a.matmul(&e.t()?)? / temperature as f64)?;
    let logits = sims.add(&Tensor::from_vec(mask, (rows.len(), n), &Device::Cpu)?)?;
    let m = logits.max_keepdim(1)?.detach();
    let lse = (logits.broadcast_sub(&m)?.exp()?.sum_keepdim(1)?.log()? + m)?;
    let tgt = logits.gather(
        &Tensor::from_vec(targets, (rows.len(), 1), &Device::Cpu)?,
        1,
    )?;
    Ok((lse - tgt)?.mean_all()?)
}

/// Trains LoRA pairs on `records` (labelled: rephrases and locality prompts) and, when given,
/// a relation lexicon. `dir` is the checkpoint; `scope` tokenizes (the runtime's tokenizer).
pub fn tune(
    dir: &Path,
    scope: &ScopeModel,
    records: &[EditRecord],
    lexicon: Option<&Lexicon>,
    validation: &[EditRecord],
    o: &TuneOptions,
    progress: &mut dyn FnMut(String),
) -> Result<(Encoder, TuneReport)> {
    let t0 = std::time::Instant::now();
    o.check(&BertConfig::read(dir)?)?;
    let mut bert = Bert::load(dir)?;
    bert.add_lora(o.layers, o.rank, o.scale, o.seed)?;
    let first = bert.n_layer() - o.layers;
    let mut enc = Encoder::new(bert, first, dir)?;
    let mut rng = Rng::new(o.seed ^ 0x5eed);
    let base_items = record_items(&mut enc, scope, records)?;
    let mut subjects: Vec<String> = records.iter().filter_map(|r| r.subject.clone()).collect();
    subjects.sort();
    subjects.dedup();
    if subjects.is_empty() {
        subjects.push("it".into());
    }
    let mut opt = Adam::new(enc.bert.vars(), o.lr)?;
    let mut rep = TuneReport::default();
    let mut report_auc = |enc: &mut Encoder,
                          when: &str,
                          progress: &mut dyn FnMut(String)|
     -> Result<()> {
        if !validation.is_empty() {
            let (p, s) = hard_case_auc(enc, scope, validation)?;
            rep.validation_auc = (p, s);
            progress(format!(
                "{when}: validation AUC, rephrase vs same subject: pooled {p:.3}, subject stripped {s:.3}"
            ));
        }
        Ok(())
    };
    report_auc(&mut enc, "before", progress)?;
    for epoch in 0..o.epochs {
        let mut items = base_items.clone();
        if let Some(lex) = lexicon {
            items.extend(lexicon_items(
                &mut enc,
                scope,
                lex,
                &subjects,
                o.lexicon_items,
                o.lexicon_negatives,
                &mut rng,
            )?);
        }
        enc.cache_frozen()?;
        rng.shuffle(&mut items);
        let mut total = 0.0;
        let mut steps = 0;
        for chunk in items.chunks(o.batch.max(1)) {
            let refs: Vec<&Item> = chunk.iter().collect();
            let loss = batch_loss(&enc, &refs, o.temperature)?;
            let g = loss.backward()?;
            opt.step(&g)?;
            let l = loss.to_scalar::<f32>()?;
            if !l.is_finite() {
                return Err(bad(format!("loss is not finite at epoch {epoch}")));
            }
            total += l;
            steps += 1;
            rep.last_loss = l;
        }
        report_auc(&mut enc, &format!("epoch {}", epoch + 1), progress)?;
        rep.steps += steps;
        rep.items = items.len();
        progress(format!(
            "epoch {}: {} items, mean loss {:.4}, {:.0} s",
            epoch + 1,
            items.len(),
            total / steps.max(1) as f32,
            t0.elapsed().as_secs_f64()
        ));
    }
    rep.texts = enc.ids.len();
    rep.seconds = t0.elapsed().as_secs_f64();
    Ok((enc, rep))
}

/// The AUC of `pos` scores against `neg` scores (ties count half).
pub fn auc(pos: &[f32], neg: &[f32]) -> f64 {
    if pos.is_empty() || neg.is_empty() {
        return f64::NAN;
    }
    let mut s = 0.0;
    for &p in pos {
        for &n in neg {
            s += if p > n {
                1.0
            } else if p == n {
                0.5
            } else {
                0.0
            };
        }
    }
    s / (pos.len() * neg.len()) as f64
}

/// Rephrase-against-same-subject AUCs of an encoder on labelled records, each pair scored
/// against its own record: (pooled cosine, cosine with the subject replaced by "it").
pub fn hard_case_auc(
    enc: &mut Encoder,
    scope: &ScopeModel,
    records: &[EditRecord],
) -> Result<(f64, f64)> {
    let mut pairs: Vec<(usize, usize, bool, bool)> = Vec::new(); // (a, b, positive, stripped)
    for r in records {
        let a = enc.add(scope, &r.prompt)?;
        let subj = r.subject.as_deref().unwrap_or("");
        let sa = strip_subject(&r.prompt, subj);
        let mut push = |enc: &mut Encoder, t: &str, positive: bool| -> Result<()> {
            let b = enc.add(scope, t)?;
            pairs.push((a, b, positive, false));
            if let (Some(sa), Some(sb)) = (sa.as_deref(), strip_subject(t, subj)) {
                let (x, y) = (enc.add(scope, sa)?, enc.add(scope, &sb)?);
                pairs.push((x, y, positive, true));
            }
            Ok(())
        };
        for t in &r.rephrase_prompts {
            push(enc, t, true)?;
        }
        for p in r
            .locality
            .iter()
            .filter(|p| p.kind == "Subject_Specificity")
        {
            push(enc, &p.prompt, false)?;
        }
    }
    enc.cache_frozen()?;
    // Only the validation texts (the cache also holds every training text).
    let mut used: Vec<usize> = pairs.iter().flat_map(|p| [p.0, p.1]).collect();
    used.sort_unstable();
    used.dedup();
    let mut e: HashMap<usize, Vec<f32>> = HashMap::with_capacity(used.len());
    for chunk in used.chunks(64) {
        let t = enc.pooled(chunk)?.detach();
        e.extend(chunk.iter().copied().zip(t.to_vec2::<f32>()?));
    }
    let mut s: [[Vec<f32>; 2]; 2] = Default::default();
    for (a, b, positive, stripped) in pairs {
        let c: f32 = e[&a].iter().zip(&e[&b]).map(|(x, y)| x * y).sum();
        s[stripped as usize][positive as usize].push(c);
    }
    Ok((auc(&s[0][1], &s[0][0]), auc(&s[1][1], &s[1][0])))
}

/// The tuned factors as safetensors: per adapted projection `{name}.lora_a` `[rank, in]` and
/// `{name}.lora_b` `[out, rank]`, already multiplied by the scale into B; `provenance` (how they
/// were made: [`crate::artifact`]) goes into the metadata, which conversion does not read.
pub fn factors_to_bytes(
    bert: &Bert,
    provenance: std::collections::BTreeMap<String, String>,
) -> Result<Vec<u8>> {
    let mut map: Vec<(String, Tensor)> = Vec::new();
    let mut names: Vec<&String> = bert.lora.keys().collect();
    names.sort();
    for n in names {
        let p = &bert.lora[n];
        map.push((format!("{n}.lora_a"), p.a.as_tensor().clone()));
        map.push((
            format!("{n}.lora_b"),
            (p.b.as_tensor() * bert.scale as f64)?,
        ));
    }
    let views: Vec<(String, Vec<u8>, Vec<usize>)> = map
        .iter()
        .map(|(n, t)| {
            let v: Vec<f32> = t.flatten_all()?.to_vec1()?;
            let bytes = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            Ok((n.clone(), bytes, t.dims().to_vec()))
        })
        .collect::<Result<_>>()?;
    let tensors: Vec<(String, safetensors::tensor::TensorView<'_>)> = views
        .iter()
        .map(|(n, b, s)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| bad(format!("{n}: {e}")))
        })
        .collect::<Result<_>>()?;
    crate::artifact::serialize(tensors, provenance).map_err(|e| bad(format!("serialize: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Options are checked against the checkpoint's sizes, naming the flag and its range:
    /// `--rank 99999999999` used to abort allocating the factors, `--lr NaN` to train NaN.
    #[test]
    fn options_checked_against_the_checkpoint() {
        let cfg = BertConfig::from_json(&crate::scope_model::tests::minilm_config("x", 0.into()))
            .unwrap();
        TuneOptions::default().check(&cfg).unwrap();
        let e = |f: &dyn Fn(&mut TuneOptions)| {
            let mut o = TuneOptions::default();
            f(&mut o);
            o.check(&cfg).unwrap_err().to_string()
        };
        assert!(e(&|o| o.rank = 99999999999).contains("--rank 99999999999 is outside 1..=384"));
        assert!(e(&|o| o.rank = 0).contains("--rank 0"));
        assert!(e(&|o| o.layers = 7).contains("--layers 7 is outside 1..=6"));
        assert!(e(&|o| o.epochs = 0).contains("--epochs 0"));
        assert!(e(&|o| o.epochs = 99999999999).contains("--epochs 99999999999 is outside 1..=1000"));
        assert!(e(&|o| o.lr = f64::NAN).contains("--lr NaN"));
        assert!(e(&|o| o.lr = -1.0).contains("--lr -1"));
        assert!(e(&|o| o.temperature = 0.0).contains("--temperature 0"));
        assert!(e(&|o| o.lexicon_items = MAX_LEXICON_ITEMS + 1).contains("--lexicon-items"));
    }
}
