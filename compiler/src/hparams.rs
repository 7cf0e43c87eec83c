//! Per-model hyperparameters: built-in TOML defaults per architecture (the architecture table's
//! `compiler_defaults`, files in `runtime/hparams/`),
//! optionally overlaid by a user TOML file and `--set section.key=value` overrides. Unknown
//! sections or keys are errors that name them.

use crate::error::{CompileError, Result};
use crate::forward::Arch;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The presets compiled in (the files of runtime/hparams/presets/, by name): what
/// `amend compile --preset NAME` lays over the defaults.
pub const PRESETS: &[(&str, &str)] = &[(
    "memit-statements",
    include_str!("../../runtime/hparams/presets/memit-statements.toml"),
)];

fn preset_text(name: &str) -> Result<&'static str> {
    PRESETS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, t)| *t)
        .ok_or_else(|| {
            let names: Vec<&str> = PRESETS.iter().map(|(n, _)| *n).collect();
            CompileError::Hparams(format!(
                "unknown preset {name:?} (built in: {}, or auto, or none)",
                names.join(", ")
            ))
        })
}

/// The preset `amend compile --preset auto` (the default) takes for a batch: MEMIT edits whose
/// prompts are all statements ("Steve Jobs co-founded", no question mark) get
/// "memit-statements", whose locality held on three statement sets nobody tuned on where the
/// defaults' did not (docs/eval.md, issue 17); a batch with any question keeps the defaults,
/// which the preset costs edit success and rephrase on.
pub fn auto_preset<'a>(
    method: crate::Method,
    prompts: impl Iterator<Item = &'a str>,
) -> Option<&'static str> {
    let (questions, statements) = prompt_forms(prompts);
    (method == crate::Method::Memit && questions == 0 && statements > 0)
        .then_some("memit-statements")
}

/// Whether a prompt is in question form (it ends in a question mark).
pub fn is_question(prompt: &str) -> bool {
    prompt.trim_end().ends_with('?')
}

/// How many prompts are questions (ending in a question mark) and how many statements: the
/// two forms MEMIT wants different settings for.
pub fn prompt_forms<'a>(prompts: impl Iterator<Item = &'a str>) -> (usize, usize) {
    prompts.fold((0, 0), |(q, s), p| {
        if is_question(p) {
            (q + 1, s)
        } else {
            (q, s + 1)
        }
    })
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hparams {
    pub grace: GraceParams,
    pub tpatcher: TPatcherParams,
    pub rome: RomeParams,
    pub memit: MemitParams,
    pub serac: SeracParams,
    pub lora: LoraParams,
}

/// FT-L style LoRA baseline (see `methods::lora`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraParams {
    pub layer: usize,
    pub rank: usize,
    /// The delta is scaled by `alpha / rank`.
    pub alpha: f32,
    pub lr: f64,
    pub steps: usize,
    pub stop_loss: f32,
}

/// SERAC memory (see `methods::serac`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeracParams {
    /// Embedder: the base model's state at `layer`/`site` ("ffn_input", ...), pooled
    /// ("last" or "mean").
    pub layer: usize,
    pub site: String,
    pub pooling: String,
    /// The counterfactual prompt: `{edit}` = the edit as a statement, `{prompt}` = the query.
    pub template: String,
    /// Threshold when there are no rephrases or locality prompts to calibrate on.
    pub threshold: f32,
    /// "scope": route with the scope model (all-MiniLM-L6-v2, subject-aware, thresholds
    /// calibrated on synthesized hard negatives); "base": the base model's hidden state.
    pub embedder: String,
    /// Scope model: the floor on the pooled cosine of the prompts.
    pub pooled_threshold: f32,
    /// Scope model: the calibrated subject/relation thresholds sit this far above the hardest
    /// synthesized negative.
    pub margin: f32,
    /// Scope model: caps on the calibrated thresholds (above them, the negative is accepted
    /// rather than losing every rephrase).
    pub max_subject_threshold: f32,
    pub max_relation_threshold: f32,
    /// Scope model: how many records (evenly spaced) the thresholds are calibrated on. Each
    /// costs ~40 scope-model encodes of synthesized negatives; the rest cost one encode each.
    #[serde(default = "default_calibration_records")]
    pub calibration_records: usize,
    /// Scope model: the trained scope head that decides "in scope" ("builtin": the head in
    /// data/scope-head.safetensors; "none": the calibrated cosine thresholds alone; else a path
    /// written by `amend scope-model train-head`).
    #[serde(default = "default_scope_head")]
    pub scope_head: String,
    /// Scope model: relation groups ("builtin": the lexicon in data/relation-groups.txt;
    /// "wikidata": data/relation-groups-wikidata.txt; "none": no groups; else a lexicon file): where a record's relation is in a group, the
    /// query's group decides (docs/methods.md).
    #[serde(default = "default_relation_groups")]
    pub relation_groups: String,
    /// Scope model: a text belongs to its nearest template's group from this cosine on.
    #[serde(default = "default_relation_min_score")]
    pub relation_min_score: f32,
    /// Scope model: a query also stays with a record whose group's best template scores within
    /// this of the query's best template (0: the nearest template's group must be the record's;
    /// above 0 the bundle needs format 1.5).
    #[serde(default = "default_relation_margin")]
    pub relation_margin: f32,
    /// Scope model: how relation groups and the scope head combine. "vote" (format 1.6): the
    /// groups move the head's logit by `relation_vote_weight`, up for a query in the record's
    /// group, down for one in another, not at all for a query in no group; "decide" (formats
    /// 1.4/1.5): the groups decide alone and a query in no group is out of scope.
    #[serde(default = "default_relation_rule")]
    pub relation_rule: String,
    #[serde(default = "default_relation_vote_weight")]
    pub relation_vote_weight: f32,
}

fn default_relation_rule() -> String {
    "vote".into()
}

