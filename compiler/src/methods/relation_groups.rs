//! Relation groups for scope-model memories (format 1.4; docs/methods.md). A lexicon names
//! relations and lists, per relation, templates in statement and question form (`{}` = the
//! subject): `data/relation-groups.txt`, one group a line, `name|template|template...`. Each
//! template is encoded by the scope model with its subject replaced by "it"; a record's group is
//! its prompt's nearest template's (its subject replaced likewise) when the cosine reaches
//! `serac.relation_min_score`. The runtime classifies the query against the same templates, so a
//! rephrase ("In Thailand, people pay with the") meets its record ("The currency of Thailand is
//! the") while the subject's other facts ("The official language of Thailand is") do not.

use amend_edits::bundle::{
    RelationGroupsDesc, MAX_RELATION_GROUPS, MAX_RELATION_TEMPLATES, MAX_STRING_LEN,
};
use amend_edits::families::{strip_subject, RelationGroups};
use amend_runtime::ScopeModel;

use crate::error::{CompileError, Result};

/// The built-in lexicon (chosen on data/memory-dev.json; docs/eval.md).
pub const BUILTIN: &str = include_str!("../../../data/relation-groups.txt");
/// The broad lexicon from Wikidata's most used properties (`"wikidata"`), built in so that an
/// installed binary does not look for data/ in the working directory.
pub const WIKIDATA: &str = include_str!("../../../data/relation-groups-wikidata.txt");

/// Largest lexicon file read (bytes): 4,096 templates of a few hundred bytes fit well within.
pub const MAX_LEXICON_LEN: u64 = 4 << 20;

/// A parsed lexicon: group names and templates, each template's group.
#[derive(Clone, Debug, PartialEq)]
pub struct Lexicon {
    pub names: Vec<String>,
    pub templates: Vec<String>,
    pub template_group: Vec<u16>,
}

impl Lexicon {
    /// Parses `name|template|...` lines (blank lines and `#` comments skipped). Every template
    /// holds `{}` once and appears once in the lexicon; names are unique and printable; the
    /// counts stay within the format's caps, checked as lines are read (a 3 MB file of one-line
    /// groups took 54 s before the count was refused).
    pub fn parse(text: &str) -> Result<Lexicon> {
        let bad = |line: usize, why: &str| {
            CompileError::Hparams(format!("relation groups, line {}: {why}", line + 1))
        };
        let mut lex = Lexicon {
            names: Vec::new(),
            templates: Vec::new(),
            template_group: Vec::new(),
        };
        let mut names = std::collections::HashSet::new();
        // Each template with the line it is on: one template in two groups cannot classify.
        let mut seen = std::collections::HashMap::new();
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        for (ln, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut parts = line.split('|');
            let name = parts.next().unwrap_or("").trim();
            if name.is_empty() || !names.insert(name) {
                return Err(bad(ln, &format!("a group needs a unique name ({name:?})")));
            }
            if amend_edits::bundle::stream::has_control(name) || name.len() > MAX_STRING_LEN {
                return Err(bad(
                    ln,
                    &format!(
                        "group name {name:?}: at most {MAX_STRING_LEN} bytes, no control or \
                         invisible characters"
                    ),
                ));
            }
            if lex.names.len() == MAX_RELATION_GROUPS {
                return Err(bad(
                    ln,
                    &format!("more than {MAX_RELATION_GROUPS} groups (the format's cap)"),
                ));
            }
            let g = lex.names.len() as u16;
            let before = lex.templates.len();
            for t in parts {
                let t = t.trim();
                if t.matches("{}").count() != 1 {
                    return Err(bad(
                        ln,
                        &format!("template {t:?}: each template holds {{}} exactly once"),
                    ));
                }
                if let Some(first) = seen.insert(t, ln) {
                    return Err(bad(
                        ln,
                        &format!("template {t:?} is also on line {}; give it once", first + 1),
                    ));
                }
                if lex.templates.len() == MAX_RELATION_TEMPLATES {
                    return Err(bad(
                        ln,
                        &format!("more than {MAX_RELATION_TEMPLATES} templates (the format's cap)"),
                    ));
                }
                lex.templates.push(t.to_string());
                lex.template_group.push(g);
            }
            if lex.templates.len() == before {
                return Err(bad(
                    ln,
                    &format!("group {name:?} needs at least one template"),
                ));
            }
            lex.names.push(name.to_string());
        }
        if lex.names.is_empty() {
            return Err(bad(0, "no groups"));
        }
        Ok(lex)
    }

