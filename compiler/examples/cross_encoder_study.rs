//! Would a cross-encoder separate the hard case? A study, not the router: all-MiniLM-L6-v2 reads
//! "[CLS] query [SEP] record prompt [SEP]" and a linear read-out of its unit mean-pooled row
//! says "same fact". LoRA on the top layers plus the read-out are trained (binary cross-entropy)
//! on labelled records: a record's rephrases against its prompt are positives; its same-subject
//! and same-relation probes, and another record's prompt, negatives. Scored on other sets:
//! rephrase against same-subject AUC, and rephrase recall where the same-subject probes are
//! accepted at most 5 / 2 / 1.5 % of the time; the deployed bi-encoder's cosine on the same pairs
//! for comparison (the scope head's own scores come from `amend scope-model route --dump`).
//!
//! Measured (session 24, docs/eval.md): trained on dev and heldout..heldout6, scored on
//! heldout7+8, the cross-encoder reached a rephrase-against-same-subject AUC of 0.76 (2 layers,
//! rank 8, 3 epochs) and 0.54 (3 layers, rank 16, 3 epochs; 4 layers at a higher rate did not
//! train), against 0.909 for the tuned bi-encoder's cosine: with ~1,400 positive pairs it learns
//! the training records, not the hard case. Not adopted.
//!
//! Usage: cross_encoder_study CHECKPOINT_DIR SCOPE.gguf TRAIN.json[,..] VALID.json[,..]
//!        [layers rank epochs lr]
use std::collections::HashMap;
use std::path::Path;

use amend_compiler::dataset::{self, DataFormat, EditRecord};
use amend_compiler::methods::Adam;
use amend_compiler::scope_tune::{auc, Bert};
use amend_runtime::ScopeModel;
use candle_core::{DType, Device, Tensor, Var};

struct Pair {
    ids: Vec<u32>,
    label: f32,
    /// 0 rephrase, 1 same subject, 2 same relation, 3 another record's prompt.
    kind: u8,
}

fn tokens(scope: &ScopeModel, t: &str) -> Vec<u32> {
    let mut v: Vec<u32> = scope
        .tokenize(t)
        .unwrap()
        .into_iter()
        .map(|x| x as u32)
        .collect();
    v.truncate(120);
    v
}

fn pairs(scope: &ScopeModel, recs: &[EditRecord], cls: u32, sep: u32, others: bool) -> Vec<Pair> {
    let mut out = Vec::new();
    let mut mk = |q: &str, p: &str, label: f32, kind: u8| {
        let mut ids = vec![cls];
        ids.extend(tokens(scope, q));
        ids.push(sep);
        ids.extend(tokens(scope, p));
        ids.push(sep);
        out.push(Pair { ids, label, kind });
    };
    for (i, r) in recs.iter().enumerate() {
        for q in &r.rephrase_prompts {
            mk(q, &r.prompt, 1.0, 0);
        }
        for l in &r.locality {
            match l.kind.as_str() {
                "Subject_Specificity" => mk(&l.prompt, &r.prompt, 0.0, 1),
                "Relation_Specificity" => mk(&l.prompt, &r.prompt, 0.0, 2),
                _ => {}
            }
        }
        if others && recs.len() > 1 {
            let o = &recs[(i * 7 + 3) % recs.len()];
            if o.id != r.id {
                mk(&o.prompt, &r.prompt, 0.0, 3);
            }
        }
    }
    out
}

/// Embeds and pads `batch` pairs, runs the frozen layers below `first`.
fn frozen(bert: &Bert, ps: &[&Pair], first: usize) -> (Tensor, Tensor) {
    let n = ps.iter().map(|p| p.ids.len()).max().unwrap();
    let mut xs = Vec::new();
    let mut mask = Vec::new();
    for p in ps {
        let x = bert.embed(&p.ids).unwrap();
        let len = x.dim(0).unwrap();
        let x = if len < n {
            Tensor::cat(
                &[
                    &x,
                    &Tensor::zeros((n - len, x.dim(1).unwrap()), DType::F32, &Device::Cpu).unwrap(),
                ],
                0,
            )
            .unwrap()
        } else {
            x
        };
        xs.push(x);
        mask.extend((0..n).map(|i| if i < len { 0f32 } else { -1e4 }));
    }
    let mask = Tensor::from_vec(mask, (ps.len(), 1, 1, n), &Device::Cpu).unwrap();
    let mut x = Tensor::stack(&xs, 0).unwrap();
    for l in 0..first {
        x = bert.layer(l, &x, &mask).unwrap();
    }
    (x.detach(), mask)
}