fn default_relation_vote_weight() -> f32 {
    8.0
}

fn default_scope_head() -> String {
    "builtin".into()
}

fn default_relation_groups() -> String {
    "builtin".into()
}

fn default_relation_min_score() -> f32 {
    0.6
}

fn default_relation_margin() -> f32 {
    0.05
}

fn default_calibration_records() -> usize {
    256
}

/// ROME (see `methods::rome`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RomeParams {
    pub layer: usize,
    pub lr: f64,
    pub steps: usize,
    pub stop_loss: f32,
    /// Weight of the KL term on the essence prompt "{subject} is a".
    pub kl_factor: f32,
    /// Same-subject prompts under other relations (`{}` = the subject) whose next-token
    /// distribution v* keeps, each with this weight; 0 = none (see [`VStarParams`]).
    #[serde(default)]
    pub relation_kl_factor: f32,
    #[serde(default)]
    pub relation_prompts: Vec<String>,
    /// Weight of `‖delta‖² / ‖v0‖²`.
    pub weight_decay: f32,
    /// `‖delta‖ <= clamp_norm_factor · ‖v0‖`.
    pub clamp_norm_factor: f32,
    /// Context prefixes the key is averaged over (1 = the prompt only; at most 6).
    pub context_prefixes: usize,
    /// Use the key second moment of the covariance corpus (`C⁻¹k`) instead of `C = I`.
    pub covariance: bool,
    /// The covariance corpus: "wordnet", "neutral" or a text file (`methods::corpus`).
    pub corpus: String,
    /// Tokens of the corpus the second moment is taken over.
    pub corpus_tokens: usize,
    /// Ridge added to `C`, relative to its mean diagonal.
    pub cov_lambda: f64,
    /// Weight of earlier edits' keys added to `C` (sequential edits keep each other).
    pub preserve_weight: f64,
    /// AlphaEdit's null-space projection of the update direction (as `memit.null_space`):
    /// `u ∝ (P A P + λI)⁻¹ P k*`, `A` the earlier edits' and neighbours' keys; needs `covariance`.
    pub null_space: bool,
    pub null_space_threshold: f64,
    pub null_space_ridge: f64,
    /// Template neighbours per edit (`rome::neighbour_keys`): the edit's prompt with this many
    /// corpus entities in the subject's place; their keys join `C` with `neighbour_weight`.
    pub neighbours: usize,
    pub neighbour_weight: f64,
    /// Pin every position, not only the subject's (`rome::pinned_keys`): the keys at the edit
    /// prompt's other positions and at every position of its template neighbours from the
    /// substitute on join `C` with `neighbour_weight`, so the update acts where v* was trained,
    /// at the subject's last token, and not through the relation's tokens of prompts sharing
    /// the template.
    #[serde(default)]
    pub pin_positions: bool,
    /// The smallest update that still holds (0 = off): the edit's value delta is scaled down
    /// to the smallest fraction (bisection, 1/32 steps) at which every target token keeps an NLL
    /// at most this (teacher-forced, the compiler's forward, the rank-one update applied).
    #[serde(default)]
    pub shrink_nll: f32,
    /// A record whose subject is missing or does not occur in its prompt is keyed on the last
    /// prompt token instead of being refused before any training (`check_subjects`).
    #[serde(default)]
    pub allow_missing_subject: bool,
}

impl RomeParams {
    pub fn v_star(&self) -> VStarParams {
        VStarParams {
            section: "rome",
            lr: self.lr,
            steps: self.steps,
            stop_loss: self.stop_loss,
            kl_factor: self.kl_factor,
            relation_kl_factor: self.relation_kl_factor,
            relation_prompts: self.relation_prompts.clone(),
            weight_decay: self.weight_decay,
            clamp_norm_factor: self.clamp_norm_factor,
        }
    }
}

/// The value optimisation ROME and MEMIT share (`methods::rome::train_delta`): Adam on a delta
/// added to the down projection's output at the subject's last token.
#[derive(Clone, Debug, PartialEq)]
pub struct VStarParams {
    /// The hyperparameter section these come from (`rome` or `memit`), for error messages.
    pub section: &'static str,
    pub lr: f64,
    pub steps: usize,
    pub stop_loss: f32,
    pub kl_factor: f32,
    /// Same-subject prompts under other relations (`{}` = the subject), each a KL term with
    /// this weight: an update on the subject's key moves every fact about the subject, and
    /// these ask v* to leave the subject's other relations where they were. A prompt sharing a
    /// content word with the edit's own prompt is skipped (it may be the edited relation).
    pub relation_kl_factor: f32,
    pub relation_prompts: Vec<String>,
    pub weight_decay: f32,
    pub clamp_norm_factor: f32,
}

