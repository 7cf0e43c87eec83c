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
use crate::bundle::format::{is_cosine, is_group_weight, is_relation_margin};
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
    /// A separate GGUF embedding model (the scope model), pinned by its fingerprint (`None`:
    /// a v1.0 payload that only named it; no runtime can check it).
    External {
        model_id: &'a str,
        fingerprint: Option<&'a [u8; 32]>,
    },
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
    /// Subject-aware routing data (scope-model memories).
    routing: Option<ScopeRouting<'a>>,
}

/// What subject-aware routing needs per record (see [`Memory::route`]).
#[derive(Clone, Debug)]
pub struct ScopeRouting<'a> {
    embed_dim: usize,
    /// `[n, embed_dim]` unit rows: the mean of each prompt's non-subject token rows.
    relation: &'a [f32],
    /// The subject's token rows (unit), record after record.
    subject_rows: &'a [f32],
    /// Record i's subject rows are `subject_rows[offsets[i]..offsets[i + 1]]` (in rows).
    offsets: Vec<usize>,
    subject_threshold: f32,
    relation_threshold: f32,
    /// A trained scope head (format 1.3): when present it alone decides "in scope".
    head: Option<ScopeHead<'a>>,
    /// Relation groups (format 1.4): for a record with a group, the query's group decides.
    groups: Option<RelationGroups<'a>>,
    /// Per record, its subject (what [`strip_subject`](super::strip_subject) replaces in the
    /// query, found as users type it).
    subjects: Vec<&'a str>,
}

/// Relation groups of a memory (format 1.4): a lexicon of relation templates (unit rows of the
/// scope model, each template's subject replaced by "it") in named groups, and each record's
/// group. A text belongs to the group of its nearest template when the cosine reaches
/// `min_score`. Rephrases keep their record's relation and a subject's other facts do not, so
/// for a record with a group, "in scope" is: the pooled and subject terms pass and the query,
/// its subject replaced ([`strip_subject`](super::strip_subject)), falls in the record's group,
/// or (format 1.5) its best template in the record's group scores within `margin` of its best template overall: a
/// rephrase worded like a sibling relation stays home, while another relation of the subject
/// sits far below (docs/eval.md).
#[derive(Clone, Debug)]
pub struct RelationGroups<'a> {
    embed_dim: usize,
    templates: &'a [f32],
    template_group: &'a [u16],
    names: Vec<&'a str>,
    record_group: &'a [u16],
    min_score: f32,
    margin: f32,
    vote: Option<f32>,
}

impl<'a> RelationGroups<'a> {
    /// A record without a group.
    pub const NONE: u16 = u16::MAX;

    /// Validates every size, group id and value; `record_group` has one entry per record of the
    /// memory it is attached to ([`ScopeRouting::with_groups`]).
    pub fn new(
        embed_dim: usize,
        templates: &'a [f32],
        template_group: &'a [u16],
        names: Vec<&'a str>,
        record_group: &'a [u16],
        min_score: f32,
    ) -> Result<Self, InvalidPayload> {
        let n = template_group.len();
        if n == 0 || names.is_empty() || names.len() >= Self::NONE as usize {
            return Err(InvalidPayload("relation groups: no templates or groups"));
        }
        check_matrix(
            templates,
            n,
            embed_dim,
            "relation groups: templates must be [n_templates, embed_dim]",
            "relation groups: non-finite template",
        )?;
        check_unit_rows(
            templates,
            embed_dim,
            "relation groups: templates must be unit",
        )?;
        if template_group.iter().any(|&g| g as usize >= names.len()) {
            return Err(InvalidPayload(
                "relation groups: template group out of range",
            ));
        }
        if record_group
            .iter()
            .any(|&g| g != Self::NONE && g as usize >= names.len())
        {
            return Err(InvalidPayload("relation groups: record group out of range"));
        }
        if !is_cosine(min_score) {
            return Err(InvalidPayload(
                "relation groups: min_score must be a cosine in [-1, 1]",
            ));
        }
        Ok(RelationGroups {
            embed_dim,
            templates,
            template_group,
            names,
            record_group,
            min_score,
            margin: 0.0,
            vote: None,
        })
    }

    /// Accept a query whose best template in the record's group is within `margin` of its best
    /// template overall (0: the nearest template's group must be the record's).
    pub fn with_margin(mut self, margin: f32) -> Result<Self, InvalidPayload> {
        if !is_relation_margin(margin) {
            return Err(InvalidPayload("relation groups: margin must be in [0, 2]"));
        }
        self.margin = margin;
        Ok(self)
    }

    pub fn margin(&self) -> f32 {
        self.margin
    }

    /// Vote with the scope head instead of deciding alone (format 1.6): the head's logit moves
    /// up by `weight` when the query falls in the record's group, down when it falls in
    /// another, and stays where the query reaches no group (the lexicon does not know its
    /// relation, so it says nothing). `None`: the groups decide alone, and a query in no group
    /// is out of scope. A memory without a head ignores the vote.
    pub fn with_vote(mut self, weight: Option<f32>) -> Result<Self, InvalidPayload> {
        if !weight.is_none_or(is_group_weight) {
            return Err(InvalidPayload(
                "relation groups: vote weight must be in [0, 1000]",
            ));
        }
        self.vote = weight;
        Ok(self)
    }