    /// `serac.relation_groups`: "builtin", "wikidata" (both built in), "none" (no groups) or a
    /// lexicon file.
    pub fn load(spec: &str) -> Result<Option<Lexicon>> {
        match spec {
            "none" => Ok(None),
            "builtin" => Lexicon::parse(BUILTIN).map(Some),
            "wikidata" => Lexicon::parse(WIKIDATA).map(Some),
            path => {
                // A regular file within the cap (a FIFO, a device or a directory is refused,
                // never waited on).
                let text = amend_edits::fsutil::read_regular_string(
                    std::path::Path::new(path),
                    MAX_LEXICON_LEN,
                )
                .map_err(|e| CompileError::Hparams(format!("serac.relation_groups {path}: {e}")))?;
                Lexicon::parse(&text).map(Some)
            }
        }
    }

    /// The templates' unit rows `[n_templates, n_embd]`, each encoded with "it" for `{}`.
    pub fn encode(&self, scope: &ScopeModel) -> Result<Vec<f32>> {
        let mut rows = Vec::with_capacity(self.templates.len() * scope.n_embd());
        for t in &self.templates {
            let e = scope
                .encode(&t.replace("{}", "it"))
                .map_err(|e| CompileError::Runtime(e.to_string()))?;
            rows.extend_from_slice(&e.pooled);
        }
        Ok(rows)
    }

    /// The lexicon as the runtime classifies with it, over no records: `templates` from
    /// [`Lexicon::encode`] with `embed_dim` values a row.
    pub fn groups<'a>(
        &'a self,
        embed_dim: usize,
        templates: &'a [f32],
        min_score: f32,
    ) -> Result<RelationGroups<'a>> {
        RelationGroups::new(
            embed_dim,
            templates,
            &self.template_group,
            self.names.iter().map(String::as_str).collect(),
            &[],
            min_score,
        )
        .map_err(|e| CompileError::Hparams(format!("relation groups: {}", e.0)))
    }
}

/// The bundle's relation groups for records `(prompt, subject)`: each record's group by its
/// prompt, or none (`u16::MAX`) when no template reaches `min_score`. `templates` from
/// [`Lexicon::encode`].
pub fn record_groups(
    scope: &ScopeModel,
    lex: &Lexicon,
    templates: &[f32],
    min_score: f32,
    records: &[(&str, &str)],
) -> Result<RelationGroupsDesc> {
    let groups = lex.groups(scope.n_embd(), templates, min_score)?;
    let mut record_group = Vec::with_capacity(records.len());
    for (prompt, subject) in records {
        let g = match strip_subject(prompt, subject) {
            Some(text) => {
                let e = scope
                    .encode(&text)
                    .map_err(|e| CompileError::Runtime(e.to_string()))?;
                groups.classify(&e.pooled).map(|(g, _)| g)
            }
            None => None,
        };
        record_group.push(g.unwrap_or(RelationGroups::NONE));
    }
    Ok(RelationGroupsDesc {
        templates: 0,
        template_group: lex.template_group.clone(),
        names: lex.names.clone(),
        record_group,
        min_score,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_in_lexicons_parse() {
        assert!(Lexicon::parse(BUILTIN).unwrap().names.len() > 10);
        assert!(Lexicon::parse(WIKIDATA).unwrap().names.len() > 10);
    }

    fn refused(text: &str) -> String {
        Lexicon::parse(text).unwrap_err().to_string()
    }

    /// Session 37 hostile lexicons: each was accepted, misread or slow before.
    #[test]
    fn hostile_lexicons_are_refused_by_line_or_read_right() {
        // A byte order mark is not part of the first group's name.
        let lex = Lexicon::parse("\u{feff}capital|The capital of {} is\r\n").unwrap();
        assert_eq!(lex.names, ["capital"]);
        let e = refused("a|The capital of {} is\nb|x {}|The capital of {} is\n");
        assert!(e.contains("line 2") && e.contains("also on line 1"), "{e}");
        let e = refused("a|{} is|{} is\n");
        assert!(e.contains("line 1") && e.contains("\"{} is\""), "{e}");
        let e = refused("a|{} is|The capital of\n");
        assert!(
            e.contains("\"The capital of\"") && e.contains("exactly once"),
            "{e}"
        );
        let e = refused("a\u{1b}[2J|{} is\n");
        assert!(e.contains("line 1") && e.contains("control"), "{e}");
        let e = refused("a|{} is\nb\n");
        assert!(e.contains("line 2") && e.contains("\"b\""), "{e}");
    }

    #[test]
    fn a_huge_lexicon_is_refused_at_the_cap_quickly() {
        let text: String = (0..300_000).map(|i| format!("g{i}|{{}} x{i}\n")).collect();
        let t = std::time::Instant::now();
        let e = refused(&text);
        assert!(
            e.contains(&format!("line {}", MAX_RELATION_GROUPS + 1)),
            "{e}"
        );
        assert!(t.elapsed().as_secs() < 5, "{:?}", t.elapsed());
        let one: String = "g|".to_string()
            + &(0..5000)
                .map(|i| format!("{{}} x{i}"))
                .collect::<Vec<_>>()
                .join("|");
        assert!(refused(&one).contains("templates"));
    }
}