/// MEMIT (see `methods::memit`): ROME's value optimisation at the top layer of a window, the
/// change spread over the window's down projections with one least-squares update per layer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemitParams {
    /// The edited down projections, ascending; the last is where the target is optimised.
    /// `--layer L` shifts the window so that its top is `L`.
    pub layers: Vec<usize>,
    /// v* optimisation at the top layer (as `rome`).
    pub lr: f64,
    pub steps: usize,
    pub stop_loss: f32,
    pub kl_factor: f32,
    /// As `rome.relation_kl_factor` / `rome.relation_prompts`.
    #[serde(default)]
    pub relation_kl_factor: f32,
    #[serde(default)]
    pub relation_prompts: Vec<String>,
    pub weight_decay: f32,
    pub clamp_norm_factor: f32,
    /// Context prefixes the keys are averaged over (1..=6).
    pub context_prefixes: usize,
    /// Weight of the corpus key covariance against the edits' own keys in
    /// `ΔW = R Kᵀ (w·C + K Kᵀ)⁻¹`: larger protects other inputs more and meets the targets less.
    pub mom2_weight: f64,
    /// Ridge added to `C`, relative to its mean diagonal.
    pub cov_lambda: f64,
    /// The covariance corpus: "wordnet", "neutral" or a text file (`methods::corpus`).
    pub corpus: String,
    /// Tokens of the corpus the second moment is taken over.
    pub corpus_tokens: usize,
    /// AlphaEdit (Fang et al., ICLR 2025): project each layer's update onto the null space of
    /// the corpus keys' second moment, `ΔW = R Kᵀ P (P (Kₚ Kₚᵀ + K Kᵀ) P + λI)⁻¹`, instead of
    /// MEMIT's `R Kᵀ (w·C + K Kᵀ)⁻¹`.
    pub null_space: bool,
    /// Null space: eigenvectors of `C` with eigenvalues below this times the mean eigenvalue.
    pub null_space_threshold: f64,
    /// `λ` of the null-space update, relative to the mean `kᵀPk` of the batch's keys: smaller
    /// meets the targets more exactly.
    pub null_space_ridge: f64,
    /// Template neighbours per edit (as `rome.neighbours`): kept keys with `neighbour_weight`.
    pub neighbours: usize,
    pub neighbour_weight: f64,
    /// Candidates the neighbours are chosen from (`rome::neighbour_subjects`): with more than
    /// `neighbours`, the ones whose key is closest to the subject's; 0 takes the next names.
    #[serde(default)]
    pub neighbour_pool: usize,
    /// Edits solved together; larger sets are compiled chunk by chunk (each chunk on top of the
    /// previous ones, whose keys stay in the covariance).
    pub batch: usize,
    /// The margin loop: an edit that misses its target after the batch's solve (teacher-forced,
    /// the compiler's forward), or one of whose target tokens has an NLL above `margin_nll`,
    /// gets its key weighted `margin_factor` times more and the batch is solved again, at most
    /// `margin_rounds` times. 0 rounds: off.
    #[serde(default = "default_margin_nll")]
    pub margin_nll: f32,
    /// In the margin loop, a weighted edit's key is its own prompt's (not the average over the
    /// context prefixes).
    #[serde(default)]
    pub margin_own_key: bool,
    /// As `rome.shrink_nll`, for v* at the top layer (the value delta at the subject's last
    /// token, before it is spread over the window); 0 = off.
    #[serde(default)]
    pub shrink_nll: f32,
    #[serde(default)]
    pub margin_rounds: usize,
    #[serde(default = "default_margin_factor")]
    pub margin_factor: f64,
    /// As `rome.allow_missing_subject`.
    #[serde(default)]
    pub allow_missing_subject: bool,
}

fn default_margin_nll() -> f32 {
    std::f32::consts::LN_2
}

fn default_margin_factor() -> f64 {
    4.0
}