/// Logits `[b]` from cached frozen states.
fn logits(bert: &Bert, x: &Tensor, mask: &Tensor, first: usize, w: &Var, b: &Var) -> Tensor {
    let mut x = x.clone();
    for l in first..bert.n_layer() {
        x = bert.layer(l, &x, mask).unwrap();
    }
    let keep = mask
        .squeeze(1)
        .unwrap()
        .squeeze(1)
        .unwrap()
        .ge(-1.0)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let sum = x
        .broadcast_mul(&keep.unsqueeze(2).unwrap())
        .unwrap()
        .sum(1)
        .unwrap();
    let mean = sum.broadcast_div(&keep.sum_keepdim(1).unwrap()).unwrap();
    let unit = mean
        .broadcast_div(&mean.sqr().unwrap().sum_keepdim(1).unwrap().sqrt().unwrap())
        .unwrap();
    unit.matmul(&w.as_tensor().unsqueeze(1).unwrap())
        .unwrap()
        .squeeze(1)
        .unwrap()
        .broadcast_add(b.as_tensor())
        .unwrap()
}

fn recall_at(pos: &[f32], neg: &[f32], fpr: f64) -> (f64, f32) {
    let mut n = neg.to_vec();
    n.sort_by(|a, b| b.total_cmp(a));
    // The lowest threshold that accepts at most fpr of the negatives (strictly above it).
    let k = (fpr * n.len() as f64).floor() as usize;
    let t = if k < n.len() { n[k] } else { f32::NEG_INFINITY };
    let r = pos.iter().filter(|&&p| p > t).count() as f64 / pos.len() as f64;
    (100.0 * r, t)
}

fn load(list: &str) -> Vec<EditRecord> {
    list.split(',')
        .flat_map(|f| dataset::load(Path::new(f), DataFormat::Auto).unwrap())
        .collect()
}

