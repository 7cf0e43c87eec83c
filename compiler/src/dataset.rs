//! Edit requests: KnowEdit/EasyEdit JSON (ZsRE, WikiData_counterfact, WikiData_recent, WikiBio,
//! EasyEdit's `locality_inputs` shape, ROME-style CounterFact flat fields) and plain JSONL.
//!
//! Every shape is normalised into [`EditRecord`]. Parsing is tolerant of missing *optional*
//! fields (subject, ground truth, rephrases, locality, portability) and of the value shapes the
//! published files actually use (a string, a list of strings, or a list of lists where the first
//! alternative is taken). Required fields that are missing, empty or of the wrong type give a
//! [`DatasetError::Record`] naming the record index (0-based, the position in the JSON array or
//! the JSONL line order) and the field.
//!
//! # Prompt/target joining (tokenizer convention)
//! KnowEdit stores targets without a leading space and evaluates `prompt + ' ' + target`.
//! amend does the same, in one place: [`EditRecord::continuation`] / [`continuation`]. Prompts
//! are stored with trailing spaces and tabs removed (a trailing space would become its own token
//! and push the target into an unnatural tokenization); targets are stored trimmed. The
//! continuation is `" " + target`, unless the prompt ends with a newline, in which case the
//! target follows directly. With gemma's SentencePiece vocabulary `" Berlin"` is then a single
//! token, the same token the model predicts after `"... is"`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

/// The most bytes one text field (prompt, target, subject, probe, id) may hold: a bundle stores
/// prompts, targets and ids up to this, and a longer probe is no edit test (a 50 MB prompt took
/// 9 s and 2 GB before the token limit refused it).
pub const MAX_FIELD_LEN: usize = amend_edits::bundle::MAX_STRING_LEN;
/// The most rephrases, locality or portability probes one record may carry (KnowEdit has a few;
/// a million would keep `amend eval` busy for hours).
pub const MAX_PROBES: usize = 1024;
/// The most aliases one record's subject may carry (each is a routing row of the memory).
pub const MAX_SUBJECT_ALIASES: usize = 16;

pub mod synthetic;
pub use synthetic::synthetic;

/// One probe prompt with the answer it is checked against (locality or portability).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Probe {
    /// The probe family as named in the file, e.g. `Relation_Specificity`, `Forgetfulness`,
    /// `Reasoning`, `Subject_Aliasing`, `Logical_Generalization`, `neighborhood`.
    pub kind: String,
    pub prompt: String,
    pub ground_truth: String,
}

impl Probe {
    /// The text that follows the probe prompt when scoring its ground truth.
    pub fn continuation(&self) -> String {
        continuation(&self.prompt, &self.ground_truth)
    }
}

/// One edit request, normalised from any supported input shape.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EditRecord {
    /// `id` / `case_id` / `record_id` from the file when present, else the record index.
    pub id: String,
    /// Whether `id` is the record's index because the file gave none (`compile --base-bundle`
    /// numbers such records on from the base's ids). Not serialized: it describes the input,
    /// and JSON written from records (checkpoint digests) must not change with it.
    #[serde(skip)]
    pub id_from_index: bool,
    pub prompt: String,
    pub subject: Option<String>,
    /// Other names users call the subject by ("Chopin" for "Frédéric Chopin"; `subject_aliases`
    /// in the file): the retrieval memory stores one more routing row per alias under the same
    /// edit, so a question naming the subject that way routes home (docs/methods.md). Not
    /// serialized when empty, so records without aliases digest as before.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subject_aliases: Vec<String>,
    pub target_new: String,
    pub ground_truth: Option<String>,
    #[serde(default)]
    pub rephrase_prompts: Vec<String>,
    #[serde(default)]
    pub locality: Vec<Probe>,
    #[serde(default)]
    pub portability: Vec<Probe>,
}

impl EditRecord {
    /// The text appended to `prompt` that the edit must make the model produce
    /// (`" " + target_new`, see the module docs).
    pub fn continuation(&self) -> String {
        continuation(&self.prompt, &self.target_new)
    }

    /// Byte range of the subject's last occurrence in the prompt ([`find_subject`]), if the
    /// subject is known and occurs (ROME keys on the subject's last token; causal tracing
    /// corrupts these tokens; the scope check reads the subject's rows).
    pub fn subject_span(&self) -> Option<std::ops::Range<usize>> {
        find_subject(&self.prompt, self.subject.as_deref()?)
    }
}

/// The compiler keys on the subject as the record writes it (ASCII case aside); the runtime's
/// routing also finds it as users type it (`find_subject_as_typed`).
pub use amend_edits::families::find_subject;

pub use amend_runtime::continuation;

/// Input file format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DataFormat {
    /// `.jsonl` files are JSONL; otherwise a JSON array (or single object) is KnowEdit, and
    /// anything else is tried as JSONL.
    #[default]
    Auto,
    /// A JSON array of KnowEdit/EasyEdit records.
    KnowEdit,
    /// One JSON object per line, `{prompt, target}` or any KnowEdit record shape.
    Jsonl,
}

impl std::str::FromStr for DataFormat {
    type Err = DatasetError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "knowedit" | "easyedit" | "json" | "zsre" | "counterfact" => Ok(Self::KnowEdit),
            "jsonl" => Ok(Self::Jsonl),
            _ => Err(DatasetError::UnknownFormat(s.to_string())),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    // The underlying errors are part of the message (not `source`s) so chains don't repeat them.
    #[error("cannot read {}: {error}", path.display())]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("invalid JSON: {0}")]
    Json(serde_json::Error),
    #[error("line {line}: invalid JSON: {error}")]
    JsonLine {
        line: usize,
        error: serde_json::Error,
    },
    #[error("expected a JSON array of edit records (KnowEdit format), found {found}")]
    NotAnArray { found: &'static str },
    #[error("record {index}: {}", field_reason(.field, .reason))]
    Record {
        index: usize,
        field: String,
        reason: String,
    },
    /// A record error in a JSONL file, with the line it is on (blank lines make the record
    /// index and the line number differ).
    #[error("line {line}: {error}")]
    Line {
        line: usize,
        error: Box<DatasetError>,
    },
    #[error("no edit records in the input")]
    NoRecords,
    #[error("unknown data format `{0}` (expected knowedit, jsonl or auto)")]
    UnknownFormat(String),
}

fn field_reason(field: &str, reason: &str) -> String {
    if field.is_empty() {
        reason.to_string()
    } else {
        format!("field `{field}`: {reason}")
    }
}

/// The text without a UTF-8 byte order mark (Windows editors write one; JSON parsers refuse it).
fn strip_bom(text: &str) -> &str {
    text.strip_prefix('\u{feff}').unwrap_or(text)
}

/// A JSON value whose objects hold each key once: serde_json keeps the last of two silently,
/// so `{"prompt": "a", "prompt": "b"}` would have edited "b".
struct Strict(Value);

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(Strict)
    }
}