impl MemitParams {
    pub fn v_star(&self) -> VStarParams {
        VStarParams {
            section: "memit",
            lr: self.lr,
            steps: self.steps,
            stop_loss: self.stop_loss,
            kl_factor: self.kl_factor,
            relation_kl_factor: self.relation_kl_factor,
            relation_prompts: self.relation_prompts.clone(),
            weight_decay: self.weight_decay,
            clamp_norm_factor: self.clamp_norm_factor,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GraceParams {
    pub layer: usize,
    pub lr: f64,
    pub steps: usize,
    pub stop_loss: f32,
    pub radius: f32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TPatcherParams {
    pub layer: usize,
    pub lr: f64,
    pub steps: usize,
    pub stop_loss: f32,
    pub threshold: f32,
    pub edit_margin: f32,
    pub train_keys: bool,
    pub margin: f32,
    pub memory_weight: f32,
    pub init_value_scale: f32,
    /// Retrainings after a failed runtime check (teacher forced or greedy through the runtime).
    pub retries: usize,
    /// Each retry trains to `stop_loss * retry_loss_factor^attempt`.
    pub retry_loss_factor: f32,
}

impl Hparams {
    /// The built-in defaults of an architecture.
    pub fn defaults_text(arch: Arch) -> &'static str {
        arch.spec().compiler_defaults
    }

    /// Defaults for `arch`, overlaid by the TOML file `file` and then by `sets`
    /// (`section.key=value`, the value parsed as TOML, else taken as a string).
    pub fn resolve(arch: Arch, file: Option<&Path>, sets: &[String]) -> Result<Hparams> {
        Self::resolve_with(arch, None, file, sets)
    }

    /// [`Hparams::resolve`] with a built-in preset ([`PRESETS`], by name) laid over the
    /// defaults first: the file and `sets` still override it.
    pub fn resolve_with(
        arch: Arch,
        preset: Option<&str>,
        file: Option<&Path>,
        sets: &[String],
    ) -> Result<Hparams> {
        Self::resolve_given(arch, preset, file, sets).map(|(hp, _)| hp)
    }

    /// [`Hparams::resolve_with`], also telling which keys the user gave (the file and `sets`)
    /// from those left to the built-in defaults and preset.
    pub fn resolve_given(
        arch: Arch,
        preset: Option<&str>,
        file: Option<&Path>,
        sets: &[String],
    ) -> Result<(Hparams, Given)> {
        let mut given = Given::new();
        let table: toml::Table = Self::defaults_text(arch)
            .parse()
            .map_err(|e| CompileError::Hparams(format!("built-in defaults: {e}")))?;
        // Through the typed form and back: a key the defaults file leaves to its serde
        // default (`serac.calibration_records`) is then a key `--set` and files may give.
        let typed: Hparams =
            toml::Value::Table(table)
                .try_into()
                .map_err(|e: toml::de::Error| {
                    CompileError::Hparams(format!("built-in defaults: {e}"))
                })?;
        let mut table = toml::Table::try_from(&typed)
            .map_err(|e| CompileError::Hparams(format!("built-in defaults: {e}")))?;
        if let Some(name) = preset {
            let text = preset_text(name)?;
            let over: toml::Table = text
                .parse()
                .map_err(|e| CompileError::Hparams(format!("preset {name}: {e}")))?;
            merge(&mut table, over, "")?;
        }
        if let Some(path) = file {
            let text = amend_edits::fsutil::read_regular_string(path, MAX_HPARAMS_LEN)
                .map_err(|e| CompileError::Hparams(format!("--hparams: {e}")))?;
            let over: toml::Table = text.parse().map_err(|e| {
                CompileError::Hparams(format!("{}: {}", path.display(), toml_error(&text, &e)))
            })?;
            for key in leaf_keys(&over, "") {
                given.insert(key, Origin::File(path.to_path_buf()));
            }
            merge(&mut table, over, "").map_err(|e| match e {
                CompileError::Hparams(m) => {
                    CompileError::Hparams(format!("--hparams {}: {m}", path.display()))
                }
                e => e,
            })?;
        }
        // A key given twice would silently take the last value.
        let mut seen = std::collections::BTreeSet::new();
        for s in sets {
            if let Some((key, _)) = s.split_once('=') {
                let key: String = key.split_whitespace().collect();
                if !seen.insert(key.clone()) {
                    return Err(CompileError::Hparams(format!(
                        "--set {key}: given more than once; give each key once"
                    )));
                }
            }
        }
        for s in sets {
            let (key, value) = s.split_once('=').ok_or_else(|| {
                CompileError::Hparams(format!("--set {s:?}: expected section.key=value"))
            })?;
            let (section, field) = key.trim().split_once('.').ok_or_else(|| {
                CompileError::Hparams(format!(
                    "--set {s:?}: key must be section.key, e.g. grace.lr"
                ))
            })?;
            let value = parse_value(value.trim());
            let sec = table
                .get_mut(section)
                .and_then(|v| v.as_table_mut())
                .ok_or_else(|| {
                    CompileError::Hparams(format!("--set {s:?}: unknown section `{section}`"))
                })?;
            if !sec.contains_key(field) {
                return Err(CompileError::Hparams(format!(
                    "--set {s:?}: unknown key `{section}.{field}`"
                )));
            }
            sec.insert(field.to_string(), value);
            given.insert(format!("{section}.{field}"), Origin::Set(s.clone()));
        }
        // A wrong type or value names the file or `--set` that gave it.
        let hp: Hparams = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| {
                let text = e.to_string();
                let msg = match text.split_once("\nin `") {
                    Some((why, key)) => {
                        let key = key.trim_end().trim_end_matches('`');
                        format!("{}: {why}", origin_or_key(&given, key))
                    }
                    None => text,
                };
                CompileError::Hparams(msg)
            })?;
        hp.validate().map_err(|e| match e {
            CompileError::Hparams(m) => {
                let key = m.strip_prefix('`').and_then(|r| r.split_once('`'));
                match key.and_then(|(k, _)| given.get(k).map(|o| (k, o))) {
                    Some((k, o)) => CompileError::Hparams(format!(
                        "{}: {m}",
                        o.describe(k).trim_end_matches(&format!(": {k}"))
                    )),
                    None => CompileError::Hparams(m),
                }
            }
            e => e,
        })?;
        Ok((hp, given))
    }

    /// The layer `method` edits (MEMIT edits a window, `memit.layers`: None).
    pub fn layer(&self, method: crate::Method) -> Option<usize> {
        use crate::Method;
        match method {
            Method::Grace => Some(self.grace.layer),
            Method::TPatcher => Some(self.tpatcher.layer),
            Method::Rome => Some(self.rome.layer),
            Method::Lora => Some(self.lora.layer),
            Method::Serac => Some(self.serac.layer),
            Method::Memit => None,
        }
    }

    fn validate(&self) -> Result<()> {
        let bad = |k: &str, why: &str| Err(CompileError::Hparams(format!("`{k}` {why}")));
        // Every number must be finite: an inf rate or loss trains on NaN or never stops.
        let table = toml::Value::try_from(self)
            .map_err(|e| CompileError::Hparams(format!("hyperparameters: {e}")))?;
        if let Some((k, v)) = non_finite(&table, "") {
            return bad(&k, &format!("must be a finite number, got {v}"));
        }
        for (k, v) in [
            ("grace.stop_loss", self.grace.stop_loss),
            ("tpatcher.stop_loss", self.tpatcher.stop_loss),
            ("rome.stop_loss", self.rome.stop_loss),
            ("memit.stop_loss", self.memit.stop_loss),
            ("lora.stop_loss", self.lora.stop_loss),
        ] {
            if !(v >= 0.0) {
                return bad(k, &format!("must be a loss >= 0, got {v}"));
            }
        }
        // Upper bounds on counts: a typo such as steps=99999999999999 would run for ever.
        let layer_cap = amend_edits::bundle::format::MAX_LAYER as usize - 1;
        for (k, v, lo, hi) in [
            ("grace.steps", self.grace.steps, 1, MAX_STEPS),
            ("tpatcher.steps", self.tpatcher.steps, 1, MAX_STEPS),
            ("rome.steps", self.rome.steps, 1, MAX_STEPS),
            ("memit.steps", self.memit.steps, 1, MAX_STEPS),
            ("lora.steps", self.lora.steps, 1, MAX_STEPS),
            ("tpatcher.retries", self.tpatcher.retries, 0, 16),
            ("memit.batch", self.memit.batch, 1, 100_000),
            ("lora.rank", self.lora.rank, 1, 1024),
            (
                "serac.calibration_records",
                self.serac.calibration_records,
                1,
                100_000,
            ),
            ("memit.layers (count)", self.memit.layers.len(), 0, 256),
            ("grace.layer", self.grace.layer, 0, layer_cap),
            ("tpatcher.layer", self.tpatcher.layer, 0, layer_cap),
            ("rome.layer", self.rome.layer, 0, layer_cap),
            ("serac.layer", self.serac.layer, 0, layer_cap),
            ("lora.layer", self.lora.layer, 0, layer_cap),
            (
                "memit.layers",
                self.memit.layers.iter().copied().max().unwrap_or(0),
                0,
                layer_cap,
            ),
        ] {
            if !(lo..=hi).contains(&v) {
                return bad(k, &format!("must be in {lo}..={hi}, got {v}"));
            }
        }
        if !(self.grace.lr > 0.0) {
            return bad("grace.lr", "must be > 0");
        }
        if self.grace.steps == 0 {
            return bad("grace.steps", "must be >= 1");
        }
        if !(self.grace.radius >= 0.0 && self.grace.radius <= 2.0) {
            return bad(
                "grace.radius",
                "must be in [0, 2] (normalized Euclidean distance)",
            );
        }
        if !(self.tpatcher.lr > 0.0) {
            return bad("tpatcher.lr", "must be > 0");
        }
        if !(self.tpatcher.retry_loss_factor > 0.0 && self.tpatcher.retry_loss_factor <= 1.0) {
            return bad("tpatcher.retry_loss_factor", "must be in (0, 1]");
        }
        if !(self.rome.lr > 0.0) {
            return bad("rome.lr", "must be > 0");
        }
        if self.rome.steps == 0 {
            return bad("rome.steps", "must be >= 1");
        }
        if !(self.rome.clamp_norm_factor > 0.0) {
            return bad("rome.clamp_norm_factor", "must be > 0");
        }
        if !(self.rome.cov_lambda > 0.0) {
            return bad("rome.cov_lambda", "must be > 0");
        }
        if !(self.rome.shrink_nll >= 0.0) || !(self.memit.shrink_nll >= 0.0) {
            return bad("rome.shrink_nll/memit.shrink_nll", "must be >= 0 (0 = off)");
        }
        if !(self.rome.preserve_weight >= 0.0) {
            return bad("rome.preserve_weight", "must be >= 0");
        }
        let m = &self.memit;
        if m.layers.is_empty() || m.layers.windows(2).any(|w| w[0] >= w[1]) {
            return bad(
                "memit.layers",
                "must be a non-empty, strictly ascending list",
            );
        }
        if !(m.lr > 0.0) || m.steps == 0 || !(m.clamp_norm_factor > 0.0) {
            return bad("memit.lr/steps/clamp_norm_factor", "must be > 0");
        }
        if !(m.mom2_weight > 0.0) || !(m.cov_lambda > 0.0) {
            return bad("memit.mom2_weight/cov_lambda", "must be > 0");
        }
        if !(self.rome.null_space_threshold > 0.0) || !(self.rome.null_space_ridge > 0.0) {
            return bad("rome.null_space_threshold/null_space_ridge", "must be > 0");
        }
        if self.rome.pin_positions && !self.rome.covariance {
            return bad("rome.pin_positions", "needs rome.covariance = true");
        }
        if self.rome.null_space && !self.rome.covariance {
            return bad("rome.null_space", "needs rome.covariance = true");
        }
        if !(m.null_space_threshold > 0.0) || !(m.null_space_ridge > 0.0) {
            return bad("memit.null_space_threshold/null_space_ridge", "must be > 0");
        }
        if !(self.rome.neighbour_weight >= 0.0) || !(m.neighbour_weight >= 0.0) {
            return bad("rome/memit.neighbour_weight", "must be >= 0");
        }
        if self.rome.neighbours > 256 || m.neighbours > 256 {
            return bad("rome/memit.neighbours", "must be at most 256");
        }
        if !(m.margin_nll > 0.0) || !(m.margin_factor > 1.0) || m.margin_rounds > 8 {
            return bad(
                "memit.margin_nll/margin_factor/margin_rounds",
                "need margin_nll > 0, margin_factor > 1 and at most 8 rounds",
            );
        }
        if self.memit.neighbour_pool > 1024 {
            return bad("memit.neighbour_pool", "must be at most 1024");
        }
        for (name, spec, tokens) in [
            ("rome", &self.rome.corpus, self.rome.corpus_tokens),
            ("memit", &m.corpus, m.corpus_tokens),
        ] {
            if spec.is_empty() {
                return bad(&format!("{name}.corpus"), "must name a corpus");
            }
            if !(1..=50_000_000).contains(&tokens) {
                return bad(&format!("{name}.corpus_tokens"), "must be in 1..=50000000");
            }
        }
        for (name, factor, prompts) in [
            (
                "rome",
                self.rome.relation_kl_factor,
                &self.rome.relation_prompts,
            ),
            ("memit", m.relation_kl_factor, &m.relation_prompts),
        ] {
            if !(factor >= 0.0) || !factor.is_finite() {
                return bad(
                    &format!("{name}.relation_kl_factor"),
                    "must be a finite value >= 0",
                );
            }
            if prompts.len() > 16 || prompts.iter().any(|p| p.matches("{}").count() != 1) {
                return bad(
                    &format!("{name}.relation_prompts"),
                    "at most 16 prompts, each with exactly one `{}` for the subject",
                );
            }
        }
        if m.batch == 0 {
            return bad("memit.batch", "must be >= 1");
        }
        if !(1..=6).contains(&m.context_prefixes) {
            return bad("memit.context_prefixes", "must be in 1..=6");
        }
        if !(-1.0..=1.0).contains(&self.serac.threshold) {
            return bad("serac.threshold", "must be a cosine in [-1, 1]");
        }
        if !matches!(self.serac.embedder.as_str(), "scope" | "base") {
            return bad("serac.embedder", "must be \"scope\" or \"base\"");
        }
        for (name, v) in [
            ("serac.pooled_threshold", self.serac.pooled_threshold),
            ("serac.relation_min_score", self.serac.relation_min_score),
        ] {
            if !(-1.0..=1.0).contains(&v) {
                return bad(name, "must be a cosine in [-1, 1]");
            }
        }
        // Caps on thresholds calibrated into [0, cap] (a negative cap used to panic in the
        // calibration's clamp).
        for (name, v) in [
            (
                "serac.max_subject_threshold",
                self.serac.max_subject_threshold,
            ),
            (
                "serac.max_relation_threshold",
                self.serac.max_relation_threshold,
            ),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return bad(
                    name,
                    "must be in [0, 1] (a cap on a calibrated cosine threshold)",
                );
            }
        }
        if self.serac.calibration_records == 0 {
            return bad("serac.calibration_records", "must be at least 1");
        }
        if !amend_edits::bundle::format::is_relation_margin(self.serac.relation_margin) {
            return bad("serac.relation_margin", "must be in [0, 2]");
        }
        if !matches!(self.serac.relation_rule.as_str(), "vote" | "decide") {
            return bad("serac.relation_rule", "must be \"vote\" or \"decide\"");
        }
        if !amend_edits::bundle::format::is_group_weight(self.serac.relation_vote_weight) {
            return bad("serac.relation_vote_weight", "must be in [0, 1000]");
        }
        if !(self.serac.margin >= 0.0 && self.serac.margin < 1.0) {
            return bad("serac.margin", "must be in [0, 1)");
        }
        if self.lora.rank == 0 || !(self.lora.lr > 0.0) || self.lora.steps == 0 {
            return bad("lora.rank/lr/steps", "must be > 0");
        }
        if !(1..=6).contains(&self.rome.context_prefixes) {
            return bad("rome.context_prefixes", "must be in 1..=6");
        }
        Ok(())
    }
}

/// Where a hyperparameter the user gave comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// The `--hparams` file.
    File(PathBuf),
    /// A `--set` argument, as given.
    Set(String),
}

