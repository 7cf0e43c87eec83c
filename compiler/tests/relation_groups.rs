//! Relation groups: the built-in lexicon parses and malformed lexicons are refused by what is
//! wrong; with the scope model (skipped without it unless AMEND_REQUIRE_MODEL=1), a rephrase
//! worded another way falls in its record's group and the subject's other facts do not, and a
//! compiled memory routes by group through the bundle.

mod common;

use amend_compiler::methods::relation_groups::{record_groups, Lexicon, BUILTIN, MAX_LEXICON_LEN};
use amend_edits::families::{strip_subject, RelationGroups};

#[test]
fn lexicons_parse_and_malformed_ones_are_refused() {
    let lex = Lexicon::parse(BUILTIN).unwrap();
    assert!(lex.names.len() >= 40, "{} groups", lex.names.len());
    assert_eq!(lex.templates.len(), lex.template_group.len());
    assert!(lex.names.iter().any(|n| n == "currency"));
    let ok = Lexicon::parse("# comment\n\na|The {} is|Is {}?\nb|{} was born in\n").unwrap();
    assert_eq!(ok.names, ["a", "b"]);
    assert_eq!(ok.template_group, [0, 0, 1]);
    for (text, why) in [
        ("", "no groups"),
        ("a|The capital is\n", "holds {} exactly once"),
        ("a|{} and {}\n", "holds {} exactly once"),
        ("a|{} is\na|{} was\n", "unique name"),
        ("|{} is\n", "unique name"),
        ("a\n", "at least one template"),
    ] {
        let err = Lexicon::parse(text).unwrap_err().to_string();
        assert!(err.contains(why), "{text:?}: {err}");
    }
    assert!(Lexicon::load("none").unwrap().is_none());
    assert!(Lexicon::load("builtin").unwrap().is_some());
    // The shipped alternative lexicon loads as a file and keeps every built-in group.
    let wikidata = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../data/relation-groups-wikidata.txt"
    );
    let wide = Lexicon::load(wikidata).unwrap().unwrap();
    assert!(wide.names.len() > lex.names.len() && lex.names.iter().all(|n| wide.names.contains(n)));
    // ... and built in under its name, the same lexicon (no data/ needed where it runs).
    let built_in = Lexicon::load("wikidata").unwrap().unwrap();
    assert_eq!(built_in.names, wide.names);
    assert!(Lexicon::load("/nonexistent/lexicon.txt").is_err());
    // Hostile paths: a directory, a FIFO (refused, never waited on), a file over the cap.
    let dir = std::env::temp_dir().join(format!("amend-lexicon-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let fifo = dir.join("fifo");
    let _ = std::fs::remove_file(&fifo);
    let made = std::process::Command::new("mkfifo").arg(&fifo).status();
    let huge = dir.join("huge.txt");
    let f = std::fs::File::create(&huge).unwrap();
    f.set_len(MAX_LEXICON_LEN + 1).unwrap();
    let mut paths = vec![dir.clone(), huge];
    if made.is_ok_and(|s| s.success()) {
        paths.push(fifo);
    }
    for p in paths {
        let err = Lexicon::load(p.to_str().unwrap()).unwrap_err().to_string();
        assert!(
            err.contains("serac.relation_groups"),
            "{}: {err}",
            p.display()
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(
        strip_subject("When was the PlayStation released?", "PlayStation").as_deref(),
        Some("When was it released?")
    );
    assert_eq!(strip_subject("The capital of France is", "Italy"), None);
}

#[test]
fn rephrases_share_their_records_group_and_other_facts_do_not() {
    let Some(scope) = common::scope_model() else {
        return;
    };
    let lex = Lexicon::parse(BUILTIN).unwrap();
    let templates = lex.encode(&scope).unwrap();
    let records = [
        ("The currency of Thailand is the", "Thailand"),
        ("Where was Mahatma Gandhi born?", "Mahatma Gandhi"),
    ];
    let desc = record_groups(&scope, &lex, &templates, 0.6, &records).unwrap();
    let names: Vec<&str> = desc.names.iter().map(String::as_str).collect();
    let groups = RelationGroups::new(
        scope.n_embd(),
        &templates,
        &desc.template_group,
        names,
        &desc.record_group,
        0.6,
    )
    .unwrap();
    let g = |i: usize| groups.name(groups.record_group(i).expect("grouped"));
    assert_eq!((g(0), g(1)), ("currency", "birthplace"));
    let query = |text: &str, subject: &str| {
        let p = scope.stripped_pooled(text, subject).unwrap();
        groups.classify(&p).map(|(q, _)| groups.name(q))
    };
    // Worded apart from the record, the same relation.
    assert_eq!(
        query("In Thailand, people pay with the", "Thailand"),
        Some("currency")
    );
    assert_eq!(
        query("In which city was Mahatma Gandhi born?", "Mahatma Gandhi"),
        Some("birthplace")
    );
    // The same subjects, other relations.
    assert_ne!(
        query("The official language of Thailand is", "Thailand"),
        Some("currency")
    );
    assert_ne!(
        query(
            "Which country is Mahatma Gandhi a citizen of?",
            "Mahatma Gandhi"
        ),
        Some("birthplace")
    );
    // A subject the query does not name gives no stripped query (the head decides).
    assert!(scope
        .stripped_pooled("The currency of Japan is the", "Thailand")
        .is_none());
}