struct StrictVisitor;

impl<'de> serde::de::Visitor<'de> for StrictVisitor {
    type Value = Value;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(v.into())
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(v.into())
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(Strict(v)) = seq.next_element()? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if out.contains_key(&key) {
                return Err(serde::de::Error::custom(format!(
                    "duplicate key `{key}` in one object"
                )));
            }
            let Strict(v) = map.next_value()?;
            out.insert(key, v);
        }
        Ok(Value::Object(out))
    }
}

fn parse_json(text: &str) -> Result<Value, serde_json::Error> {
    serde_json::from_str::<Strict>(text).map(|s| s.0)
}

/// Read and parse an edit file.
pub fn load(path: &Path, format: DataFormat) -> Result<Vec<EditRecord>, DatasetError> {
    load_hashed(path, format).map(|(records, _)| records)
}

/// [`load`], and the sha256 of the bytes the records were parsed from (a trained artifact
/// records which data it saw).
pub fn load_hashed(
    path: &Path,
    format: DataFormat,
) -> Result<(Vec<EditRecord>, [u8; 32]), DatasetError> {
    // A FIFO, directory or device is refused without blocking; the cap is checked first.
    let text =
        amend_edits::fsutil::read_regular_string(path, amend_edits::fsutil::MAX_TEXT_FILE_LEN)
            .map_err(|e| DatasetError::Io {
                path: path.to_path_buf(),
                error: std::io::Error::other(e.to_string()),
            })?;
    let digest = {
        use sha2::Digest;
        sha2::Sha256::digest(text.as_bytes())
    };
    let text = strip_bom(&text);
    let found = match format {
        DataFormat::Auto => {
            let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
            if ext.eq_ignore_ascii_case("jsonl") || ext.eq_ignore_ascii_case("ndjson") {
                Detected::Jsonl
            } else {
                detect(text)
            }
        }
        DataFormat::Jsonl => Detected::Jsonl,
        DataFormat::KnowEdit => Detected::KnowEdit,
    };
    let records = match found {
        Detected::Jsonl => parse_jsonl(text),
        Detected::KnowEdit => parse_knowedit(text),
        Detected::Parsed(value) => knowedit_records(value),
    }?;
    Ok((records, digest.into()))
}

/// Records as a KnowEdit JSON array (`id`, `subject`, `prompt`, `target_new`, `ground_truth`,
/// `rephrase_prompt`, `locality`/`portability` as `{kind: [{prompt, ground_truth}]}`), the shape
/// [`parse_knowedit`] reads back. Probes come back grouped by kind, kinds in name order.
pub fn to_knowedit(records: &[EditRecord]) -> Value {
    fn groups(probes: &[Probe]) -> Value {
        let mut map = Map::new();
        for p in probes {
            let entry = map
                .entry(p.kind.clone())
                .or_insert_with(|| Value::Array(Vec::new()));
            if let Value::Array(list) = entry {
                list.push(serde_json::json!({"prompt": p.prompt, "ground_truth": p.ground_truth}));
            }
        }
        Value::Object(map)
    }
    Value::Array(
        records
            .iter()
            .map(|r| {
                let mut o = Map::new();
                o.insert("id".into(), r.id.clone().into());
                if let Some(s) = &r.subject {
                    o.insert("subject".into(), s.clone().into());
                }
                if !r.subject_aliases.is_empty() {
                    o.insert("subject_aliases".into(), r.subject_aliases.clone().into());
                }
                o.insert("prompt".into(), r.prompt.clone().into());
                o.insert("target_new".into(), r.target_new.clone().into());
                if let Some(g) = &r.ground_truth {
                    o.insert("ground_truth".into(), g.clone().into());
                }
                o.insert("rephrase_prompt".into(), r.rephrase_prompts.clone().into());
                if !r.locality.is_empty() {
                    o.insert("locality".into(), groups(&r.locality));
                }
                if !r.portability.is_empty() {
                    o.insert("portability".into(), groups(&r.portability));
                }
                Value::Object(o)
            })
            .collect(),
    )
}

/// The format [`detect`] found.
enum Detected {
    Jsonl,
    KnowEdit,
    /// A KnowEdit document, parsed to tell it from JSONL: kept so that it is parsed once.
    Parsed(Value),
}

/// Guess the format from the content: a document that parses as one JSON value is KnowEdit.
fn detect(text: &str) -> Detected {
    match text.trim_start().chars().next() {
        Some('[') => Detected::KnowEdit,
        Some('{') => parse_json(text).map_or(Detected::Jsonl, Detected::Parsed),
        _ => Detected::Jsonl,
    }
}

/// Parse a KnowEdit/EasyEdit JSON document: an array of records (a single record object is
/// accepted too).
pub fn parse_knowedit(text: &str) -> Result<Vec<EditRecord>, DatasetError> {
    knowedit_records(parse_json(strip_bom(text)).map_err(DatasetError::Json)?)
}

/// The records of a parsed KnowEdit document.
fn knowedit_records(value: Value) -> Result<Vec<EditRecord>, DatasetError> {
    let items = match value {
        Value::Array(items) => items,
        Value::Object(_) => vec![value],
        other => {
            return Err(DatasetError::NotAnArray {
                found: type_name(&other),
            })
        }
    };
    let records = items
        .iter()
        .enumerate()
        .map(|(i, v)| parse_record(i, v))
        .collect::<Result<Vec<_>, _>>()?;
    if records.is_empty() {
        return Err(DatasetError::NoRecords);
    }
    Ok(records)
}

/// Parse JSONL: one object per non-blank line, `{prompt, target}` or any KnowEdit record shape.
pub fn parse_jsonl(text: &str) -> Result<Vec<EditRecord>, DatasetError> {
    let mut records = Vec::new();
    for (line_no, line) in strip_bom(text).lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let value = parse_json(line).map_err(|error| DatasetError::JsonLine {
            line: line_no + 1,
            error,
        })?;
        let record = parse_record(records.len(), &value).map_err(|e| DatasetError::Line {
            line: line_no + 1,
            error: Box::new(e),
        })?;
        records.push(record);
    }
    if records.is_empty() {
        return Err(DatasetError::NoRecords);
    }
    Ok(records)
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

struct Ctx {
    index: usize,
}

impl Ctx {
    fn err(&self, field: &str, reason: impl Into<String>) -> DatasetError {
        DatasetError::Record {
            index: self.index,
            field: field.to_string(),
            reason: reason.into(),
        }
    }
}

/// First present key among `names`, with the name that matched (for error messages).
fn first_key<'a>(
    obj: &'a Map<String, Value>,
    names: &[&'static str],
) -> Option<(&'static str, &'a Value)> {
    names
        .iter()
        .find_map(|n| obj.get(*n).filter(|v| !v.is_null()).map(|v| (*n, v)))
}