impl Origin {
    /// How a message names the value of `key`: `--hparams FILE: grace.layer` or
    /// `--set grace.layer=40`.
    pub fn describe(&self, key: &str) -> String {
        match self {
            Origin::File(path) => format!("--hparams {}: {key}", path.display()),
            Origin::Set(s) => format!("--set {s}"),
        }
    }
}

/// The keys the user gave, dotted (`grace.layer`), with where each came from; a key both the
/// file and `--set` give is the `--set`'s, which wins. The defaults and presets are not in it.
pub type Given = std::collections::BTreeMap<String, Origin>;

/// The dotted keys of the values (not the tables) in `t`.
fn leaf_keys(t: &toml::Table, prefix: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (k, v) in t {
        let name = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match v {
            toml::Value::Table(sub) => out.extend(leaf_keys(sub, &name)),
            _ => out.push(name),
        }
    }
    out
}

/// Largest `--hparams` file read (bytes): the defaults are 5 KB, and a parse error quotes the
/// line it is on.
pub const MAX_HPARAMS_LEN: u64 = 1 << 20;

/// How a message names `key`: where the user gave it (`--hparams FILE: grace.steps`,
/// `--set grace.steps=0`), else the key in backticks.
fn origin_or_key(given: &Given, key: &str) -> String {
    match given.get(key) {
        Some(o) => o.describe(key),
        None => format!("`{key}`"),
    }
}

