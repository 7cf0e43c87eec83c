//! Retrieval memory (SERAC family): edits as text, embeddings and a calibrated threshold.
//!
//! The runtime embeds a request (by default with the base model itself, see [`Embedder`]),
//! finds the most similar memory by cosine ([`Memory::nearest`]) and, when the score reaches the
//! threshold, generates from the counterfactual prompt [`Memory::render`] instead of the user's
//! prompt. Out of scope, the request runs on the base model untouched.
//!
//! Template placeholders (anything else between braces is rejected by [`Memory::new`]):
//! `{edit}` the record's edit text, `{prompt}` the user's prompt (required), `{edit_prompt}` the
//! record's prompt, `{target}` the record's target, and `{{` / `}}` for literal braces.

use alloc::string::String;
use alloc::vec::Vec;

use super::{
    check_matrix, check_unit_rows, dot, max_dot_indexed, F16Rows, InvalidPayload, Pooling,
};
use crate::site::Site;

/// The text of one memorized edit (borrowed from the bundle).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryRecord<'a> {
    pub edit_id: &'a str,
    /// The edit's prompt, e.g. "The capital of France is".
    pub prompt: &'a str,
    /// The new target, e.g. "Berlin".
    pub target: &'a str,
    /// The edit as a statement placed in context, e.g. "The capital of France is Berlin."
    pub text: &'a str,
}

/// What computes request embeddings for the scope check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Embedder<'a> {
    /// The base model's hidden states at `layer`/`site`, pooled over the prompt's tokens.
    BaseModel {
        layer: u32,
        site: Site,
        pooling: Pooling,
    },
    /// A separate GGUF embedding model named by the bundle.
    External { model_id: &'a str },
}

/// The most similar memory.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MemoryHit {
    pub index: usize,
    /// Cosine similarity in `[-1, 1]`.
    pub score: f32,
    /// `score >= threshold`.
    pub in_scope: bool,
}

/// A retrieval memory: embeddings `[n, embed_dim]` (unit rows) and one record per row.
#[derive(Clone, Debug)]
pub struct Memory<'a> {
    embed_dim: usize,
    embeddings: &'a [f32],
    threshold: f32,
    records: Vec<MemoryRecord<'a>>,
    template: &'a str,
    embedder: Embedder<'a>,
    /// f16 copy of the embeddings for a half-bandwidth first pass (x86_64 with F16C only);
    /// results are identical with or without it.
    index: Option<F16Rows>,
}

/// A piece of a parsed template.
enum Piece<'t> {
    Lit(&'t str),
    Edit,
    Prompt,
    EditPrompt,
    Target,
}

/// Walk a template, calling `f` per piece; `Err` on an unknown or unclosed placeholder.
fn walk_template<'t>(t: &'t str, mut f: impl FnMut(Piece<'t>)) -> Result<(), InvalidPayload> {
    let mut rest = t;
    while let Some(i) = rest.find(['{', '}']) {
        f(Piece::Lit(&rest[..i]));
        let tail = &rest[i..];
        if let Some(r) = tail.strip_prefix("{{") {
            f(Piece::Lit("{"));
            rest = r;
        } else if let Some(r) = tail.strip_prefix("}}") {
            f(Piece::Lit("}"));
            rest = r;
        } else if tail.starts_with('}') {
            return Err(InvalidPayload(
                "memory: template has an unmatched '}' (use '}}')",
            ));
        } else {
            let end = tail
                .find('}')
                .ok_or(InvalidPayload("memory: template has an unclosed '{'"))?;
            f(match &tail[1..end] {
                "edit" => Piece::Edit,
                "prompt" => Piece::Prompt,
                "edit_prompt" => Piece::EditPrompt,
                "target" => Piece::Target,
                _ => {
                    return Err(InvalidPayload(
                        "memory: unknown template placeholder (known: edit, prompt, edit_prompt, target)",
                    ))
                }
            });
            rest = &tail[end + 1..];
        }
    }
    f(Piece::Lit(rest));
    Ok(())
}

impl<'a> Memory<'a> {
    /// The template the compiler uses by default.
    pub const DEFAULT_TEMPLATE: &'static str = "{edit}\n{prompt}";