    pub fn vote(&self) -> Option<f32> {
        self.vote
    }

    /// Per group, the best template cosine of a unit vector (`None`: wrong size).
    pub fn group_scores(&self, pooled: &[f32]) -> Option<Vec<f32>> {
        if pooled.len() != self.embed_dim {
            return None;
        }
        let mut best = alloc::vec![f32::MIN; self.names.len()];
        for (row, &g) in self
            .templates
            .chunks_exact(self.embed_dim)
            .zip(self.template_group)
        {
            let c = dot(row, pooled);
            let b = &mut best[g as usize];
            if c > *b {
                *b = c;
            }
        }
        Some(best)
    }

    /// From [`RelationGroups::group_scores`]: the query's group (its best group, when that
    /// reaches `min_score`; the lowest index wins a tie, as in [`RelationGroups::classify`])
    /// and whether it belongs with a record of group `record`.
    pub fn decide(&self, scores: &[f32], record: u16) -> (Option<u16>, bool) {
        let mut top = (f32::MIN, 0u16);
        for (g, &c) in scores.iter().enumerate() {
            if c > top.0 {
                top = (c, g as u16);
            }
        }
        let group = (top.0 >= self.min_score).then_some(top.1);
        let own = scores.get(record as usize).copied().unwrap_or(f32::MIN);
        let fits = group == Some(record) || (group.is_some() && own >= top.0 - self.margin);
        (group, fits)
    }

    /// The group of a unit vector (its nearest template's) and that cosine, or `None` when no
    /// template reaches `min_score` or the size is wrong.
    pub fn classify(&self, pooled: &[f32]) -> Option<(u16, f32)> {
        if pooled.len() != self.embed_dim {
            return None;
        }
        let mut best = (f32::MIN, 0u16);
        for (row, &g) in self
            .templates
            .chunks_exact(self.embed_dim)
            .zip(self.template_group)
        {
            let c = dot(row, pooled);
            if c > best.0 {
                best = (c, g);
            }
        }
        (best.0 >= self.min_score).then_some((best.1, best.0))
    }

    /// Record `i`'s group (`None`: the head or the thresholds decide for it).
    pub fn record_group(&self, i: usize) -> Option<u16> {
        self.record_group
            .get(i)
            .copied()
            .filter(|&g| g != Self::NONE)
    }

    pub fn name(&self, group: u16) -> &'a str {
        self.names.get(group as usize).copied().unwrap_or("")
    }

    pub fn min_score(&self) -> f32 {
        self.min_score
    }
}

/// `text` without the descriptions set off by commas that open with an article ("Rome, the
/// Italian capital, was built on" -> "Rome was built on"; "Who wrote Don Giovanni, the 1787
/// opera?" -> "Who wrote Don Giovanni?"), or `None` when it has none. Users describe the
/// subject in passing; the stored prompt does not, and the description pulls the query's
/// embedding away from its record (most rephrases the router missed on held-out sets that
/// carried one). A description is `, ` + `the`/`a`/`an` + at most 16 more words, with no sentence
/// end inside, closed by a `,` that something follows, or by the `?` that ends the text.
pub fn without_appositives(text: &str) -> Option<String> {
    const MAX_WORDS: usize = 16;
    let description = |inner: &str| {
        !inner.contains(['.', '?', '!', ';', ':', '(', ')', ','])
            && inner.split_whitespace().count() <= MAX_WORDS
    };
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    let mut changed = false;
    while let Some(i) = rest.find(", ") {
        let after = &rest[i + 2..];
        let opens = ["the ", "The ", "a ", "an "]
            .iter()
            .any(|a| after.starts_with(a));
        // Where the description ends and what is kept from there.
        let end = match after.find(',') {
            Some(j) if !after[j + 1..].trim().is_empty() => Some((j, j + 1)),
            Some(_) => None,
            None => after
                .trim_end()
                .strip_suffix('?')
                .map(|q| (q.len(), q.len())),
        }
        .filter(|&(j, _)| opens && description(&after[..j]));
        match end {
            Some((_, keep)) => {
                out.push_str(&rest[..i]);
                rest = &after[keep..];
                changed = true;
            }
            None => {
                out.push_str(&rest[..i + 2]);
                rest = after;
            }
        }
    }
    out.push_str(rest);
    changed.then_some(out)
}

/// A trained scope head: an ensemble of one-hidden-layer perceptrons over the features of a
/// (query, record) pair ([`ScopeHead::features`]), trained offline on labelled rephrases and
/// neighbours (`amend scope-model train-head`). Its mean logit decides "in scope" where the
/// three cosine thresholds cannot tell a rephrase from the same subject under another relation.
#[derive(Clone, Debug)]
pub struct ScopeHead<'a> {
    embed_dim: usize,
    members: usize,
    hidden: usize,
    /// `[members * hidden, n_features + 2]`: per hidden unit its input weights, its bias and
    /// its output weight (standardization folded in).
    weights: &'a [f32],
    /// Per member, the output bias.
    out_bias: &'a [f32],
    threshold: f32,
}

impl<'a> ScopeHead<'a> {
    /// Largest member and hidden counts a reader accepts.
    pub const MAX_MEMBERS: usize = crate::bundle::MAX_SCOPE_HEAD_MEMBERS;
    pub const MAX_HIDDEN: usize = crate::bundle::MAX_SCOPE_HEAD_HIDDEN;