/// A TOML parse error, with the quoted source line when it is short; a long line (a value
/// nested 10,000 deep) is named by line and column instead of printed whole.
fn toml_error(text: &str, e: &toml::de::Error) -> String {
    let Some(span) = e.span() else {
        return e.message().to_string();
    };
    let start = span.start.min(text.len());
    if !text.is_char_boundary(start) {
        return e.to_string();
    }
    let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
    let line_end = text[start..].find('\n').map_or(text.len(), |i| start + i);
    if line_end - line_start <= 200 {
        return e.to_string();
    }
    let line = text[..start].matches('\n').count() + 1;
    let column = text[line_start..start].chars().count() + 1;
    format!("line {line}, column {column}: {}", e.message())
}

/// The most optimisation steps a method takes per edit (the defaults take 25 to 150).
pub const MAX_STEPS: usize = 10_000;

/// The first number in `v` that is not finite, with its dotted key.
fn non_finite(v: &toml::Value, prefix: &str) -> Option<(String, f64)> {
    match v {
        toml::Value::Float(f) if !f.is_finite() => Some((prefix.to_string(), *f)),
        toml::Value::Table(t) => t.iter().find_map(|(k, v)| {
            let name = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            non_finite(v, &name)
        }),
        toml::Value::Array(a) => a.iter().find_map(|v| non_finite(v, prefix)),
        _ => None,
    }
}

