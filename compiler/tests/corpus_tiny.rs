//! The covariance corpus on the tiny model: WordNet parsing, the token budget, the second
//! moment's properties, the cache (reused when intact, recomputed when tampered with) and the
//! errors for a missing or unusable corpus. One test: it sets `AMEND_CACHE` for the process.

mod common;

use amend_compiler::methods::corpus::{second_moments, Corpus, NullSpace};
use amend_compiler::Compiler;
use amend_runtime::Architecture;

const NOUNS: &str = "  1 This software and database is being provided to you, the LICENSEE
00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 | that which is perceived or known or inferred to have its own distinct existence (living or nonliving)
00002137 03 n 02 abstraction 0 abstract_entity 0 010 | a general concept formed by extracting common features from specific examples
09044862 15 n 02 capital_city 0 capital 0 | a seat of government; \"the capital of France is Paris\"
";

#[test]
fn corpus_moments_are_cached_verified_and_refused_when_missing() {
    let cache = common::tmp_dir().join("corpus-cache");
    std::fs::create_dir_all(&cache).unwrap();
    std::env::set_var("AMEND_CACHE", &cache);

    // Missing WordNet: a clear error naming the fetch script.
    let err = Corpus::open("wordnet").err().expect("no wordnet yet");
    assert!(err.to_string().contains("fetch-corpus.sh"), "{err}");
    // A FIFO is refused, not read forever.
    #[cfg(unix)]
    {
        let fifo = cache.join("fifo");
        let _ = std::fs::remove_file(&fifo);
        let ok = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .map(|s| s.success());
        if ok.unwrap_or(false) {
            let err = Corpus::open(fifo.to_str().unwrap()).err().unwrap();
            assert!(err.to_string().contains("not a regular file"), "{err}");
        }
    }
    let empty = cache.join("empty.txt");
    std::fs::write(&empty, "\n\n").unwrap();
    assert!(Corpus::open(empty.to_str().unwrap())
        .err()
        .unwrap()
        .to_string()
        .contains("no text"));

    // A WordNet directory: the licence header is skipped, lemmas lead their glosses.
    let wn = cache.join("wordnet-3.0");
    std::fs::create_dir_all(&wn).unwrap();
    std::fs::write(wn.join("data.noun"), NOUNS).unwrap();
    for pos in ["verb", "adj", "adv"] {
        std::fs::write(
            wn.join(format!("data.{pos}")),
            "00000001 00 v 01 go 0 | move; \"he goes to school\"\n",
        )
        .unwrap();
    }
    let corpus = Corpus::open("wordnet").unwrap();
    assert_eq!(corpus.passages.len(), 6);
    assert!(corpus
        .passages
        .iter()
        .any(|p| p == "capital city: a seat of government; \"the capital of France is Paris\""));
    assert!(!corpus.passages.iter().any(|p| p.contains("LICENSEE")));
    // The order is fixed.
    assert_eq!(Corpus::open("wordnet").unwrap().passages, corpus.passages);

    // Moments of two layers in one pass, within the token budget.
    let c = Compiler::open(&common::tiny_path(Architecture::Llama)).unwrap();
    let n = c.fwd.cfg.n_ff;
    let ms = second_moments(&c, "neutral", 300, &[0, 1]).unwrap();
    assert_eq!(ms.len(), 2);
    for m in &ms {
        assert_eq!((m.n, m.rows), (n, 300), "the budget caps the rows");
        for i in 0..n {
            assert!(m.mean[i * n + i] >= 0.0);
            for j in 0..n {
                assert!((m.mean[i * n + j] - m.mean[j * n + i]).abs() < 1e-6);
            }
        }
    }
    assert_ne!(ms[0].mean, ms[1].mean);
    // The null space of a 300-row moment in n_ff dimensions: the eigenvalues below 1% of the
    // mean; projected vectors are orthogonal to every kept direction (P is idempotent).
    let ns = NullSpace::of(&ms[1], 0.01).unwrap();
    assert!(ns.dim > 0 && ns.dim < n, "null space {} of {n}", ns.dim);
    let x: Vec<f64> = (0..n).map(|i| (i as f64 * 0.37).sin()).collect();
    let px = ns.project(&x);
    let ppx = ns.project(&px);
    assert!(px.iter().zip(&ppx).all(|(a, b)| (a - b).abs() < 1e-5));

    // The cache: one file per layer; a second call reads it (same numbers).
    let stats = cache.join("stats");
    let files: Vec<_> = std::fs::read_dir(&stats)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "mom2"))
        .collect();
    assert_eq!(files.len(), 2, "{files:?}");
    let again = second_moments(&c, "neutral", 300, &[1]).unwrap();
    assert_eq!(again[0].mean, ms[1].mean);
    // A tampered entry (one bit of the body) fails its digest: recomputed, not used.
    let f1 = files
        .iter()
        .find(|p| p.to_str().unwrap().ends_with("-L1.mom2"))
        .unwrap();
    let mut bytes = std::fs::read(f1).unwrap();
    bytes[100] ^= 1;
    std::fs::write(f1, &bytes).unwrap();
    let fixed = second_moments(&c, "neutral", 300, &[1]).unwrap();
    assert_eq!(fixed[0].mean, ms[1].mean);
    assert_ne!(std::fs::read(f1).unwrap(), bytes, "the entry was rewritten");
    // Another budget is another entry.
    let small = second_moments(&c, "neutral", 50, &[1]).unwrap();
    assert_eq!(small[0].rows, 50);
    assert_ne!(small[0].mean, ms[1].mean);
}