    /// Features per pair for embeddings of `embed_dim`: pooled cosine, subject MaxSim, relation
    /// cosine, then `rest * relation`, `query_pooled * record_pooled`, `|rest - relation|`.
    pub fn n_features(embed_dim: usize) -> usize {
        3 + 3 * embed_dim
    }

    /// Validate shapes, finiteness and bounds.
    pub fn new(
        embed_dim: usize,
        members: usize,
        hidden: usize,
        weights: &'a [f32],
        out_bias: &'a [f32],
        threshold: f32,
    ) -> Result<ScopeHead<'a>, InvalidPayload> {
        if embed_dim == 0 || embed_dim as u64 > crate::bundle::MAX_DIM {
            return Err(InvalidPayload("scope head: embed_dim out of range"));
        }
        if members == 0 || members > Self::MAX_MEMBERS || hidden == 0 || hidden > Self::MAX_HIDDEN {
            return Err(InvalidPayload(
                "scope head: member or hidden count out of range",
            ));
        }
        check_matrix(
            weights,
            members * hidden,
            Self::n_features(embed_dim) + 2,
            "scope head: weights must be [members * hidden, features + 2]",
            "scope head: non-finite weight",
        )?;
        if out_bias.len() != members || !out_bias.iter().all(|x| x.is_finite()) {
            return Err(InvalidPayload(
                "scope head: one finite output bias per member",
            ));
        }
        if !threshold.is_finite() {
            return Err(InvalidPayload("scope head: threshold not finite"));
        }
        Ok(ScopeHead {
            embed_dim,
            members,
            hidden,
            weights,
            out_bias,
            threshold,
        })
    }

    /// The feature vector of a pair (see [`ScopeHead::n_features`]); `rest` is the query's
    /// non-subject rows' mean (unit, or zeros when none is left).
    #[allow(clippy::too_many_arguments)]
    pub fn features(
        pooled: f32,
        subject: f32,
        relation: f32,
        rest: &[f32],
        record_relation: &[f32],
        query_pooled: &[f32],
        record_pooled: &[f32],
        out: &mut Vec<f32>,
    ) {
        out.clear();
        out.extend_from_slice(&[pooled, subject, relation]);
        out.extend(rest.iter().zip(record_relation).map(|(a, b)| a * b));
        out.extend(query_pooled.iter().zip(record_pooled).map(|(a, b)| a * b));
        out.extend(rest.iter().zip(record_relation).map(|(a, b)| (a - b).abs()));
    }

    /// The ensemble's mean logit for a feature vector of [`ScopeHead::n_features`] values.
    pub fn logit(&self, x: &[f32]) -> f32 {
        let f = Self::n_features(self.embed_dim);
        debug_assert_eq!(x.len(), f);
        let mut total = 0.0;
        for (m, &b2) in self.out_bias.iter().enumerate() {
            let mut z = b2;
            let rows = &self.weights[m * self.hidden * (f + 2)..(m + 1) * self.hidden * (f + 2)];
            for row in rows.chunks_exact(f + 2) {
                let h = dot(&row[..f], x) + row[f];
                if h > 0.0 {
                    z += h * row[f + 1];
                }
            }
            total += z;
        }
        total / self.members as f32
    }

    pub fn threshold(&self) -> f32 {
        self.threshold
    }
    pub fn members(&self) -> usize {
        self.members
    }
    pub fn hidden(&self) -> usize {
        self.hidden
    }
}