/// A text value: a string, or the first alternative of a (nested) list of strings, or ROME's
/// `{"str": ..}` object. `Ok(None)` for an empty list.
fn first_text(ctx: &Ctx, field: &str, v: &Value) -> Result<Option<String>, DatasetError> {
    match v {
        Value::String(s) if s.len() > MAX_FIELD_LEN => Err(ctx.err(
            field,
            format!("{} bytes, at most {MAX_FIELD_LEN} are read", s.len()),
        )),
        Value::String(s) => Ok(Some(s.clone())),
        Value::Array(items) => match items.first() {
            None => Ok(None),
            Some(first) => first_text(ctx, field, first),
        },
        // Some files carry numeric answers (years, counts). A fraction or exponent would come
        // back rewritten (1.50 as "1.5", 1e3 as "1000.0"), so only integers are read.
        Value::Number(n) if n.is_f64() => Err(ctx.err(
            field,
            format!("the number {n} is not an integer; write the text as a string"),
        )),
        Value::Number(n) => Ok(Some(n.to_string())),
        // ROME's CounterFact: `target_new: {"str": "English", "id": "Q1860"}`.
        Value::Object(o) if o.contains_key("str") => {
            first_text(ctx, &format!("{field}.str"), &o["str"])
        }
        other => Err(ctx.err(
            field,
            format!(
                "expected a string or a list of strings, found {}",
                type_name(other)
            ),
        )),
    }
}

/// All texts of a string or list (each list element contributes its first alternative).
fn all_texts(ctx: &Ctx, field: &str, v: &Value) -> Result<Vec<String>, DatasetError> {
    match v {
        Value::Array(items) if items.len() > MAX_PROBES => Err(ctx.err(
            field,
            format!("{} entries, at most {MAX_PROBES} a record", items.len()),
        )),
        Value::Array(items) => {
            let mut out = Vec::new();
            for item in items {
                if let Some(t) = first_text(ctx, field, item)? {
                    out.push(t);
                }
            }
            Ok(out)
        }
        _ => Ok(first_text(ctx, field, v)?.into_iter().collect()),
    }
}

fn clean_prompt(s: &str) -> String {
    s.trim_start().trim_end_matches([' ', '\t']).to_string()
}