fn report(name: &str, scores: &[(f32, u8)]) {
    let get = |k: u8| -> Vec<f32> { scores.iter().filter(|s| s.1 == k).map(|s| s.0).collect() };
    let (pos, subj, rel) = (get(0), get(1), get(2));
    let r = |fpr| recall_at(&pos, &subj, fpr).0;
    let rr = |fpr| recall_at(&pos, &rel, fpr).0;
    println!(
        "{name}: AUC rephrase vs same subject {:.3}, vs same relation {:.3}; rephrase recall at same-subject acceptance <= 5 / 2 / 1.5 %: {:.1} / {:.1} / {:.1}; at same-relation acceptance <= 2 %: {:.1}  (n {} / {} / {})",
        auc(&pos, &subj), auc(&pos, &rel), r(0.05), r(0.02), r(0.015), rr(0.02), pos.len(), subj.len(), rel.len()
    );
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let dir = Path::new(&a[1]);
    let scope = ScopeModel::open(&a[2], Some(2)).unwrap();
    let train = load(&a[3]);
    let valid = load(&a[4]);
    let layers: usize = a.get(5).map_or(2, |s| s.parse().unwrap());
    let rank: usize = a.get(6).map_or(8, |s| s.parse().unwrap());
    let epochs: usize = a.get(7).map_or(2, |s| s.parse().unwrap());
    let lr: f64 = a.get(8).map_or(1e-3, |s| s.parse().unwrap());
    let tok: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("tokenizer.json")).unwrap()).unwrap();
    let id = |t: &str| {
        tok.pointer(&format!("/model/vocab/{t}"))
            .unwrap()
            .as_u64()
            .unwrap() as u32
    };
    let (cls, sep) = (id("[CLS]"), id("[SEP]"));

    // The deployed bi-encoder on the validation pairs: cosine of query and record prompt.
    let mut cache: HashMap<String, Vec<f32>> = HashMap::new();
    let mut enc = |t: &str| -> Vec<f32> {
        cache
            .entry(t.to_string())
            .or_insert_with(|| scope.encode(t).unwrap().pooled)
            .clone()
    };
    let mut bi = Vec::new();
    for r in &valid {
        let p = enc(&r.prompt);
        let cos = |q: &[f32]| q.iter().zip(&p).map(|(x, y)| x * y).sum::<f32>();
        for q in &r.rephrase_prompts {
            bi.push((cos(&enc(q)), 0u8));
        }
        for l in &r.locality {
            let k = match l.kind.as_str() {
                "Subject_Specificity" => 1,
                "Relation_Specificity" => 2,
                _ => continue,
            };
            bi.push((cos(&enc(&l.prompt)), k));
        }
    }
    report("deployed bi-encoder, pooled cosine", &bi);

    let mut bert = Bert::load(dir).unwrap();
    bert.add_lora(layers, rank, 2.0, 1).unwrap();
    let first = bert.n_layer() - layers;
    let w = Var::from_tensor(&Tensor::zeros(384, DType::F32, &Device::Cpu).unwrap()).unwrap();
    let b = Var::from_tensor(&Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap()).unwrap();
    let mut vars = bert.vars();
    vars.push(w.clone());
    vars.push(b.clone());
    let mut opt = Adam::new(vars, lr).unwrap();
    let t0 = std::time::Instant::now();
    let mut tp = pairs(&scope, &train, cls, sep, true);
    let vp = pairs(&scope, &valid, cls, sep, false);
    let n_pos = tp.iter().filter(|p| p.label > 0.5).count();
    let pos_w = (tp.len() - n_pos) as f32 / n_pos as f32;
    println!(
        "train pairs {} ({} positive), validation pairs {}",
        tp.len(),
        n_pos,
        vp.len()
    );
    // Pairs sorted by length so batches pad little; batches are shuffled, not their contents.
    tp.sort_by_key(|p| p.ids.len());
    let batch = 32;
    let tb: Vec<(Tensor, Tensor, Tensor)> = tp
        .chunks(batch)
        .map(|c| {
            let refs: Vec<&Pair> = c.iter().collect();
            let (x, m) = frozen(&bert, &refs, first);
            let y = Tensor::from_vec(
                c.iter().map(|p| p.label).collect::<Vec<_>>(),
                c.len(),
                &Device::Cpu,
            )
            .unwrap();
            (x, m, y)
        })
        .collect();
    let vb: Vec<(Tensor, Tensor, Vec<u8>)> = vp
        .chunks(64)
        .map(|c| {
            let refs: Vec<&Pair> = c.iter().collect();
            let (x, m) = frozen(&bert, &refs, first);
            (x, m, c.iter().map(|p| p.kind).collect())
        })
        .collect();
    println!("frozen layers cached: {:.0} s", t0.elapsed().as_secs_f64());
    let mut order: Vec<usize> = (0..tb.len()).collect();
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    for epoch in 0..epochs {
        for i in (1..order.len()).rev() {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            order.swap(i, (seed % (i as u64 + 1)) as usize);
        }
        let mut total = 0.0;
        for &k in &order {
            let (x, m, y) = &tb[k];
            let z = logits(&bert, x, m, first, &w, &b);
            // Weighted BCE with logits: pos_w * y * softplus(-z) + (1 - y) * softplus(z).
            let sp = |t: &Tensor| -> Tensor { (t.exp().unwrap() + 1.0).unwrap().log().unwrap() };
            let zc = z.clamp(-30f32, 30f32).unwrap();
            let lp = (y * sp(&zc.neg().unwrap())).unwrap() * pos_w as f64;
            let ln = ((y.ones_like().unwrap() - y).unwrap() * sp(&zc)).unwrap();
            let loss = (lp.unwrap() + ln).unwrap().mean_all().unwrap();
            let g = loss.backward().unwrap();
            opt.step(&g).unwrap();
            total += loss.to_scalar::<f32>().unwrap();
        }
        let mut scores = Vec::new();
        for (x, m, kinds) in &vb {
            let z: Vec<f32> = logits(&bert, x, m, first, &w, &b).to_vec1().unwrap();
            scores.extend(z.into_iter().zip(kinds.iter().copied()));
        }
        println!(
            "epoch {}: mean loss {:.4}, {:.0} s",
            epoch + 1,
            total / tb.len() as f32,
            t0.elapsed().as_secs_f64()
        );
        report(
            &format!(
                "cross-encoder ({layers} layers, rank {rank}), epoch {}",
                epoch + 1
            ),
            &scores,
        );
    }
}