impl<'a> ScopeRouting<'a> {
    /// Validate: `relation` is `[counts.len(), embed_dim]` of unit rows, `subject_rows` is
    /// `[sum(counts), embed_dim]` of unit rows, every count positive, thresholds in `[-1, 1]`.
    pub fn new(
        embed_dim: usize,
        relation: &'a [f32],
        subject_rows: &'a [f32],
        counts: &[u32],
        subject_threshold: f32,
        relation_threshold: f32,
    ) -> Result<ScopeRouting<'a>, InvalidPayload> {
        let n = counts.len();
        check_matrix(
            relation,
            n,
            embed_dim,
            "memory: relation rows must be [records, embed_dim]",
            "memory: non-finite relation row",
        )?;
        check_unit_rows(relation, embed_dim, "memory: relation rows must be unit")?;
        let mut offsets = Vec::with_capacity(n + 1);
        offsets.push(0usize);
        for &c in counts {
            if c == 0 {
                return Err(InvalidPayload("memory: a record has no subject rows"));
            }
            offsets.push(offsets[offsets.len() - 1] + c as usize);
        }
        check_matrix(
            subject_rows,
            offsets[n],
            embed_dim,
            "memory: subject rows must be [sum(counts), embed_dim]",
            "memory: non-finite subject row",
        )?;
        check_unit_rows(subject_rows, embed_dim, "memory: subject rows must be unit")?;
        for t in [subject_threshold, relation_threshold] {
            if !is_cosine(t) {
                return Err(InvalidPayload(
                    "memory: scope thresholds must be cosines in [-1, 1]",
                ));
            }
        }
        Ok(ScopeRouting {
            embed_dim,
            relation,
            subject_rows,
            offsets,
            subject_threshold,
            relation_threshold,
            head: None,
            groups: None,
            subjects: Vec::new(),
        })
    }

    /// Attach relation groups (one group entry per record) and the records' subjects.
    pub fn with_groups(
        mut self,
        groups: RelationGroups<'a>,
        subjects: Vec<&'a str>,
    ) -> Result<Self, InvalidPayload> {
        let n = self.offsets.len() - 1;
        if groups.embed_dim != self.embed_dim {
            return Err(InvalidPayload(
                "relation groups: templates do not match embed_dim",
            ));
        }
        if groups.record_group.len() != n || subjects.len() != n {
            return Err(InvalidPayload(
                "relation groups: one group and one subject per record",
            ));
        }
        self.groups = Some(groups);
        self.subjects = subjects;
        Ok(self)
    }

    pub fn groups(&self) -> Option<&RelationGroups<'a>> {
        self.groups.as_ref()
    }

    /// Record `i`'s subject (when relation groups are attached).
    pub fn subject(&self, i: usize) -> Option<&'a str> {
        self.subjects.get(i).copied()
    }

    /// Attach a trained scope head (its embed_dim must be this routing's).
    pub fn with_head(mut self, head: ScopeHead<'a>) -> Result<Self, InvalidPayload> {
        if head.embed_dim != self.embed_dim {
            return Err(InvalidPayload(
                "scope head: features do not match embed_dim",
            ));
        }
        self.head = Some(head);
        Ok(self)
    }

    pub fn head(&self) -> Option<&ScopeHead<'a>> {
        self.head.as_ref()
    }

    pub fn subject_threshold(&self) -> f32 {
        self.subject_threshold
    }
    pub fn relation_threshold(&self) -> f32 {
        self.relation_threshold
    }
    pub fn subject_rows(&self, i: usize) -> &'a [f32] {
        let d = self.embed_dim;
        &self.subject_rows[self.offsets[i] * d..self.offsets[i + 1] * d]
    }
    pub fn relation(&self, i: usize) -> &'a [f32] {
        &self.relation[i * self.embed_dim..(i + 1) * self.embed_dim]
    }
}

/// Subject and relation terms of one record against a query's token rows (unit rows,
/// `[m, d]`): MaxSim = mean over the subject rows of their best cosine to any query row; the
/// relation term = cosine of the mean of the query rows *not* picked by MaxSim against the
/// record's relation embedding (the prompt with its subject removed). With no query row left,
/// the relation term is 0.
pub fn subject_relation(
    subject: &[f32],
    relation: &[f32],
    query_rows: &[f32],
    d: usize,
) -> (f32, f32) {
    let mut rest = Vec::new();
    subject_relation_rest(subject, relation, query_rows, d, &mut rest)
}

/// [`subject_relation`], also leaving the query's rest-mean (unit; zeros when no row is left)
/// in `rest`, which the scope head reads.
pub fn subject_relation_rest(
    subject: &[f32],
    relation: &[f32],
    query_rows: &[f32],
    d: usize,
    rest: &mut Vec<f32>,
) -> (f32, f32) {
    rest.clear();
    rest.resize(d, 0.0);
    // d == 0 or a subject shorter than one row: nothing to compare (no division by zero).
    let m = query_rows.len().checked_div(d).unwrap_or(0);
    if m == 0 || subject.len() < d {
        return (0.0, 0.0);
    }
    let mut picked = alloc::vec![false; m];
    let mut sum = 0.0;
    let n_sub = subject.len() / d;
    for s in subject.chunks_exact(d) {
        let mut best = (f32::NEG_INFINITY, 0usize);
        for (j, q) in query_rows.chunks_exact(d).enumerate() {
            let c = dot(s, q);
            if c > best.0 {
                best = (c, j);
            }
        }
        sum += best.0;
        picked[best.1] = true;
    }
    let maxsim = sum / n_sub as f32;
    let mut any = false;
    for (j, q) in query_rows.chunks_exact(d).enumerate() {
        if !picked[j] {
            any = true;
            rest.iter_mut().zip(q).for_each(|(r, x)| *r += x);
        }
    }
    if !any || !super::l2_normalize(rest) {
        rest.iter_mut().for_each(|r| *r = 0.0);
        return (maxsim, 0.0);
    }
    (maxsim, dot(rest, relation))
}

/// The result of [`Memory::route`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RouteHit {
    /// The chosen record: the best in-scope one, else the best by pooled cosine.
    pub index: usize,
    /// Cosine of the pooled embeddings.
    pub pooled: f32,
    /// MaxSim of the record's subject rows against the query's rows.
    pub subject: f32,
    /// Cosine of the relation embeddings (query with the subject-matched rows removed).
    pub relation: f32,
    /// The ranking score among in-scope records: the scope head's logit when the memory has
    /// one, else `pooled * subject`.
    pub score: f32,
    pub in_scope: bool,
    /// How many of the examined candidates were in scope (several: the best one is used).
    pub n_in_scope: usize,
    /// Where relation groups decided or voted: the record's group and the query's (`None`: no
    /// template was close enough).
    pub groups: Option<(u16, Option<u16>)>,
    /// Where the groups vote with the head (format 1.6): what they added to its logit (+weight,
    /// -weight or 0; `score` includes it). `None` where they decided alone or did not apply.
    pub vote: Option<f32>,
}

