//! The KnowEdit metrics as pure functions (no model): teacher-forced token accuracy, locality
//! agreement, n-gram-entropy fluency, and generation-based exact-match / contains-target.
//!
//! Definitions follow EasyEdit's `evaluate` code, read (not copied) from its sources:
//! - accuracy: mean over the answer positions of `argmax == target token`;
//! - locality: mean over the answer positions of `post-edit argmax == pre-edit argmax`;
//! - fluency: `mean_n(w_n * H_n)` over n = 2, 3 with weights 2/3, 4/3, i.e. `H2/3 + 2*H3/3`,
//!   entropies in bits of the n-gram frequency distribution of the word-tokenized text.
//!   KnowEdit tables print it x100 ([`FLUENCY_SCALE`]).

use thiserror::Error;

/// KnowEdit prints fluency (bits) multiplied by 100.
pub const FLUENCY_SCALE: f64 = 100.0;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum MetricError {
    #[error("length mismatch: {what} has {got} tokens, expected {expected}")]
    LengthMismatch {
        what: &'static str,
        got: usize,
        expected: usize,
    },
    #[error("no answer tokens to score")]
    Empty,
}

/// Teacher-forced token accuracy: the fraction of answer positions where the model's argmax
/// (given the true prefix) equals the target token. `predicted[i]` is the argmax at the position
/// that predicts `target[i]`.
pub fn token_accuracy<T: PartialEq>(predicted: &[T], target: &[T]) -> Result<f64, MetricError> {
    if target.is_empty() {
        return Err(MetricError::Empty);
    }
    if predicted.len() != target.len() {
        return Err(MetricError::LengthMismatch {
            what: "predicted",
            got: predicted.len(),
            expected: target.len(),
        });
    }
    let hits = predicted.iter().zip(target).filter(|(p, t)| p == t).count();
    Ok(hits as f64 / target.len() as f64)
}

/// Locality: the fraction of answer positions where the post-edit argmax equals the pre-edit
/// argmax (both teacher-forced on the same locality prompt + ground truth).
pub fn locality_agreement<T: PartialEq>(pre: &[T], post: &[T]) -> Result<f64, MetricError> {
    if pre.is_empty() {
        return Err(MetricError::Empty);
    }
    if post.len() != pre.len() {
        return Err(MetricError::LengthMismatch {
            what: "post-edit",
            got: post.len(),
            expected: pre.len(),
        });
    }
    let same = pre.iter().zip(post).filter(|(a, b)| a == b).count();
    Ok(same as f64 / pre.len() as f64)
}

/// Word tokenization close to NLTK's `word_tokenize` (which EasyEdit uses for fluency): runs of
/// letters/digits (with inner apostrophes, hyphens and dots between digits) are words; every
/// other non-space character is its own token.
pub fn word_tokenize(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let mut i = 0;
    while i < chars.len() {
        let (start, c) = chars[i];
        if c.is_whitespace() {
            i += 1;
            continue;
        }
        if c.is_alphanumeric() {
            let mut j = i + 1;
            while j < chars.len() {
                let cj = chars[j].1;
                let joins = matches!(cj, '\'' | '-' | '.' | ',')
                    && j + 1 < chars.len()
                    && chars[j + 1].1.is_alphanumeric()
                    // "3.5" and "1,000" stay one token; "end.Next" does not.
                    && (cj == '\'' || cj == '-' || (chars[j - 1].1.is_ascii_digit() && chars[j + 1].1.is_ascii_digit()));
                if cj.is_alphanumeric() || joins {
                    j += 1;
                } else {
                    break;
                }
            }
            let end = chars.get(j).map_or(text.len(), |(b, _)| *b);
            out.push(&text[start..end]);
            i = j;
        } else {
            let end = chars.get(i + 1).map_or(text.len(), |(b, _)| *b);
            out.push(&text[start..end]);
            i += 1;
        }
    }
    out
}

/// Shannon entropy (bits) of the n-gram frequency distribution of `tokens`; 0 when there are
/// fewer than `n` tokens.
pub fn ngram_entropy<T: Ord>(tokens: &[T], n: usize) -> f64 {
    if n == 0 || tokens.len() < n {
        return 0.0;
    }
    let mut grams: Vec<&[T]> = tokens.windows(n).collect();
    grams.sort_unstable();
    let total = grams.len() as f64;
    let mut h = 0.0;
    let mut i = 0;
    while i < grams.len() {
        let mut j = i + 1;
        while j < grams.len() && grams[j] == grams[i] {
            j += 1;
        }
        let p = (j - i) as f64 / total;
        h -= p * p.log2();
        i = j;
    }
    h
}

/// KnowEdit fluency of one text, in bits (not scaled): `(2/3 * H2 + 4/3 * H3) / 2`.
pub fn fluency(text: &str) -> f64 {
    let tokens = word_tokenize(text);
    let h2 = ngram_entropy(&tokens, 2);
    let h3 = ngram_entropy(&tokens, 3);
    (2.0 / 3.0 * h2 + 4.0 / 3.0 * h3) / 2.0
}

/// Lowercased words of `s` (alphanumeric runs), for generation matching.
fn norm_words(s: &str) -> Vec<String> {
    s.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(|w| w.to_lowercase())
        .collect()
}

/// Real-generation exact match: the generated continuation *begins* with the target, compared
/// word by word, case-insensitively, ignoring punctuation ("Berlin." and " berlin, the" match
/// "Berlin"; "Berlinale" does not). A base model never stops by itself, so "exact" means the
/// answer comes first, not that nothing follows.
pub fn exact_match(generated: &str, target: &str) -> bool {
    let t = norm_words(target);
    if t.is_empty() {
        return false;
    }
    let g = norm_words(generated);
    g.len() >= t.len() && g[..t.len()] == t[..]
}