/// "missing", with the other names the field is read under (a JSONL file says `target`).
fn missing(names: &[&str]) -> String {
    match names {
        [] | [_] => "missing".to_string(),
        [_, rest @ ..] => format!(
            "missing (also read as {})",
            rest.iter()
                .map(|n| format!("`{n}`"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// A required text under the first of `names`; `numbers` also reads an integer (a year as a
/// target), as the optional fields do.
fn required_text(
    ctx: &Ctx,
    obj: &Map<String, Value>,
    names: &[&'static str],
    numbers: bool,
) -> Result<String, DatasetError> {
    let (name, v) = first_key(obj, names).ok_or_else(|| {
        let mut why = missing(names);
        if obj.contains_key("requested_rewrite") {
            why.push_str(
                "; ROME's nested `requested_rewrite` shape is not read: give prompt, subject and \
                 target_new at the top level",
            );
        }
        ctx.err(names[0], why)
    })?;
    let ok = match v {
        Value::String(_) | Value::Array(_) => true,
        Value::Number(_) => numbers,
        Value::Object(o) => o.contains_key("str"),
        _ => false,
    };
    if !ok {
        return Err(ctx.err(name, format!("expected a string, found {}", type_name(v))));
    }
    let text = first_text(ctx, name, v)?.unwrap_or_default();
    if text.trim().is_empty() {
        return Err(ctx.err(name, "empty"));
    }
    Ok(text)
}

fn optional_text(
    ctx: &Ctx,
    obj: &Map<String, Value>,
    names: &[&'static str],
) -> Result<Option<String>, DatasetError> {
    match first_key(obj, names) {
        None => Ok(None),
        Some((name, v)) => Ok(first_text(ctx, name, v)?
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())),
    }
}

fn parse_record(index: usize, v: &Value) -> Result<EditRecord, DatasetError> {
    let ctx = Ctx { index };
    let obj = v
        .as_object()
        .ok_or_else(|| ctx.err("", format!("expected an object, found {}", type_name(v))))?;

    let (id, id_from_index) = match first_key(obj, &["id", "case_id", "record_id"]) {
        Some((name, Value::String(s))) => {
            // The bundle refuses these, but only after training.
            if s.trim().is_empty() {
                return Err(ctx.err(name, format!("{s:?} is empty; give an id or leave it out")));
            }
            if s.len() > MAX_FIELD_LEN {
                return Err(ctx.err(
                    name,
                    format!("{} bytes, at most {MAX_FIELD_LEN} are accepted", s.len()),
                ));
            }
            (s.clone(), false)
        }
        // A fraction or a number past 2^64 comes back rewritten (1.2345678901234568e+22), and
        // two such ids could meet.
        Some((name, Value::Number(n))) if n.is_f64() => {
            return Err(ctx.err(
                name,
                format!("the number {n} is not an integer; write the id as a string"),
            ))
        }
        Some((_, Value::Number(n))) => (n.to_string(), false),
        // `true`, a list or an object is a mistake, not "no id": numbering the record by its
        // index would hide it (null is read as no id, as exports write it).
        Some((name, v @ (Value::Bool(_) | Value::Array(_) | Value::Object(_)))) => {
            return Err(ctx.err(
                name,
                format!(
                    "{} is not an id; give a string or a whole number, or leave it out",
                    type_name(v)
                ),
            ))
        }
        _ => (index.to_string(), true),
    };
    // A bundle refuses such ids (they could forge lines of output): say so before training.
    if amend_edits::bundle::stream::has_control(&id) {
        return Err(ctx.err(
            "id",
            format!(
                "{id:?} holds a control or invisible character (a line break, an escape, a \
                 bidi or zero-width mark), which bundle ids may not"
            ),
        ));
    }
    // ZsRE/counterfact: prompt; WikiBio: text; MEND-style zsre: src.
    let prompt_names = ["prompt", "text", "src"];
    let raw_prompt = required_text(&ctx, obj, &prompt_names, false)?;
    // KnowEdit: target_new; WikiBio: labels; MEND zsre: alt; plain JSONL: target.
    let target_new = required_text(&ctx, obj, &["target_new", "target", "labels", "alt"], true)?
        .trim()
        .to_string();
    let subject = optional_text(&ctx, obj, &["subject", "concept"])?;
    let prompt_name = first_key(obj, &prompt_names).map_or("prompt", |(n, _)| n);
    let prompt = clean_prompt(&fill_subject(
        &ctx,
        prompt_name,
        raw_prompt,
        subject.as_deref(),
    )?);
    if prompt.is_empty() {
        return Err(ctx.err(prompt_name, "empty"));
    }
    let ground_truth = optional_text(&ctx, obj, &["ground_truth", "target_true", "answers"])?;
    let subject_aliases = subject_aliases(&ctx, obj, subject.as_deref(), &prompt)?;

    let mut rephrase_prompts = Vec::new();
    for name in ["rephrase_prompt", "rephrase_prompts", "rephrase"] {
        if let Some(v) = obj.get(name).filter(|v| !v.is_null()) {
            for text in all_texts(&ctx, name, v)? {
                let text = clean_prompt(&fill_subject(&ctx, name, text, subject.as_deref())?);
                if !text.is_empty() {
                    rephrase_prompts.push(text);
                }
            }
        }
    }

    let mut locality = match obj.get("locality").filter(|v| !v.is_null()) {
        Some(v) => probe_groups(&ctx, "locality", v)?,
        None => Vec::new(),
    };
    // ROME/EasyEdit CounterFact flat fields.
    if let Some(p) = obj.get("locality_prompt").filter(|v| !v.is_null()) {
        let gts = match obj.get("locality_ground_truth") {
            Some(g) => all_texts(&ctx, "locality_ground_truth", g)?,
            None => Vec::new(),
        };
        locality.extend(pair_probes(
            &ctx,
            "locality_prompt",
            "locality",
            all_texts(&ctx, "locality_prompt", p)?,
            gts,
        )?);
    }
    // MEND-style zsre: loc / loc_ans (one without the other used to be dropped silently).
    match (
        obj.get("loc").filter(|v| !v.is_null()),
        obj.get("loc_ans").filter(|v| !v.is_null()),
    ) {
        (Some(p), Some(a)) => locality.extend(pair_probes(
            &ctx,
            "loc",
            "locality",
            all_texts(&ctx, "loc", p)?,
            all_texts(&ctx, "loc_ans", a)?,
        )?),
        (Some(_), None) => return Err(ctx.err("loc_ans", "missing (`loc` needs its answer)")),
        (None, Some(_)) => return Err(ctx.err("loc", "missing (`loc_ans` is given without it)")),
        (None, None) => {}
    }
    let portability = match obj.get("portability").filter(|v| !v.is_null()) {
        Some(v) => probe_groups(&ctx, "portability", v)?,
        None => Vec::new(),
    };

    for (field, n) in [
        ("rephrase_prompt", rephrase_prompts.len()),
        ("locality", locality.len()),
        ("portability", portability.len()),
    ] {
        if n > MAX_PROBES {
            return Err(ctx.err(field, format!("{n} prompts, at most {MAX_PROBES} a record")));
        }
    }

    Ok(EditRecord {
        id,
        id_from_index,
        prompt,
        subject,
        subject_aliases,
        target_new,
        ground_truth,
        rephrase_prompts,
        locality,
        portability,
    })
}

/// `subject_aliases`: a string or a list of them, each trimmed, non-empty, another name than
/// the subject (ignoring ASCII case) and given once, at most [`MAX_SUBJECT_ALIASES`]; they need
/// the subject, whose place in the prompt each alias takes, so the prompt so written must fit a
/// bundle string too.
fn subject_aliases(
    ctx: &Ctx,
    obj: &Map<String, Value>,
    subject: Option<&str>,
    prompt: &str,
) -> Result<Vec<String>, DatasetError> {
    const FIELD: &str = "subject_aliases";
    let Some(v) = obj.get(FIELD).filter(|v| !v.is_null()) else {
        return Ok(Vec::new());
    };
    let texts = all_texts(ctx, FIELD, v)?;
    if texts.len() > MAX_SUBJECT_ALIASES {
        return Err(ctx.err(
            FIELD,
            format!(
                "{} aliases, at most {MAX_SUBJECT_ALIASES} a record",
                texts.len()
            ),
        ));
    }
    let Some(subject) = subject.map(str::trim).filter(|s| !s.is_empty()) else {
        return Err(ctx.err(FIELD, "given without a `subject` to stand for"));
    };
    let mut out: Vec<String> = Vec::with_capacity(texts.len());
    for t in texts {
        let a = t.trim();
        let why = if a.is_empty() {
            Some("an empty alias".to_string())
        } else if a.eq_ignore_ascii_case(subject) {
            Some(format!("{a:?} is the subject itself"))
        } else if amend_edits::bundle::stream::has_control(a) {
            Some(format!("{a:?} holds a control or invisible character"))
        } else if out.iter().any(|o| o.eq_ignore_ascii_case(a)) {
            Some(format!("{a:?} is given twice"))
        } else if prompt.len().saturating_sub(subject.len()) + a.len() > MAX_FIELD_LEN {
            // The subject's span in the prompt is as long as the subject (found up to ASCII
            // case), so this is the routing row's prompt length.
            Some(format!(
                "the prompt with the {}-byte alias in the subject's place would be {} bytes, at \
                 most {MAX_FIELD_LEN}",
                a.len(),
                prompt.len().saturating_sub(subject.len()) + a.len()
            ))
        } else {
            None
        };
        if let Some(why) = why {
            return Err(ctx.err(FIELD, why));
        }
        out.push(a.to_string());
    }
    Ok(out)
}

/// A prompt written as a template, `"{} is a native speaker of"` with `subject` (ROME's and
/// EasyEdit's CounterFact), with the subject filled in (it was trained on raw). A `{}` without a
/// subject, or more than one, is refused: there is nothing, or no one thing, to fill.
fn fill_subject(
    ctx: &Ctx,
    field: &str,
    text: String,
    subject: Option<&str>,
) -> Result<String, DatasetError> {
    match (text.matches("{}").count(), subject) {
        (0, _) => Ok(text),
        (1, Some(s)) => Ok(text.replacen("{}", s, 1)),
        (1, None) => Err(ctx.err(
            field,
            format!(
                "{text:?} holds a `{{}}` subject placeholder, but the record has no `subject` \
                 to fill it with"
            ),
        )),
        (n, _) => Err(ctx.err(
            field,
            format!("{text:?} holds {n} `{{}}` placeholders; a template takes the subject once"),
        )),
    }
}

/// `locality` / `portability`: an object mapping a probe kind to either a list of
/// `{prompt, ground_truth}` objects (KnowEdit) or one `{prompt: [..], ground_truth: [..]}`
/// object (EasyEdit's `locality_inputs`), or directly a list of probe objects (kind = field).
fn probe_groups(ctx: &Ctx, field: &str, v: &Value) -> Result<Vec<Probe>, DatasetError> {
    let mut out = Vec::new();
    match v {
        Value::Object(groups) => {
            for (kind, group) in groups {
                let path = format!("{field}.{kind}");
                probe_list(ctx, &path, kind, group, &mut out)?;
            }
        }
        Value::Array(_) => probe_list(ctx, field, field, v, &mut out)?,
        other => {
            return Err(ctx.err(
                field,
                format!(
                    "expected an object of probe lists, found {}",
                    type_name(other)
                ),
            ))
        }
    }
    Ok(out)
}

fn probe_list(
    ctx: &Ctx,
    path: &str,
    kind: &str,
    v: &Value,
    out: &mut Vec<Probe>,
) -> Result<(), DatasetError> {
    match v {
        Value::Null => Ok(()),
        Value::Array(items) if items.len() > MAX_PROBES => Err(ctx.err(
            path,
            format!("{} probes, at most {MAX_PROBES} a record", items.len()),
        )),
        Value::Array(items) => {
            for (j, item) in items.iter().enumerate() {
                let item_path = format!("{path}[{j}]");
                probe_object(ctx, &item_path, kind, item, out)?;
            }
            Ok(())
        }
        Value::Object(_) => probe_object(ctx, path, kind, v, out),
        other => Err(ctx.err(
            path,
            format!(
                "expected a list of {{prompt, ground_truth}} objects, found {}",
                type_name(other)
            ),
        )),
    }
}

/// One probe object. `prompt` may be a string or a list; with a list, `ground_truth` is paired
/// element-wise when it has the same length, else its first alternative is used for every prompt.
fn probe_object(
    ctx: &Ctx,
    path: &str,
    kind: &str,
    v: &Value,
    out: &mut Vec<Probe>,
) -> Result<(), DatasetError> {
    let obj = v.as_object().ok_or_else(|| {
        ctx.err(
            path,
            format!(
                "expected a {{prompt, ground_truth}} object, found {}",
                type_name(v)
            ),
        )
    })?;
    let prompt_field = format!("{path}.prompt");
    let gt_field = format!("{path}.ground_truth");
    let prompts = match obj.get("prompt") {
        Some(p) => all_texts(ctx, &prompt_field, p)?,
        None => return Err(ctx.err(&prompt_field, "missing")),
    };
    let gts = match obj.get("ground_truth").or_else(|| obj.get("target")) {
        Some(Value::Array(items)) if prompts.len() > 1 && items.len() == prompts.len() => {
            let mut g = Vec::new();
            for item in items {
                g.push(first_text(ctx, &gt_field, item)?.unwrap_or_default());
            }
            g
        }
        Some(g) => first_text(ctx, &gt_field, g)?.into_iter().collect(),
        None => return Err(ctx.err(&gt_field, "missing")),
    };
    out.extend(pair_probes(ctx, &prompt_field, kind, prompts, gts)?);
    Ok(())
}

fn pair_probes(
    ctx: &Ctx,
    field: &str,
    kind: &str,
    prompts: Vec<String>,
    gts: Vec<String>,
) -> Result<Vec<Probe>, DatasetError> {
    let mut out = Vec::new();
    for (j, p) in prompts.iter().enumerate() {
        let prompt = clean_prompt(p);
        if prompt.is_empty() {
            return Err(ctx.err(field, "empty prompt"));
        }
        let gt = if gts.len() == prompts.len() {
            gts[j].clone()
        } else {
            gts.first().cloned().unwrap_or_default()
        };
        let gt = gt.trim().to_string();
        if gt.is_empty() {
            // A probe without an answer cannot be scored: reject rather than silently skip.
            return Err(ctx.err(field, format!("probe {j} has an empty ground_truth")));
        }
        out.push(Probe {
            kind: kind.to_string(),
            prompt,
            ground_truth: gt,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subject_aliases_are_read_checked_and_written_back() {
        let one = |aliases: &str| {
            parse_knowedit(&format!(
                r#"[{{"subject": "Frédéric Chopin", "prompt": "Frédéric Chopin plays the",
                     "target_new": "guitar", "subject_aliases": {aliases}}}]"#
            ))
        };
        assert_eq!(one(r#""Chopin""#).unwrap()[0].subject_aliases, ["Chopin"]);
        let r = &one(r#"[" Chopin ", "Fryderyk Chopin"]"#).unwrap()[0];
        assert_eq!(r.subject_aliases, ["Chopin", "Fryderyk Chopin"]);
        // Written back and read again, the same record.
        let again = parse_knowedit(&to_knowedit(std::slice::from_ref(r)).to_string()).unwrap();
        assert_eq!(again[0].subject_aliases, r.subject_aliases);
        // Without aliases nothing is serialized for them (checkpoint digests stay as before).
        let plain = parse_knowedit(
            r#"[{"subject": "Chopin", "prompt": "Chopin plays the", "target_new": "guitar"}]"#,
        )
        .unwrap();
        assert!(!serde_json::to_string(&plain[0])
            .unwrap()
            .contains("subject_aliases"));
        let many: Vec<String> = (0..=MAX_SUBJECT_ALIASES)
            .map(|i| format!("\"a{i}\""))
            .collect();
        for (aliases, why) in [
            (r#"[""]"#.to_string(), "an empty alias"),
            (r#"["  "]"#.to_string(), "an empty alias"),
            (r#"["frédéric chopin"]"#.to_string(), "the subject itself"),
            (r#"["Chopin", "chopin"]"#.to_string(), "given twice"),
            (r#"["Cho\u0007pin"]"#.to_string(), "control or invisible"),
            (r#"{"x": "y"}"#.to_string(), "expected a string"),
            (format!("[{}]", many.join(",")), "at most 16"),
        ] {
            let e = one(&aliases).unwrap_err().to_string();
            assert!(
                e.contains("subject_aliases") && e.contains(why),
                "{aliases}: {e}"
            );
        }
        let e = parse_knowedit(
            r#"[{"prompt": "Chopin plays the", "target_new": "guitar", "subject_aliases": ["C"]}]"#,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("without a `subject`"), "{e}");
        // A prompt that fits a bundle string, and an alias longer than the subject that would
        // make its routing row's prompt not fit: refused here, not when the bundle is written.
        let long = |alias_len: usize| {
            let pad = "x".repeat(MAX_FIELD_LEN - " Chopin plays the".len());
            parse_knowedit(&format!(
                r#"[{{"subject": "Chopin", "prompt": "{pad} Chopin plays the",
                     "target_new": "guitar", "subject_aliases": ["{}"]}}]"#,
                "C".repeat(alias_len)
            ))
        };
        assert_eq!(long(6).unwrap()[0].prompt.len(), MAX_FIELD_LEN);
        let e = long(7).unwrap_err().to_string();
        assert!(
            e.contains("subject_aliases") && e.contains(&format!("{} bytes", MAX_FIELD_LEN + 1)),
            "{e}"
        );
    }

    #[test]
    fn subject_span_ignores_ascii_case_and_takes_the_last_occurrence() {
        let span = |prompt: &str, subject: Option<&str>| {
            EditRecord {
                prompt: prompt.into(),
                subject: subject.map(Into::into),
                ..Default::default()
            }
            .subject_span()
        };
        assert_eq!(
            span("The Mona Lisa was painted by", Some("the mona lisa")),
            Some(0..13)
        );
        // The last occurrence: ROME keys on the subject's last token.
        assert_eq!(span("Paris? Paris is in", Some("paris")), Some(7..12));
        // Non-ASCII text keeps its byte offsets (only ASCII letters fold).
        assert_eq!(span("Über Zürich liegt", Some("zürich")), Some(6..13));
        assert_eq!(span("abc", Some("x")), None);
        assert_eq!(span("abc", Some("")), None);
        assert_eq!(span("abc", None), None);
    }

    const ZSRE: &str = r#"[{
        "subject": "Watts Humphrey",
        "target_new": "University of Michigan",
        "prompt": "What university did Watts Humphrey attend?",
        "ground_truth": ["Illinois Institute of Technology"],
        "rephrase_prompt": "What university did Watts Humphrey take part in?",
        "cond": "Illinois Institute of Technology >> University of Michigan || What university did Watts Humphrey attend?",
        "locality": {"Relation_Specificity": [
            {"prompt": "The name of the father of Watts Humphrey is", "ground_truth": ["Sun Tzu"]}
        ]},
        "portability": {"Reasoning": [
            {"prompt": "The university's mascot is", "ground_truth": [["Wolverine", "Wolverines"]]}
        ], "Subject_Aliasing": [], "Logical_Generalization": []}
    }]"#;

    const COUNTERFACT: &str = r#"[{
        "subject": "Kuala Langat",
        "prompt": "The name of the country which Kuala Langat is associated with is",
        "target_new": "India",
        "ground_truth": "Malaysia",
        "rephrase": ["Kuala Langat belongs to the country of"],
        "portability": {
            "Subject_Aliasing": [{"prompt": "The country of Kuala Langat district is", "ground_truth": "India"}],
            "Logical_Generalization": [{"prompt": ["Is Kuala Langat in Asia?", "Is it in India?"], "ground_truth": [["yes"], ["yes"]]}]
        },
        "locality": {
            "Relation_Specificity": [{"prompt": "The official language of Kuala Langat is", "ground_truth": ["Malay", "Bahasa"]}],
            "Forgetfulness": [{"prompt": ["The capital of Malaysia is"], "ground_truth": "Kuala Lumpur"}]
        }
    }]"#;

    const RECENT: &str = r#"[{
        "subject": "Leo Arons",
        "prompt": "The place of death of Leo Arons is",
        "target_new": "Berlin",
        "portability": {"Logical_Generalization": [{"prompt": "Is Leo Arons still alive?", "ground_truth": [["no"], ["incorrect"]]}]},
        "locality": {"Relation_Specificity": [{"prompt": "The occupation of Leo Arons is", "ground_truth": [["physicist"]]}]}
    }]"#;

    #[test]
    fn zsre_shape() {
        let r = parse_knowedit(ZSRE).unwrap();
        assert_eq!(r.len(), 1);
        let r = &r[0];
        assert_eq!(r.id, "0");
        assert_eq!(r.subject.as_deref(), Some("Watts Humphrey"));
        assert_eq!(r.target_new, "University of Michigan");
        assert_eq!(
            r.ground_truth.as_deref(),
            Some("Illinois Institute of Technology")
        );
        assert_eq!(
            r.rephrase_prompts,
            vec!["What university did Watts Humphrey take part in?"]
        );
        assert_eq!(r.locality.len(), 1);
        assert_eq!(r.locality[0].kind, "Relation_Specificity");
        assert_eq!(r.locality[0].ground_truth, "Sun Tzu");
        assert_eq!(r.portability.len(), 1);
        assert_eq!(r.portability[0].kind, "Reasoning");
        assert_eq!(r.portability[0].ground_truth, "Wolverine");
        assert_eq!(r.continuation(), " University of Michigan");
        let span = r.subject_span().unwrap();
        assert_eq!(&r.prompt[span], "Watts Humphrey");
    }

    #[test]
    fn counterfact_shape_lists_and_pairs() {
        let r = &parse_knowedit(COUNTERFACT).unwrap()[0];
        assert_eq!(r.ground_truth.as_deref(), Some("Malaysia"));
        assert_eq!(
            r.rephrase_prompts,
            vec!["Kuala Langat belongs to the country of"]
        );
        let kinds: Vec<_> = r
            .locality
            .iter()
            .map(|p| (p.kind.as_str(), p.ground_truth.as_str()))
            .collect();
        assert!(kinds.contains(&("Relation_Specificity", "Malay")));
        assert!(kinds.contains(&("Forgetfulness", "Kuala Lumpur")));
        // Two prompts with two ground truths: paired element-wise.
        let lg: Vec<_> = r
            .portability
            .iter()
            .filter(|p| p.kind == "Logical_Generalization")
            .collect();
        assert_eq!(lg.len(), 2);
        assert_eq!(lg[1].prompt, "Is it in India?");
        assert_eq!(lg[1].ground_truth, "yes");
    }

    #[test]
    fn recent_shape_nested_ground_truth() {
        let r = &parse_knowedit(RECENT).unwrap()[0];
        assert_eq!(r.ground_truth, None);
        assert!(r.rephrase_prompts.is_empty());
        assert_eq!(r.locality[0].ground_truth, "physicist");
        assert_eq!(r.portability[0].ground_truth, "no");
    }

    #[test]
    fn easyedit_locality_inputs_and_wikibio() {
        let t = r#"[{"text": "Tom Jones was a", "labels": "footballer", "concept": "Tom Jones",
            "locality": {"neighborhood": {"prompt": ["A", "B"], "ground_truth": ["a", "b"]}}}]"#;
        let r = &parse_knowedit(t).unwrap()[0];
        assert_eq!(r.prompt, "Tom Jones was a");
        assert_eq!(r.target_new, "footballer");
        assert_eq!(r.subject.as_deref(), Some("Tom Jones"));
        assert_eq!(r.locality.len(), 2);
        assert_eq!(
            (
                r.locality[1].prompt.as_str(),
                r.locality[1].ground_truth.as_str()
            ),
            ("B", "b")
        );
    }

    #[test]
    fn jsonl_plain() {
        let t = "{\"prompt\": \"The capital of France is \", \"target\": \" Berlin\"}\n\n{\"id\": 7, \"prompt\": \"Q:\\n\", \"target\": \"x\"}\n";
        let r = parse_jsonl(t).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].prompt, "The capital of France is");
        assert_eq!(r[0].target_new, "Berlin");
        assert_eq!(r[0].continuation(), " Berlin");
        assert_eq!(r[1].id, "7");
        // After a newline the target follows directly.
        assert_eq!(r[1].continuation(), "x");
    }

    /// A record's own id (string or number, under any of its names) is marked as given; a
    /// missing, null or non-scalar one falls back to the index, marked so. The mark is not
    /// serialized (checkpoint digests hash records as JSON).
    #[test]
    fn ids_from_the_file_are_told_from_index_ids() {
        let t = concat!(
            "{\"id\": \"a\", \"prompt\": \"p0\", \"target\": \"t\"}\n",
            "{\"prompt\": \"p1\", \"target\": \"t\"}\n",
            "{\"case_id\": 7, \"prompt\": \"p2\", \"target\": \"t\"}\n",
            "{\"record_id\": \"r\", \"prompt\": \"p3\", \"target\": \"t\"}\n",
            "{\"id\": null, \"prompt\": \"p4\", \"target\": \"t\"}\n",
        );
        let r = parse_jsonl(t).unwrap();
        let got: Vec<(&str, bool)> = r.iter().map(|r| (r.id.as_str(), r.id_from_index)).collect();
        assert_eq!(
            got,
            [
                ("a", false),
                ("1", true),
                ("7", false),
                ("r", false),
                ("4", true),
            ]
        );
        // An id that is no id is refused, naming it (it was numbered by its index, hiding it).
        for bad in ["true", "[1]", "{\"a\": 1}"] {
            let e = parse_jsonl(&format!(
                "{{\"id\": {bad}, \"prompt\": \"p\", \"target\": \"t\"}}\n"
            ))
            .unwrap_err()
            .to_string();
            assert!(
                e.contains("field `id`") && e.contains("is not an id"),
                "{e}"
            );
        }
        let json = serde_json::to_string(&r[1]).unwrap();
        assert!(!json.contains("id_from_index"), "{json}");
        let k = parse_knowedit(
            r#"[{"prompt": "p", "target_new": "t"}, {"id": 3, "prompt": "q", "target_new": "t"}]"#,
        )
        .unwrap();
        assert!(k[0].id_from_index && !k[1].id_from_index);
    }

    #[test]
    fn errors_name_record_and_field() {
        let t = r#"[{"prompt": "a", "target_new": "b"}, {"prompt": "c", "target_new": "  "}]"#;
        let e = parse_knowedit(t).unwrap_err().to_string();
        assert_eq!(e, "record 1: field `target_new`: empty");

        let t = r#"[{"prompt": "a"}]"#;
        assert_eq!(
            parse_knowedit(t).unwrap_err().to_string(),
            "record 0: field `target_new`: missing (also read as `target`, `labels`, `alt`)"
        );

        for id in [r"a\u001b[8m", r"pa\u200bris", r"x\u202e", r"a\u2028b"] {
            let t = format!(r#"[{{"id": "{id}", "prompt": "a", "target_new": "b"}}]"#);
            let e = parse_knowedit(&t).unwrap_err().to_string();
            assert!(
                e.contains("field `id`") && e.contains("control or invisible character"),
                "{e}"
            );
        }

        let t = r#"[{"prompt": 5, "target_new": "b"}]"#;
        assert!(parse_knowedit(t)
            .unwrap_err()
            .to_string()
            .starts_with("record 0: field `prompt`"));

        let t = r#"[{"prompt": "a", "target_new": "b", "locality": {"Relation_Specificity": [{"prompt": "p"}]}}]"#;
        assert_eq!(
            parse_knowedit(t).unwrap_err().to_string(),
            "record 0: field `locality.Relation_Specificity[0].ground_truth`: missing"
        );

        let t = "{\"prompt\": \"a\", \"target\": \"b\"}\n{not json}\n";
        assert!(parse_jsonl(t)
            .unwrap_err()
            .to_string()
            .starts_with("line 2: invalid JSON"));

        assert!(matches!(parse_knowedit("[]"), Err(DatasetError::NoRecords)));
        assert!(matches!(
            parse_knowedit("3"),
            Err(DatasetError::NotAnArray { .. })
        ));
        assert!(matches!(
            parse_knowedit("[1]"),
            Err(DatasetError::Record { index: 0, .. })
        ));
        assert!(parse_knowedit("[{").is_err());
    }

    /// The repository's development edit set parses and is complete enough to evaluate every metric.
    #[test]
    fn dev_edit_set_is_well_formed() {
        let records = parse_knowedit(include_str!("../../data/dev-edits.json")).unwrap();
        assert!(records.len() >= 30, "{} records", records.len());
        let mut ids = std::collections::HashSet::new();
        for r in &records {
            assert!(ids.insert(r.id.clone()), "duplicate id {}", r.id);
            assert!(
                r.subject_span().is_some(),
                "{}: subject not in prompt",
                r.id
            );
            assert!(r.ground_truth.is_some(), "{}", r.id);
            assert!(!r.rephrase_prompts.is_empty(), "{}", r.id);
            assert!(!r.locality.is_empty(), "{}", r.id);
            assert_ne!(
                r.ground_truth.as_deref(),
                Some(r.target_new.as_str()),
                "{}",
                r.id
            );
            // A locality probe must not be one of the edit prompts (it would measure the edit).
            for other in &records {
                for l in &r.locality {
                    assert_ne!(l.prompt, other.prompt, "{}", r.id);
                    assert!(!other.rephrase_prompts.contains(&l.prompt), "{}", r.id);
                }
            }
        }
        assert!(records.iter().filter(|r| !r.portability.is_empty()).count() >= 5);
    }

    /// Session 37 hostile-input findings, each misread or accepted by the old parser.
    #[test]
    fn byte_order_mark_is_skipped() {
        let r = parse_knowedit("\u{feff}[{\"prompt\": \"a\", \"target_new\": \"b\"}]").unwrap();
        assert_eq!(r[0].prompt, "a");
        let r = parse_jsonl("\u{feff}{\"prompt\": \"a\", \"target\": \"b\"}\r\n\r\n").unwrap();
        assert_eq!((r.len(), r[0].target_new.as_str()), (1, "b"));
        // Through `load`, a BOM before a multi-line array must not make it look like JSONL.
        let dir = std::env::temp_dir().join(format!("amend-dataset-bom-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("bom.json");
        std::fs::write(
            &f,
            "\u{feff}[\n{\"prompt\": \"a\",\n \"target_new\": \"b\"}\n]\n",
        )
        .unwrap();
        assert_eq!(load(&f, DataFormat::Auto).unwrap()[0].target_new, "b");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn duplicate_keys_are_refused() {
        let e = parse_knowedit(r#"[{"prompt": "a", "prompt": "b", "target_new": "c"}]"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("duplicate key `prompt`"), "{e}");
        let e = parse_jsonl("{\"prompt\": \"a\", \"target\": \"c\", \"target\": \"d\"}\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("line 1:") && e.contains("duplicate key `target`"),
            "{e}"
        );
    }

    #[test]
    fn subject_placeholders_are_filled_or_refused() {
        let t = r#"[{"prompt": "{} is a native speaker of", "subject": "Danielle Darrieux",
            "target_new": {"str": "English", "id": "Q1860"}, "rephrase_prompt": ["Where {} lives, people speak"]}]"#;
        let r = &parse_knowedit(t).unwrap()[0];
        assert_eq!(r.prompt, "Danielle Darrieux is a native speaker of");
        assert_eq!(
            r.rephrase_prompts,
            ["Where Danielle Darrieux lives, people speak"]
        );
        assert_eq!(r.target_new, "English");
        assert_eq!(&r.prompt[r.subject_span().unwrap()], "Danielle Darrieux");
        for (t, needles) in [
            (
                r#"[{"prompt": "{} is a native speaker of", "target_new": "x"}]"#,
                ["record 0: field `prompt`", "no `subject`"],
            ),
            (
                r#"[{"prompt": "{} and {} are", "subject": "s", "target_new": "x"}]"#,
                ["record 0: field `prompt`", "2 `{}` placeholders"],
            ),
            (
                r#"[{"prompt": "p", "rephrase": "{} is", "target_new": "x"}]"#,
                ["record 0: field `rephrase`", "no `subject`"],
            ),
        ] {
            let e = parse_knowedit(t).unwrap_err().to_string();
            assert!(needles.iter().all(|n| e.contains(n)), "{e}");
        }
    }

    #[test]
    fn ids_that_a_bundle_refuses_or_that_would_be_rewritten_are_refused_up_front() {
        let long = format!(
            r#"[{{"id": "{}", "prompt": "a", "target_new": "b"}}]"#,
            "x".repeat(20_000)
        );
        for (t, needles) in [
            (
                r#"[{"id": "", "prompt": "a", "target_new": "b"}]"#.to_string(),
                vec!["record 0: field `id`", "empty"],
            ),
            (
                r#"[{"case_id": "  ", "prompt": "a", "target_new": "b"}]"#.to_string(),
                vec!["field `case_id`", "empty"],
            ),
            (long, vec!["field `id`", "20000 bytes"]),
            (
                r#"[{"id": 12345678901234567890123, "prompt": "a", "target_new": "b"}]"#
                    .to_string(),
                vec!["field `id`", "not an integer"],
            ),
            (
                r#"[{"id": 1.5, "prompt": "a", "target_new": "b"}]"#.to_string(),
                vec!["field `id`", "not an integer"],
            ),
        ] {
            let e = parse_knowedit(&t).unwrap_err().to_string();
            assert!(needles.iter().all(|n| e.contains(n)), "{e}");
        }
    }

    #[test]
    fn oversized_fields_and_probe_lists_are_refused() {
        let t = format!(
            r#"[{{"prompt": "{}", "target_new": "b"}}]"#,
            "w ".repeat(10_000)
        );
        let e = parse_knowedit(&t).unwrap_err().to_string();
        assert!(
            e.contains("field `prompt`") && e.contains("20000 bytes"),
            "{e}"
        );
        let many: Vec<String> = (0..2000).map(|i| format!("q{i}")).collect();
        let t = serde_json::json!([{"prompt": "a", "target_new": "b", "rephrase_prompt": many}]);
        let e = parse_knowedit(&t.to_string()).unwrap_err().to_string();
        assert!(
            e.contains("field `rephrase_prompt`") && e.contains("2000"),
            "{e}"
        );
        let probes: Vec<_> = (0..2000)
            .map(|i| serde_json::json!({"prompt": format!("q{i}"), "ground_truth": "g"}))
            .collect();
        let t = serde_json::json!([{"prompt": "a", "target_new": "b", "locality": {"K": probes}}]);
        let e = parse_knowedit(&t.to_string()).unwrap_err().to_string();
        assert!(
            e.contains("field `locality.K`") && e.contains("2000"),
            "{e}"
        );
    }

    #[test]
    fn jsonl_record_errors_name_the_line_and_no_empty_field() {
        for (line, what) in [("null", "null"), ("[]", "an array"), ("5", "a number")] {
            let t = format!("{{\"prompt\": \"a\", \"target\": \"b\"}}\n\n{line}\n");
            let e = parse_jsonl(&t).unwrap_err().to_string();
            assert_eq!(
                e,
                format!("line 3: record 1: expected an object, found {what}")
            );
        }
    }

    #[test]
    fn numbers_and_mend_locality_are_read_exactly_or_refused() {
        // A year as the target, as a ground truth already could be.
        let r =
            &parse_knowedit(r#"[{"prompt": "He was born in", "target_new": 1984}]"#).unwrap()[0];
        assert_eq!(r.target_new, "1984");
        let e = parse_knowedit(r#"[{"prompt": "p", "target_new": "b", "ground_truth": 1.50}]"#)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("field `ground_truth`") && e.contains("not an integer"),
            "{e}"
        );
        let e =
            parse_knowedit(r#"[{"prompt": "p", "target_new": "b", "loc": "nq question: who"}]"#)
                .unwrap_err()
                .to_string();
        assert_eq!(
            e,
            "record 0: field `loc_ans`: missing (`loc` needs its answer)"
        );
        let e = parse_knowedit(r#"[{"case_id": 0, "requested_rewrite": {"prompt": "{} is"}}]"#)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("field `prompt`") && e.contains("requested_rewrite"),
            "{e}"
        );
    }

    #[test]
    fn load_auto_detects() {
        let dir = std::env::temp_dir().join(format!("amend-dataset-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let a = dir.join("a.json");
        std::fs::write(&a, ZSRE).unwrap();
        assert_eq!(load(&a, DataFormat::Auto).unwrap().len(), 1);
        let b = dir.join("b.txt");
        std::fs::write(
            &b,
            "{\"prompt\":\"x\",\"target\":\"y\"}\n{\"prompt\":\"z\",\"target\":\"w\"}\n",
        )
        .unwrap();
        assert_eq!(load(&b, DataFormat::Auto).unwrap().len(), 2);
        // One `{` document, parsed once to tell it from JSONL: that value is what is read.
        std::fs::write(&b, "{\n\"prompt\": \"a\",\n \"target_new\": \"b\"}\n").unwrap();
        let r = load(&b, DataFormat::Auto).unwrap();
        assert_eq!((r.len(), r[0].target_new.as_str()), (1, "b"));
        // A key given twice: not one document, so JSONL, whose first line is refused.
        std::fs::write(&b, "{\"prompt\": \"a\",\n\"prompt\": \"b\"}\n").unwrap();
        let e = load(&b, DataFormat::Auto).unwrap_err();
        assert!(matches!(e, DatasetError::JsonLine { line: 1, .. }), "{e}");
        let missing = dir.join("missing.json");
        assert!(matches!(
            load(&missing, DataFormat::Auto),
            Err(DatasetError::Io { .. })
        ));
        assert_eq!("jsonl".parse::<DataFormat>().unwrap(), DataFormat::Jsonl);
        assert!("xml".parse::<DataFormat>().is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