/// Most uses of one placeholder in a template. The compilers' templates use each at most twice
/// ("Fact: {edit}\nFact: {edit}\n{prompt}"); a signed template repeating `{prompt}` 2,000
/// times within the 16 KiB string cap rendered a prompt thousands of times the user's, refused
/// only after tokenizing it.
pub const MAX_PLACEHOLDER_USES: usize = 4;

/// The reasons for a placeholder used over [`MAX_PLACEHOLDER_USES`] times, in the order
/// {edit}, {prompt}, {edit_prompt}, {target}.
const TOO_MANY_USES: [&str; 4] = [
    "memory: template uses {edit} more than 4 times (the cap per placeholder)",
    "memory: template uses {prompt} more than 4 times (the cap per placeholder)",
    "memory: template uses {edit_prompt} more than 4 times (the cap per placeholder)",
    "memory: template uses {target} more than 4 times (the cap per placeholder)",
];

/// A piece of a parsed template.
enum Piece<'t> {
    Lit(&'t str),
    Edit,
    Prompt,
    EditPrompt,
    Target,
    /// `{answer}`: the record's target, spoken by the model after the prompt (the runtime
    /// forces those tokens); only at the very end of a template.
    Answer,
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
                "answer" => Piece::Answer,
                _ => {
                    return Err(InvalidPayload(
                        "memory: unknown template placeholder (known: edit, prompt, edit_prompt, target, answer)",
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
    /// A plain in-context template (the compiler's default is per architecture, in
    /// runtime/hparams: `"{prompt}{answer}"` for gemma3).
    pub const DEFAULT_TEMPLATE: &'static str = "{edit}\n{prompt}";

    /// Validate: `embeddings` is `[records.len(), embed_dim]`, finite, rows of unit L2 norm;
    /// threshold finite in `[-1, 1]`; the template parses, uses `{prompt}`, and no placeholder
    /// more than [`MAX_PLACEHOLDER_USES`] times.
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
        if !is_cosine(threshold) {
            return Err(InvalidPayload(
                "memory: threshold must be a cosine in [-1, 1]",
            ));
        }
        let mut has_prompt = false;
        let (mut answers, mut after_answer) = (0, false);
        // Uses of {edit}, {prompt}, {edit_prompt}, {target}.
        let mut uses = [0usize; 4];
        walk_template(template, |p| {
            has_prompt |= matches!(p, Piece::Prompt);
            after_answer |= answers > 0 && !matches!(p, Piece::Lit(""));
            answers += matches!(p, Piece::Answer) as usize;
            match p {
                Piece::Edit => uses[0] += 1,
                Piece::Prompt => uses[1] += 1,
                Piece::EditPrompt => uses[2] += 1,
                Piece::Target => uses[3] += 1,
                Piece::Lit(_) | Piece::Answer => {}
            }
        })?;
        if !has_prompt {
            return Err(InvalidPayload("memory: template must contain {prompt}"));
        }
        if let Some(i) = uses.iter().position(|&n| n > MAX_PLACEHOLDER_USES) {
            return Err(InvalidPayload(TOO_MANY_USES[i]));
        }
        // The answer is what the model says after everything it reads: nothing may follow it.
        if answers > 1 || after_answer {
            return Err(InvalidPayload(
                "memory: {answer} may appear once, at the end of the template",
            ));
        }
        if let Embedder::External { model_id: "", .. } = embedder {
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
            routing: None,
        })
    }

    /// Attach subject-aware routing (one entry per record).
    pub fn with_scope_routing(mut self, r: ScopeRouting<'a>) -> Result<Self, InvalidPayload> {
        if r.offsets.len() != self.records.len() + 1 || r.embed_dim != self.embed_dim {
            return Err(InvalidPayload(
                "memory: routing data must cover every record",
            ));
        }
        self.routing = Some(r);
        Ok(self)
    }

    pub fn routing(&self) -> Option<&ScopeRouting<'a>> {
        self.routing.as_ref()
    }

    /// How many records by pooled cosine [`Memory::route`] examines with the token terms.
    pub const ROUTE_CANDIDATES: usize = 8;

    /// Subject-aware routing: the records with the best pooled cosine (up to
    /// [`Memory::ROUTE_CANDIDATES`]) are checked with the subject and relation terms
    /// ([`subject_relation`]); a record is in scope when pooled >= threshold, subject >= the
    /// subject threshold and relation >= the relation threshold. Of several in scope, the one
    /// with the highest `pooled * subject` wins. `query_pooled` and `query_rows` are unit vectors
    /// from one encode of the request. `None`: nothing active, no routing data, bad sizes.
    pub fn route(
        &self,
        query_pooled: &[f32],
        query_rows: &[f32],
        active: Option<&[bool]>,
    ) -> Option<RouteHit> {
        self.route_with(query_pooled, query_rows, active, &mut |_| None)
    }

    /// [`Memory::route`] with relation groups: `stripped(i)` gives the pooled unit embedding
    /// of the query with record `i`'s subject replaced ([`strip_subject`](super::strip_subject),
    /// one more encode), or `None` (the subject is not in the query, even as users type it:
    /// the head or the thresholds decide). It is
    /// asked only for candidates whose record has a group and whose pooled and subject terms
    /// pass. A record decided by its group is in scope when the query falls in that group;
    /// in-scope records decided by groups rank before those the head decided. Where the groups
    /// vote ([`RelationGroups::with_vote`]) and there is a head, the head decides every record,
    /// its logit moved by the vote, and that moved logit ranks them.
    pub fn route_with(
        &self,
        query_pooled: &[f32],
        query_rows: &[f32],
        active: Option<&[bool]>,
        stripped: &mut dyn FnMut(usize) -> Option<Vec<f32>>,
    ) -> Option<RouteHit> {
        let r = self.routing.as_ref()?;
        let d = self.embed_dim;
        if query_pooled.len() != d || !query_rows.len().is_multiple_of(d) {
            return None;
        }
        // Top candidates by pooled cosine (a small insertion-sorted list).
        let mut top: Vec<(f32, usize)> = Vec::with_capacity(Self::ROUTE_CANDIDATES + 1);
        for i in 0..self.records.len() {
            if active.is_some_and(|a| !a.get(i).copied().unwrap_or(false)) {
                continue;
            }
            let c = dot(self.embedding(i), query_pooled);
            if top.len() == Self::ROUTE_CANDIDATES && c <= top[top.len() - 1].0 {
                continue;
            }
            let at = top.iter().position(|&(t, _)| c > t).unwrap_or(top.len());
            top.insert(at, (c, i));
            top.truncate(Self::ROUTE_CANDIDATES);
        }
        let mut best: Option<RouteHit> = None;
        let mut n_in = 0;
        let (mut rest, mut x) = (Vec::new(), Vec::new());
        // Per subject: the query's group scores with that subject stripped (`None`: not in the
        // query).
        let mut query_groups: Vec<(&str, Option<Vec<f32>>)> = Vec::new();
        // The groups' vote weight, where they vote and there is a head to vote with.
        let vote = r
            .groups
            .as_ref()
            .and_then(|g| g.vote)
            .filter(|_| r.head.is_some());
        // Without a vote, in-scope records the groups decided rank before the head's.
        let grouped = |h: &RouteHit| vote.is_none() && h.groups.is_some() && h.in_scope;
        for &(pooled, i) in &top {
            let (subject, relation) =
                subject_relation_rest(r.subject_rows(i), r.relation(i), query_rows, d, &mut rest);
            // Relation groups decide where the record has one and the query names the subject.
            let by_group = r
                .groups
                .as_ref()
                .and_then(|g| Some((g, g.record_group(i)?)))
                .filter(|_| pooled >= self.threshold && subject >= r.subject_threshold)
                .and_then(|(g, rg)| {
                    // Candidates about the same subject share one stripped encode.
                    let s = r.subject(i).unwrap_or("");
                    let at = match query_groups.iter().position(|(m, _)| *m == s) {
                        Some(at) => at,
                        None => {
                            let q = stripped(i).and_then(|v| g.group_scores(&v));
                            query_groups.push((s, q));
                            query_groups.len() - 1
                        }
                    };
                    let (qg, fits) = g.decide(query_groups[at].1.as_deref()?, rg);
                    Some(((rg, qg), fits))
                });
            // With a vote, groups only decide through the head's logit below.
            let decides = by_group.filter(|_| vote.is_none());
            let mut voted = None;
            let (score, in_scope) = match (&r.head, decides) {
                (_, Some((_, fits))) => (pooled * subject, fits),
                // The head decides alone; its logit ranks the in-scope records.
                (Some(h), None) => {
                    ScopeHead::features(
                        pooled,
                        subject,
                        relation,
                        &rest,
                        r.relation(i),
                        query_pooled,
                        self.embedding(i),
                        &mut x,
                    );
                    // The vote: +1 in the record's group, -1 in another, 0 where the query
                    // reaches no group or the record has none.
                    let g = match by_group {
                        Some(((_, Some(_)), true)) => 1.0,
                        Some(((_, Some(_)), false)) => -1.0,
                        _ => 0.0,
                    };
                    voted = by_group.and(vote).map(|w| w * g);
                    let z = h.logit(&x) + voted.unwrap_or(0.0);
                    (z, z >= h.threshold)
                }
                (None, None) => (
                    pooled * subject,
                    pooled >= self.threshold
                        && subject >= r.subject_threshold
                        && relation >= r.relation_threshold,
                ),
            };
            n_in += in_scope as usize;
            let hit = RouteHit {
                index: i,
                pooled,
                subject,
                relation,
                score,
                in_scope,
                n_in_scope: 0,
                groups: by_group.map(|(g, _)| g),
                vote: voted,
            };
            let better = match &best {
                None => true,
                Some(b) => (in_scope, grouped(&hit), hit.score) > (b.in_scope, grouped(b), b.score),
            };
            if better {
                best = Some(hit);
            }
        }
        best.map(|b| RouteHit {
            n_in_scope: n_in,
            ..b
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
    /// nothing is active, the query is not `embed_dim` long, or it has no direction (all zero,
    /// or a NaN or infinity); a huge but finite query (|q|² over f32's range) still finds one.
    pub fn nearest(&self, query_embedding: &[f32], active: Option<&[bool]>) -> Option<MemoryHit> {
        if query_embedding.len() != self.embed_dim {
            return None;
        }
        let (q, norm) = super::direction(query_embedding)?;
        let (index, d) = max_dot_indexed(
            self.embeddings,
            self.embed_dim,
            self.index.as_ref(),
            &q,
            active,
        )?;
        let score = (d / norm).clamp(-1.0, 1.0);
        Some(MemoryHit {
            index,
            score,
            in_scope: score >= self.threshold,
        })
    }

    /// Whether the template ends with `{answer}`: a routed request then continues with the
    /// record's target (see [`Memory::answer`]).
    pub fn answers(&self) -> bool {
        let mut found = false;
        // Validated in `new`: an `{answer}` is the last piece.
        let _ = walk_template(self.template, |p| found |= matches!(p, Piece::Answer));
        found
    }

    /// The text the model must say first when record `index` routes a request (`None`: the
    /// template has no `{answer}`, or the index is out of range).
    pub fn answer(&self, index: usize) -> Option<&'a str> {
        self.answers()
            .then(|| self.records.get(index).map(|r| r.target))
            .flatten()
    }

    /// The counterfactual prompt: the template with record `index` and `user_prompt` filled in
    /// (`None` for an index out of range); an `{answer}` renders as nothing here.
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
                Piece::Answer => "",
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
    fn placeholder_use_messages_name_the_cap() {
        let cap = alloc::format!("more than {MAX_PLACEHOLDER_USES} times");
        for (m, name) in
            TOO_MANY_USES
                .iter()
                .zip(["{edit}", "{prompt}", "{edit_prompt}", "{target}"])
        {
            assert!(m.contains(&cap) && m.contains(name), "{m}");
        }
    }

    #[test]
    fn answer_placeholder_only_at_the_end() {
        let emb = [1.0, 0.0];
        let mk = |t: &'static str| Memory::new(2, &emb, 0.8, vec![rec("a")], t, EMB);
        let m = mk("{prompt}{answer}").unwrap();
        assert!(m.answers());
        assert_eq!(m.answer(0), Some("Berlin"));
        assert_eq!(m.answer(1), None);
        assert_eq!(m.render(0, "Q?").as_deref(), Some("Q?"));
        let m = mk("{edit}\n{prompt}{answer}").unwrap();
        assert_eq!(
            m.render(0, "Q?").as_deref(),
            Some("The capital of France is Berlin.\nQ?")
        );
        let m = mk(Memory::DEFAULT_TEMPLATE).unwrap();
        assert!(!m.answers() && m.answer(0).is_none());
        // A literal "{answer}" is not the placeholder.
        assert!(!mk("{prompt} {{answer}}").unwrap().answers());
        for bad in [
            "{answer}{prompt}",
            "{prompt}{answer} ",
            "{prompt}{answer}{answer}",
        ] {
            assert!(mk(bad).is_err(), "{bad}");
        }
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
    fn subject_and_relation_terms() {
        // d = 3. Query rows: "capital" (e1), "france" (e2), "is" (e3).
        let q = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0];
        let subject = [0.0, 1.0, 0.0];
        let s = 0.5f32.sqrt();
        let relation = [s, 0.0, s];
        let (maxsim, rel) = subject_relation(&subject, &relation, &q, 3);
        assert!((maxsim - 1.0).abs() < 1e-6);
        // The rest ("capital", "is") pools to (1, 0, 1)/sqrt2: the relation matches.
        assert!((rel - 1.0).abs() < 1e-6, "{rel}");
        // Another subject ("italy" = e1 here): MaxSim picks "capital" instead.
        let (maxsim, _) = subject_relation(&[0.0, 0.0, 1.0], &relation, &q[..6], 3);
        assert!(maxsim.abs() < 1e-6);
        assert_eq!(subject_relation(&subject, &relation, &[], 3), (0.0, 0.0));
    }

    #[test]
    fn without_appositives_drops_descriptions_set_off_by_commas() {
        let w = |t: &str| without_appositives(t);
        assert_eq!(
            w("Rome, the Italian capital, was built on the banks of which river?").as_deref(),
            Some("Rome was built on the banks of which river?")
        );
        assert_eq!(
            w("The Analytical Engine, a 19th-century design for a mechanical computer, was conceived by whom?").as_deref(),
            Some("The Analytical Engine was conceived by whom?")
        );
        // Two descriptions.
        assert_eq!(
            w("Nirvana, the grunge band, and Pearl Jam, an American band, came from").as_deref(),
            Some("Nirvana and Pearl Jam came from")
        );
        // Not a description: no article, a clause, nothing after it, too long, no second comma.
        for t in [
            "The body's oxygen carriers, red blood cells, are made in the",
            "In 1969, John Lennon married the artist",
            "Paris, the city of a thousand lights and many many more words than any description should ever hold, is in",
            "Who painted the ceiling, the famous one",
            "Who painted the ceiling, the famous one.",
            "Plain text without commas",
            "",
        ] {
            assert_eq!(w(t), None, "{t}");
        }
        // A description that ends the question.
        assert_eq!(
            w("Which language is official in Suriname, the small country on South America's northern coast?").as_deref(),
            Some("Which language is official in Suriname?")
        );
        assert_eq!(
            w("Who is the father of Athena, the Greek goddess of wisdom?  ").as_deref(),
            Some("Who is the father of Athena?  ")
        );
        // ... but not a statement's end (the answer follows).
        assert_eq!(w("The capital of Peru, the Andean country"), None);
        // Non-ASCII text keeps its characters.
        assert_eq!(
            w("Salvador Dalí, the painter of melting clocks, belonged to the movement called")
                .as_deref(),
            Some("Salvador Dalí belonged to the movement called")
        );
    }

    #[test]
    fn route_picks_the_in_scope_record() {
        let emb = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0];
        let rel = [0.0, 0.0, 1.0, 0.0, 0.0, 1.0];
        let subj = [0.0, 1.0, 0.0, 1.0, 0.0, 0.0];
        let ext = Embedder::External {
            model_id: "m",
            fingerprint: Some(&[1; 32]),
        };
        let m = Memory::new(3, &emb, 0.5, vec![rec("a"), rec("b")], "{prompt}", ext)
            .unwrap()
            .with_scope_routing(ScopeRouting::new(3, &rel, &subj, &[1, 1], 0.9, 0.5).unwrap())
            .unwrap();
        // Query rows: one matching record 0's subject (e2), one matching the relation (e3).
        let rows = [0.0, 1.0, 0.0, 0.0, 0.0, 1.0];
        let s = 0.5f32.sqrt();
        let h = m.route(&[s, s, 0.0], &rows, None).unwrap();
        assert_eq!(h.index, 0);
        assert!(h.in_scope && h.n_in_scope == 1, "{h:?}");
        // Record 1 masked off: record 1 is not examined, nothing else is in scope.
        let h = m.route(&[s, s, 0.0], &rows, Some(&[false, true])).unwrap();
        assert_eq!(h.index, 1);
        assert!(!h.in_scope);
        assert!(ScopeRouting::new(3, &rel, &subj, &[1, 0], 0.9, 0.5).is_err());
        assert!(ScopeRouting::new(3, &rel, &subj, &[1, 1], 1.5, 0.5).is_err());
    }

    /// Two records about one subject, in two relation groups: the query's group picks one, and
    /// the stripped query is encoded once for both.
    #[test]
    fn relation_groups_pick_the_record_and_share_one_encode_per_subject() {
        let emb = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0];
        let rel = [0.0, 0.0, 1.0, 0.0, 0.0, 1.0];
        let subj = [0.0, 1.0, 0.0, 0.0, 1.0, 0.0];
        let templates = [0.0, 0.0, 1.0, 1.0, 0.0, 0.0];
        let ext = Embedder::External {
            model_id: "m",
            fingerprint: Some(&[1; 32]),
        };
        let groups =
            RelationGroups::new(3, &templates, &[0, 1], vec!["g0", "g1"], &[1, 0], 0.6).unwrap();
        let m = Memory::new(3, &emb, 0.5, vec![rec("a"), rec("b")], "{prompt}", ext)
            .unwrap()
            .with_scope_routing(
                ScopeRouting::new(3, &rel, &subj, &[1, 1], 0.5, 0.5)
                    .unwrap()
                    .with_groups(groups, vec!["X", "X"])
                    .unwrap(),
            )
            .unwrap();
        let s = 0.5f32.sqrt();
        let mut calls = 0;
        let h = m
            .route_with(&[s, s, 0.0], &[0.0, 1.0, 0.0], None, &mut |_| {
                calls += 1;
                Some(alloc::vec![0.0, 0.0, 1.0])
            })
            .unwrap();
        assert_eq!(calls, 1);
        // Group 0 is record 1's.
        assert!(h.in_scope && h.index == 1 && h.n_in_scope == 1, "{h:?}");
        assert_eq!(h.groups, Some((0, Some(0))));
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
    fn scope_head_refuses_bad_shapes_and_another_embed_dim() {
        let w = vec![0.0f32; ScopeHead::n_features(2) + 2];
        let b = [0.0f32];
        assert!(ScopeHead::new(2, 1, 1, &w, &b, 0.0).is_ok());
        for (e, m, h) in [
            (0, 1, 1),
            (1 << 17, 1, 1),
            (2, 0, 1),
            (2, 17, 1),
            (2, 1, 1025),
        ] {
            assert!(ScopeHead::new(e, m, h, &w, &b, 0.0).is_err(), "{e} {m} {h}");
        }
        assert!(ScopeHead::new(2, 1, 1, &w[1..], &b, 0.0).is_err());
        assert!(ScopeHead::new(2, 1, 1, &w, &[f32::NAN], 0.0).is_err());
        assert!(ScopeHead::new(2, 1, 1, &w, &b, f32::NAN).is_err());
        // A head of another embedding width does not attach to this routing.
        let unit = [1.0f32, 0.0, 0.0];
        let routing = ScopeRouting::new(3, &unit, &unit, &[1], 0.5, 0.5).unwrap();
        let head = ScopeHead::new(2, 1, 1, &w, &b, 0.0).unwrap();
        assert!(routing.with_head(head).is_err());
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
            Embedder::External {
                model_id: "",
                fingerprint: None
            }
        )
        .is_err());
        let ext = Embedder::External {
            model_id: "minilm-q8",
            fingerprint: Some(&[7; 32]),
        };
        assert_eq!(
            Memory::new(2, &[1.0, 0.0], 0.5, vec![rec("a")], t, ext)
                .unwrap()
                .embedder(),
            ext
        );
    }
}