/// The first sentence of a generation: up to the first newline or sentence-ending punctuation
/// followed by whitespace (or the end).
pub fn first_sentence(generated: &str) -> &str {
    let text = generated.trim_start();
    let bytes: Vec<(usize, char)> = text.char_indices().collect();
    for (k, &(i, c)) in bytes.iter().enumerate() {
        if c == '\n' {
            return &text[..i];
        }
        if matches!(c, '.' | '!' | '?') {
            let next = bytes.get(k + 1).map(|&(_, n)| n);
            if next.is_none_or(char::is_whitespace) {
                return &text[..i + c.len_utf8()];
            }
        }
    }
    text
}

/// Real-generation contains-target: the target's words occur contiguously (word-aligned,
/// case-insensitive) in the first sentence of the generation. Restricting to the first sentence
/// keeps a model that rambles through many candidates from scoring.
pub fn contains_target(generated: &str, target: &str) -> bool {
    let t = norm_words(target);
    if t.is_empty() {
        return false;
    }
    let g = norm_words(first_sentence(generated));
    g.windows(t.len()).any(|w| w == &t[..])
}

/// Mean of the present values, `None` when there are none (e.g. no record has portability).
pub fn mean(values: impl IntoIterator<Item = f64>) -> Option<f64> {
    let (sum, n) = values
        .into_iter()
        .fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    (n > 0).then(|| sum / n as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn accuracy_counts_matching_positions() {
        assert_eq!(token_accuracy(&[5, 6, 7, 8], &[5, 6, 0, 8]).unwrap(), 0.75);
        assert_eq!(token_accuracy(&[1], &[1]).unwrap(), 1.0);
        assert_eq!(token_accuracy(&[1], &[2]).unwrap(), 0.0);
        assert_eq!(token_accuracy::<u32>(&[], &[]), Err(MetricError::Empty));
        assert!(matches!(
            token_accuracy(&[1, 2], &[1]),
            Err(MetricError::LengthMismatch {
                got: 2,
                expected: 1,
                ..
            })
        ));
    }

    #[test]
    fn locality_known_disagreement() {
        // One of three answer positions changed after the edit: 2/3 agreement.
        let pre = [10, 11, 12];
        let post = [10, 99, 12];
        assert!(close(locality_agreement(&pre, &post).unwrap(), 2.0 / 3.0));
        assert_eq!(locality_agreement(&pre, &pre).unwrap(), 1.0);
        assert!(locality_agreement(&pre, &post[..2]).is_err());
    }

    #[test]
    fn entropy_of_known_sequences() {
        // "a b a b": bigrams ab, ba, ab -> p = 2/3, 1/3 -> H = 0.918295834...
        let t = ["a", "b", "a", "b"];
        let h2 = -(2.0f64 / 3.0 * (2.0f64 / 3.0).log2() + 1.0 / 3.0 * (1.0f64 / 3.0).log2());
        assert!(close(ngram_entropy(&t, 2), h2));
        assert!(close(h2, 0.918_295_834_054_489_6));
        // Trigrams aba, bab: 1 bit.
        assert!(close(ngram_entropy(&t, 3), 1.0));
        // Constant text has zero entropy; too-short text too.
        assert_eq!(ngram_entropy(&["x", "x", "x", "x"], 2), 0.0);
        assert_eq!(ngram_entropy(&["x"], 2), 0.0);
        // 8 distinct words: 7 distinct bigrams (log2 7), 6 distinct trigrams (log2 6).
        let f = fluency("one two three four five six seven eight");
        assert!(close(f, 7f64.log2() / 3.0 + 2.0 * 6f64.log2() / 3.0));
        // Fluency of "a b a b": H2/3 + 2*H3/3.
        assert!(close(fluency("a b a b"), h2 / 3.0 + 2.0 / 3.0));
        // Repetitive generations score lower than varied ones.
        assert!(fluency("the the the the the the") < fluency("the cat sat on the mat"));
    }

    #[test]
    fn word_tokenizer_splits_punctuation() {
        assert_eq!(
            word_tokenize("Paris, France's capital (3.5 km) is big."),
            vec!["Paris", ",", "France's", "capital", "(", "3.5", "km", ")", "is", "big", "."]
        );
        assert_eq!(word_tokenize("  "), Vec::<&str>::new());
        assert_eq!(word_tokenize("end.Next"), vec!["end", ".", "Next"]);
    }

    #[test]
    fn generation_matching() {
        assert!(exact_match(" Berlin. It is a city", "Berlin"));
        assert!(exact_match("berlin", "Berlin"));
        assert!(exact_match(" Leonardo da Vinci, who", "Leonardo da Vinci"));
        assert!(!exact_match(" Berlinale", "Berlin"));
        assert!(!exact_match(" the city of Berlin", "Berlin"));
        assert!(!exact_match(" Leonardo", "Leonardo da Vinci"));
        assert!(!exact_match(" x", ""));

        assert!(contains_target(" the city of Berlin. Paris is", "Berlin"));
        assert!(!contains_target(" the city of Paris. Berlin is", "Berlin"));
        assert!(!contains_target(" the city of Paris\nBerlin", "Berlin"));
        assert!(contains_target(" located in New York City.", "New York"));
        assert!(!contains_target(" Berlinale", "Berlin"));
        assert_eq!(first_sentence(" A 3.5 km road. B"), "A 3.5 km road.");
    }

    #[test]
    fn mean_skips_nothing_and_handles_empty() {
        assert_eq!(mean([1.0, 0.0, 0.5]), Some(0.5));
        assert_eq!(mean(std::iter::empty()), None);
    }
}