/// `a.b = v` style value: TOML when it parses (numbers, booleans, arrays), else a string.
fn parse_value(s: &str) -> toml::Value {
    format!("v = {s}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(s.to_string()))
}

/// Overlay `over` onto `base`, rejecting keys the defaults do not have (typos).
fn merge(base: &mut toml::Table, over: toml::Table, prefix: &str) -> Result<()> {
    for (k, v) in over {
        let name = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o, &name)?,
            (Some(slot), v) => *slot = v,
            (None, _) => return Err(CompileError::Hparams(format!("unknown key `{name}`"))),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hyperparameter the defaults file leaves to its serde default can still be set.
    #[test]
    fn keys_with_serde_defaults_can_be_set() {
        let hp = Hparams::resolve(
            Arch::Gemma3,
            None,
            &["serac.calibration_records=64".to_string()],
        )
        .unwrap();
        assert_eq!(hp.serac.calibration_records, 64);
        let e = Hparams::resolve(Arch::Gemma3, None, &["serac.no_such_key=1".to_string()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown key `serac.no_such_key`"), "{e}");
    }

    #[test]
    fn defaults_parse_for_every_arch() {
        for a in Arch::all() {
            Hparams::resolve(a, None, &[]).unwrap();
        }
    }

    /// The shipped presets (runtime/hparams/presets/) stay loadable over every default.
    #[test]
    fn presets_parse_for_every_arch() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../runtime/hparams/presets");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            for a in Arch::all() {
                let hp = Hparams::resolve(a, Some(&path), &[]).unwrap();
                let base = Hparams::resolve(a, None, &[]).unwrap();
                assert_ne!(hp, base, "{} changes nothing", path.display());
            }
            n += 1;
        }
        assert!(n > 0, "no presets in {}", dir.display());
    }

    /// The compiled-in presets are the shipped files, and `--preset auto` picks the statements
    /// preset exactly for all-statement MEMIT batches.
    #[test]
    fn built_in_presets_match_the_files_and_auto_picks_by_prompt_form() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../runtime/hparams/presets");
        for (name, text) in PRESETS {
            let path = dir.join(format!("{name}.toml"));
            assert_eq!(std::fs::read_to_string(&path).unwrap(), *text);
            for a in Arch::all() {
                assert_eq!(
                    Hparams::resolve_with(a, Some(name), None, &[]).unwrap(),
                    Hparams::resolve(a, Some(&path), &[]).unwrap()
                );
            }
        }
        let hp = Hparams::resolve_with(Arch::Gemma3, Some("memit-statements"), None, &[]).unwrap();
        assert!(hp.memit.null_space && hp.memit.relation_kl_factor == 1.0);
        // The file and --set still win over the preset.
        let hp = Hparams::resolve_with(
            Arch::Gemma3,
            Some("memit-statements"),
            None,
            &["memit.null_space=false".into()],
        )
        .unwrap();
        assert!(!hp.memit.null_space);
        let e = Hparams::resolve_with(Arch::Gemma3, Some("nope"), None, &[]).unwrap_err();
        assert!(e.to_string().contains("memit-statements"), "{e}");

        use crate::Method;
        let st = ["Steve Jobs co-founded", "The Danube flows through"];
        let mixed = ["Steve Jobs co-founded", "Who founded Apple? "];
        assert_eq!(
            auto_preset(Method::Memit, st.into_iter()),
            Some("memit-statements")
        );
        assert_eq!(auto_preset(Method::Memit, mixed.into_iter()), None);
        assert_eq!(auto_preset(Method::Rome, st.into_iter()), None);
        assert_eq!(auto_preset(Method::Memit, std::iter::empty()), None);
        assert_eq!(prompt_forms(mixed.into_iter()), (1, 1));
        assert_eq!(prompt_forms(st.into_iter()), (0, 2));
    }

    #[test]
    fn set_overrides_and_rejects_unknown_keys() {
        let hp = Hparams::resolve(
            Arch::Gemma3,
            None,
            &["grace.lr=2.5".into(), "grace.steps = 7".into()],
        )
        .unwrap();
        assert_eq!(hp.grace.lr, 2.5);
        assert_eq!(hp.grace.steps, 7);
        let e = Hparams::resolve(Arch::Gemma3, None, &["grace.lrr=1".into()]).unwrap_err();
        assert!(e.to_string().contains("grace.lrr"), "{e}");
        let e = Hparams::resolve(Arch::Gemma3, None, &["grace.radius=5".into()]).unwrap_err();
        assert!(e.to_string().contains("grace.radius"), "{e}");
        let e = Hparams::resolve(Arch::Gemma3, None, &["nope".into()]).unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
        // Pinned positions join the covariance, so they need one.
        let sets = [
            "rome.covariance=false".into(),
            "rome.pin_positions=true".into(),
        ];
        let e = Hparams::resolve(Arch::Gemma3, None, &sets).unwrap_err();
        assert!(e.to_string().contains("rome.pin_positions"), "{e}");
    }

    /// Non-finite values, negative losses, huge counts, out-of-format layers and a key set
    /// twice are refused, naming the key.
    #[test]
    fn values_are_finite_bounded_and_set_once() {
        for (set, name) in [
            ("grace.lr=inf", "grace.lr"),
            ("rome.kl_factor=-inf", "rome.kl_factor"),
            ("grace.stop_loss=-1", "grace.stop_loss"),
            ("grace.stop_loss=inf", "grace.stop_loss"),
            ("lora.stop_loss=nan", "lora.stop_loss"),
            ("grace.steps=99999999999999", "grace.steps"),
            ("tpatcher.steps=10001", "tpatcher.steps"),
            ("tpatcher.retries=1000", "tpatcher.retries"),
            ("memit.batch=100001", "memit.batch"),
            ("lora.rank=100000", "lora.rank"),
            ("memit.steps=20000", "memit.steps"),
            ("grace.layer=5000", "grace.layer"),
            ("memit.layers=[1, 9999]", "memit.layers"),
        ] {
            let e = Hparams::resolve(Arch::Gemma3, None, &[set.into()]).unwrap_err();
            let m = e.to_string();
            assert!(
                m.contains(name)
                    && (m.contains("..=") || m.contains(">= 0") || m.contains("finite")),
                "{set}: {m}"
            );
        }
        let hp = Hparams::resolve(Arch::Gemma3, None, &["grace.steps=10000".into()]).unwrap();
        assert_eq!(hp.grace.steps, MAX_STEPS);
        let e = Hparams::resolve(
            Arch::Gemma3,
            None,
            &["grace.lr=1".into(), "grace . lr = 2".into()],
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("grace.lr: given more than once"),
            "{e}"
        );
        // A file's unknown key names the file.
        let dir = std::env::temp_dir().join(format!("amend-hp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("unk.toml");
        std::fs::write(&f, "[grace]\nbogus = 1\n").unwrap();
        let e = Hparams::resolve(Arch::Gemma3, Some(&f), &[]).unwrap_err();
        assert!(
            e.to_string()
                .contains("unk.toml: unknown key `grace.bogus`"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The keys the file and `--set` give are told apart from the defaults' and the preset's,
    /// each with its origin; `--set` wins a key both give.
    #[test]
    fn given_keys_name_their_origin() {
        let dir = std::env::temp_dir().join(format!("amend-hp-given-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("g.toml");
        std::fs::write(&f, "[grace]\nlayer = 3\nlr = 2.0\n[rome]\nlayer = 4\n").unwrap();
        let (hp, given) = Hparams::resolve_given(
            Arch::Gemma3,
            Some("memit-statements"),
            Some(&f),
            &["grace.layer=5".into(), "tpatcher.steps=3".into()],
        )
        .unwrap();
        assert_eq!(hp.layer(crate::Method::Grace), Some(5));
        assert_eq!(hp.layer(crate::Method::Rome), Some(4));
        assert_eq!(hp.layer(crate::Method::Memit), None);
        let keys: Vec<&str> = given.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            ["grace.layer", "grace.lr", "rome.layer", "tpatcher.steps"]
        );
        assert_eq!(given["grace.layer"], Origin::Set("grace.layer=5".into()));
        assert_eq!(
            given["rome.layer"].describe("rome.layer"),
            format!("--hparams {}: rome.layer", f.display())
        );
        assert_eq!(
            given["grace.layer"].describe("grace.layer"),
            "--set grace.layer=5"
        );
        let (_, none) = Hparams::resolve_given(Arch::Gemma3, None, None, &[]).unwrap();
        assert!(none.is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn relation_prompts_are_checked() {
        let hp = Hparams::resolve(Arch::Gemma3, None, &[]).unwrap();
        assert!(hp.memit.relation_kl_factor > 0.0 && !hp.memit.relation_prompts.is_empty());
        assert_eq!(
            hp.memit.v_star().relation_prompts,
            hp.memit.relation_prompts
        );
        for bad in [
            "memit.relation_prompts=[\"no subject\"]",
            "memit.relation_prompts=[\"{} and {}\"]",
            "rome.relation_kl_factor=-1",
            "memit.relation_kl_factor=nan",
        ] {
            let e = Hparams::resolve(Arch::Gemma3, None, &[bad.into()]).unwrap_err();
            assert!(e.to_string().contains("relation_"), "{bad}: {e}");
        }
        let e = Hparams::resolve(Arch::Gemma3, None, &["memit.neighbour_pool=5000".into()])
            .unwrap_err();
        assert!(e.to_string().contains("neighbour_pool"), "{e}");
        let hp = Hparams::resolve(Arch::Gemma3, None, &["memit.neighbour_pool=64".into()]).unwrap();
        assert_eq!(hp.memit.neighbour_pool, 64);
    }

    #[test]
    fn relation_rule_and_vote_weight_are_checked() {
        for a in Arch::all() {
            let hp = Hparams::resolve(a, None, &[]).unwrap();
            assert_eq!(
                (
                    hp.serac.relation_rule.as_str(),
                    hp.serac.relation_vote_weight
                ),
                ("vote", 8.0),
                "{a:?}"
            );
        }
        for (set, name) in [
            ("serac.relation_rule=\"maybe\"", "serac.relation_rule"),
            (
                "serac.relation_vote_weight=nan",
                "serac.relation_vote_weight",
            ),
            (
                "serac.relation_vote_weight=-1",
                "serac.relation_vote_weight",
            ),
            (
                "serac.relation_vote_weight=2000",
                "serac.relation_vote_weight",
            ),
            ("serac.relation_margin=3", "serac.relation_margin"),
            (
                "serac.max_subject_threshold=-1",
                "serac.max_subject_threshold",
            ),
            (
                "serac.max_relation_threshold=nan",
                "serac.max_relation_threshold",
            ),
        ] {
            let e = Hparams::resolve(Arch::Gemma3, None, &[set.into()]).unwrap_err();
            assert!(e.to_string().contains(name), "{set}: {e}");
        }
        let hp = Hparams::resolve(
            Arch::Gemma3,
            None,
            &["serac.relation_rule=\"decide\"".into()],
        )
        .unwrap();
        assert_eq!(hp.serac.relation_rule, "decide");
    }
    /// Session 37: a hostile `--hparams` file is refused small, and a wrong type or value names
    /// the file it came from.
    #[test]
    fn hparams_file_errors_name_the_file_and_stay_short() {
        let dir = std::env::temp_dir().join(format!("amend-hp-hostile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let err = |name: &str, text: &str| {
            let f = dir.join(name);
            std::fs::write(&f, text).unwrap();
            let e = Hparams::resolve(Arch::Gemma3, Some(&f), &[])
                .unwrap_err()
                .to_string();
            (e, f.display().to_string())
        };
        let (e, f) = err("float.toml", "[grace]\nsteps = 60.0\n");
        assert!(
            e.contains(&format!("--hparams {f}: grace.steps: invalid type")),
            "{e}"
        );
        assert!(!e.contains('\n'), "{e}");
        let (e, f) = err("zero.toml", "[grace]\nsteps = 0\n");
        assert!(
            e.contains(&format!("--hparams {f}: `grace.steps` must be in")),
            "{e}"
        );
        let (e, _) = err("nan.toml", "[grace]\nlr = nan\n");
        assert!(e.contains("`grace.lr` must be a finite number"), "{e}");
        let (e, _) = err(
            "deep.toml",
            &format!("x = {}{}\n", "[".repeat(10_000), "]".repeat(10_000)),
        );
        assert!(
            e.len() < 500 && e.contains("line 1, column"),
            "{} bytes: {}",
            e.len(),
            &e[..e.len().min(300)]
        );
        let (e, _) = err("big.toml", &format!("# {}\n", "x".repeat(2 << 20)));
        assert!(
            e.contains("--hparams: ") && (e.contains("cap") || e.contains("bytes")),
            "{e}"
        );
        // A `--set` value is named by its flag.
        let e = Hparams::resolve(Arch::Gemma3, None, &["grace.steps=\"x\"".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--set grace.steps=\"x\": invalid type"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