    /// Validate: `embeddings` is `[records.len(), embed_dim]`, finite, rows of unit L2 norm;
    /// threshold finite in `[-1, 1]`; the template parses and uses `{prompt}`.
    pub fn new(
        embed_dim: usize,
        embeddings: &'a [f32],
        threshold: f32,
        records: Vec<MemoryRecord<'a>>,
        template: &'a str,
        embedder: Embedder<'a>,
    ) -> Result<Memory<'a>, InvalidPayload> {
        if embed_dim == 0 {
            return Err(InvalidPayload("memory: embed_dim must be positive"));
        }
        if records.is_empty() {
            return Err(InvalidPayload("memory: no records"));
        }
        check_matrix(
            embeddings,
            records.len(),
            embed_dim,
            "memory: embeddings must be [records.len(), embed_dim]",
            "memory: non-finite embedding",
        )?;
        check_unit_rows(
            embeddings,
            embed_dim,
            "memory: embeddings must be L2-normalized",
        )?;
        if !(threshold.is_finite() && (-1.0..=1.0).contains(&threshold)) {
            return Err(InvalidPayload(
                "memory: threshold must be a cosine in [-1, 1]",
            ));
        }
        let mut has_prompt = false;
        walk_template(template, |p| has_prompt |= matches!(p, Piece::Prompt))?;
        if !has_prompt {
            return Err(InvalidPayload("memory: template must contain {prompt}"));
        }
        if let Embedder::External { model_id: "" } = embedder {
            return Err(InvalidPayload("memory: external embedder needs a model id"));
        }
        Ok(Memory {
            embed_dim,
            embeddings,
            threshold,
            records,
            template,
            embedder,
            index: None,
        })
    }

    /// Add an f16 copy of the embeddings (built here, half the f32 size) so each
    /// [`Memory::nearest`] first scans half the bytes, then rescores the few rows the f16 error
    /// bound cannot rule out in f32: results are identical, scans ~2x faster at 10,000 memories.
    /// Only built where the CPU can use it (x86_64 with AVX2, F16C and FMA, `std`). Worth it when
    /// the `Memory` is kept across requests; `new` alone stays a validation pass.
    pub fn with_f16_index(mut self) -> Self {
        self.index = F16Rows::if_useful(self.embeddings, self.embed_dim);
        self
    }

    /// Whether [`Memory::with_f16_index`] built an index on this CPU.
    pub fn has_f16_index(&self) -> bool {
        self.index.is_some()
    }

    pub fn embed_dim(&self) -> usize {
        self.embed_dim
    }
    pub fn len(&self) -> usize {
        self.records.len()
    }
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }
    pub fn threshold(&self) -> f32 {
        self.threshold
    }
    pub fn template(&self) -> &'a str {
        self.template
    }
    pub fn embedder(&self) -> Embedder<'a> {
        self.embedder
    }
    pub fn records(&self) -> &[MemoryRecord<'a>] {
        &self.records
    }
    pub fn record(&self, i: usize) -> Option<&MemoryRecord<'a>> {
        self.records.get(i)
    }
    pub fn embedding(&self, i: usize) -> &'a [f32] {
        &self.embeddings[i * self.embed_dim..(i + 1) * self.embed_dim]
    }

    /// The most similar active memory by cosine (the query need not be normalized). `None` when
    /// nothing is active, the query is not `embed_dim` long, or it has no direction.
    pub fn nearest(&self, query_embedding: &[f32], active: Option<&[bool]>) -> Option<MemoryHit> {
        if query_embedding.len() != self.embed_dim {
            return None;
        }
        let norm = libm::sqrtf(dot(query_embedding, query_embedding));
        if !(norm.is_finite() && norm > 0.0) {
            return None;
        }
        let (index, d) = max_dot_indexed(
            self.embeddings,
            self.embed_dim,
            self.index.as_ref(),
            query_embedding,
            active,
        )?;
        let score = (d / norm).clamp(-1.0, 1.0);
        Some(MemoryHit {
            index,
            score,
            in_scope: score >= self.threshold,
        })
    }

    /// The counterfactual prompt: the template with record `index` and `user_prompt` filled in
    /// (`None` for an index out of range).
    pub fn render(&self, index: usize, user_prompt: &str) -> Option<String> {
        let r = self.records.get(index)?;
        let mut out = String::with_capacity(self.template.len() + r.text.len() + user_prompt.len());
        // The template was validated in `new`, so walking it cannot fail here.
        let _ = walk_template(self.template, |p| {
            out.push_str(match p {
                Piece::Lit(s) => s,
                Piece::Edit => r.text,
                Piece::Prompt => user_prompt,
                Piece::EditPrompt => r.prompt,
                Piece::Target => r.target,
            })
        });
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    fn rec(id: &'static str) -> MemoryRecord<'static> {
        MemoryRecord {
            edit_id: id,
            prompt: "The capital of France is",
            target: "Berlin",
            text: "The capital of France is Berlin.",
        }
    }

    const EMB: Embedder<'static> = Embedder::BaseModel {
        layer: 6,
        site: Site::ResidualOut,
        pooling: Pooling::Mean,
    };

    #[test]
    fn nearest_threshold_and_mask() {
        let emb = [1.0, 0.0, 0.0, 1.0];
        let m = Memory::new(
            2,
            &emb,
            0.8,
            vec![rec("a"), rec("b")],
            Memory::DEFAULT_TEMPLATE,
            EMB,
        )
        .unwrap();
        // cos((3, 4), e1) = 0.8: exactly at the threshold is in scope.
        let h = m.nearest(&[3.0, 4.0], None).unwrap();
        assert_eq!(h.index, 1);
        assert_eq!(h.score, 0.8);
        assert!(h.in_scope);
        let h = m.nearest(&[4.0, 3.0], Some(&[false, true])).unwrap();
        assert_eq!(h.index, 1);
        assert!((h.score - 0.6).abs() < 1e-6 && !h.in_scope);
        let h = m.nearest(&[-1.0, -0.1], None).unwrap();
        assert!(h.score < 0.0 && !h.in_scope);
        assert!(m.nearest(&[0.0, 0.0], None).is_none());
        assert!(m.nearest(&[1.0], None).is_none());
        assert!(m.nearest(&[1.0, 0.0], Some(&[])).is_none());
    }

    #[test]
    fn f16_index_changes_nothing() {
        let (n, d) = (300, 64);
        let mut emb: Vec<f32> = (0..n * d)
            .map(|i| libm::sinf(i as f32 * 0.618) + 0.01)
            .collect();
        emb.chunks_exact_mut(d).for_each(|r| {
            crate::families::l2_normalize(r);
        });
        let recs: Vec<_> = (0..n).map(|_| rec("x")).collect();
        let plain = Memory::new(d, &emb, 0.9, recs.clone(), Memory::DEFAULT_TEMPLATE, EMB).unwrap();
        let fast = plain.clone().with_f16_index();
        for t in 0..30 {
            let q: Vec<f32> = (0..d)
                .map(|j| libm::cosf((t * d + j) as f32 * 0.37) * 50.0)
                .collect();
            assert_eq!(plain.nearest(&q, None), fast.nearest(&q, None));
            let hit = fast.nearest(&emb[t * d..(t + 1) * d], None).unwrap();
            assert_eq!(hit.index, t);
            assert!(hit.in_scope);
        }
    }

    #[test]
    fn render_templates() {
        let emb = [1.0, 0.0];
        let m = Memory::new(2, &emb, 0.5, vec![rec("a")], Memory::DEFAULT_TEMPLATE, EMB).unwrap();
        assert_eq!(
            m.render(0, "Q: France's capital?").unwrap(),
            "The capital of France is Berlin.\nQ: France's capital?"
        );
        assert_eq!(m.render(1, "x"), None);
        let t = "{{new}} {edit_prompt} -> {target}; {prompt}}}";
        let m = Memory::new(2, &emb, 0.5, vec![rec("a")], t, EMB).unwrap();
        assert_eq!(
            m.render(0, "P").unwrap(),
            "{new} The capital of France is -> Berlin; P}"
        );
        for bad in ["{edit}", "{prompt} {nope}", "{prompt", "{prompt} }", ""] {
            assert!(
                Memory::new(2, &emb, 0.5, vec![rec("a")], bad, EMB).is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn rejects_bad_payloads() {
        let t = Memory::DEFAULT_TEMPLATE;
        assert!(Memory::new(2, &[1.0, 0.0], 0.5, vec![], t, EMB).is_err());
        assert!(Memory::new(2, &[1.0, 0.0, 0.0], 0.5, vec![rec("a")], t, EMB).is_err());
        assert!(Memory::new(2, &[2.0, 0.0], 0.5, vec![rec("a")], t, EMB).is_err());
        assert!(Memory::new(2, &[f32::NAN, 0.0], 0.5, vec![rec("a")], t, EMB).is_err());
        assert!(Memory::new(2, &[1.0, 0.0], 1.5, vec![rec("a")], t, EMB).is_err());
        assert!(Memory::new(2, &[1.0, 0.0], f32::NAN, vec![rec("a")], t, EMB).is_err());
        assert!(Memory::new(
            2,
            &[1.0, 0.0],
            0.5,
            vec![rec("a")],
            t,
            Embedder::External { model_id: "" }
        )
        .is_err());
        let ext = Embedder::External {
            model_id: "minilm-q8",
        };
        assert_eq!(
            Memory::new(2, &[1.0, 0.0], 0.5, vec![rec("a")], t, ext)
                .unwrap()
                .embedder(),
            ext
        );
    }
}
