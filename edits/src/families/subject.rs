//! Where a subject occurs in a text: the one matcher the compiler and the runtime share.
//!
//! The compiler needs the subject as the record writes it ([`find_subject`]: ASCII case
//! aside, byte for byte), since ROME and MEMIT key on its tokens. A query is typed by a user,
//! on a phone as often as not: without the accents ("Nestle" for "Nestlé"), with the
//! keyboard's curly apostrophe ("McDonald’s"), in decomposed Unicode (e + U+0301, as macOS
//! text often is), in capitals ("ÉMILE ZOLA"), or with a doubled or non-breaking space. The
//! scope model reads all of these as the record's spelling (its tokenizer lowercases and strips
//! accents), but the relation groups strip the subject out of the query by text
//! ([`strip_subject`]), and a subject not found there loses the groups' vote (docs/methods.md).
//! [`find_subject_as_typed`] finds it through those variations.

use alloc::string::String;
use alloc::vec::Vec;
use core::ops::Range;

/// Byte range of `subject`'s last occurrence in `text`, ignoring ASCII case: a subject written
/// "the Eiffel Tower" is the one a prompt opens with "The Eiffel Tower". `None` for an empty
/// subject. ASCII lowercasing keeps byte offsets, so the range indexes `text`.
pub fn find_subject(text: &str, subject: &str) -> Option<Range<usize>> {
    if subject.is_empty() {
        return None;
    }
    let (t, s) = (text.to_ascii_lowercase(), subject.to_ascii_lowercase());
    t.rfind(&s).map(|i| i..i + s.len())
}

/// [`find_subject`], or where that finds nothing, the last occurrence after both texts are
/// folded ([`fold`]: case, accents on Latin letters, combining marks, typographic apostrophes,
/// quotes and dashes, runs of white space). The range covers whole characters of `text`,
/// combining marks that follow included. Where the exact form occurs this is the same range
/// as [`find_subject`], so nothing written by the record's own spelling changes.
pub fn find_subject_as_typed(text: &str, subject: &str) -> Option<Range<usize>> {
    if let Some(r) = find_subject(text, subject) {
        return Some(r);
    }
    let (s, _) = folded(subject);
    let s = s.trim_matches(' ');
    if s.is_empty() {
        return None;
    }
    let (t, map) = folded(text);
    let at = t.rfind(s)?;
    // Folded characters are whole UTF-8 sequences, so the match starts and ends on entries.
    let first = map.partition_point(|&(f, _)| f < at);
    let last = map.partition_point(|&(f, _)| f < at + s.len()) - 1;
    Some(map[first].1.start..map[last].1.end)
}

/// `text` folded for matching, and for each folded character its byte offset in the folded
/// text and the byte range in `text` it stands for.
fn folded(text: &str) -> (String, Vec<(usize, Range<usize>)>) {
    let mut out = String::with_capacity(text.len());
    let mut map: Vec<(usize, Range<usize>)> = Vec::with_capacity(text.len());
    for (i, c) in text.char_indices() {
        let end = i + c.len_utf8();
        match fold(c) {
            // A mark belongs to the character before it.
            None => {
                if let Some(last) = map.last_mut() {
                    last.1.end = end;
                }
            }
            // One space stands for a run of white space.
            Some(' ') if out.ends_with(' ') => {
                if let Some(last) = map.last_mut() {
                    last.1.end = end;
                }
            }
            Some(f) => {
                map.push((out.len(), i..end));
                out.push(f);
            }
        }
    }
    (out, map)
}

/// One character as matching sees it; `None` for a combining mark, which matching skips. Every
/// character folds to at most one, so ranges map back to `text` one to one.
pub fn fold(c: char) -> Option<char> {
    let c = match c {
        c if c.is_whitespace() => ' ',
        c if c.is_ascii() => return Some(c.to_ascii_lowercase()),
        // Combining diacritical marks (and their supplements, extended and for symbols).
        '\u{300}'..='\u{36f}'
        | '\u{1ab0}'..='\u{1aff}'
        | '\u{1dc0}'..='\u{1dff}'
        | '\u{20d0}'..='\u{20ff}'
        | '\u{fe20}'..='\u{fe2f}' => return None,
        '\u{2018}'..='\u{201b}' | '\u{2032}' | '\u{2035}' | '\u{2bc}' | '\u{b4}' => '\'',
        '\u{201c}'..='\u{201f}' | '\u{2033}' | '\u{ab}' | '\u{bb}' => '"',
        '\u{2010}'..='\u{2015}' | '\u{2212}' | '\u{fe63}' | '\u{ff0d}' => '-',
        c => {
            if let Some(b) = latin_base(c) {
                return Some(b);
            }
            let mut l = c.to_lowercase();
            match (l.next(), l.next()) {
                (Some(l), None) => l,
                _ => c,
            }
        }
    };
    Some(c)
}

/// The lowercase ASCII letter a precomposed Latin letter decomposes to (its canonical
/// decomposition's first character), for Latin-1, Extended-A/B and Extended Additional; `.`
/// in the tables is a letter without one (æ, ø, ß, ...). Checked against Unicode's
/// decompositions in the tests.
fn latin_base(c: char) -> Option<char> {
    const LATIN: &[u8; 400] = b"aaaaaa.ceeeeiiii.nooooo..uuuuy..aaaaaa.ceeeeiiii.nooooo..uuuuy.y\
aaaaaaccccccccdd..eeeeeeeeeegggggggghh..iiiiiiiii...jjkk.llllll.\
...nnnnnn...oooooo..rrrrrrsssssssstttt..uuuuuuuuuuuuwwyyyzzzzzz.\
................................oo.............uu...............\
.............aaiioouuuuuuuuuu.aaaa....ggkkoooo..j...gg..nnaa....\
aaaaeeeeiiiioooorrrruuuusstt..hh......aaeeooooooooyy............\
................";
    const ADDITIONAL: &[u8; 256] =
        b"aabbbbbbccddddddddddeeeeeeeeeeffgghhhhhhhhhhiiiikkkkkkllllllllmm\
mmmmnnnnnnnnoooooooopppprrrrrrrrssssssssssttttttttuuuuuuuuuuvvvv\
wwwwwwwwwwxxxxyyzzzzzzhtwy......aaaaaaaaaaaaaaaaaaaaaaaaeeeeeeee\
eeeeeeeeiiiioooooooooooooooooooooooouuuuuuuuuuuuuuyyyyyyyy......";
    let c = c as u32;
    let b = match c {
        0xc0..=0x24f => LATIN[(c - 0xc0) as usize],
        0x1e00..=0x1eff => ADDITIONAL[(c - 0x1e00) as usize],
        _ => return None,
    };
    (b != b'.').then_some(b as char)
}

/// `text` with its last occurrence of `subject` ([`find_subject_as_typed`]; a preceding "the "
/// dropped) replaced by "it": what a relation template looks like. `None` when the subject
/// does not occur.
pub fn strip_subject(text: &str, subject: &str) -> Option<String> {
    let r = find_subject_as_typed(text, subject)?;
    let mut pre = &text[..r.start];
    for article in ["the ", "The "] {
        if let Some(p) = pre.strip_suffix(article) {
            pre = p;
        }
    }
    let mut out = String::with_capacity(text.len());
    out.push_str(pre);
    out.push_str("it");
    out.push_str(&text[r.end..]);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exact_form_is_found_as_before() {
        let f = |t: &str, s: &str| find_subject(t, s);
        assert_eq!(f("The Eiffel Tower is in", "the Eiffel Tower"), Some(0..16));
        assert_eq!(f("Rome and Rome", "rome"), Some(9..13));
        assert_eq!(f("The capital of France is", "Italy"), None);
        assert_eq!(f("anything", ""), None);
        // Only ASCII case is ignored here: the compiler keys on the subject as written.
        assert_eq!(f("ÉMILE ZOLA wrote", "émile zola"), None);
        assert_eq!(f("Who founded Nestle?", "Nestlé"), None);
    }

    #[test]
    fn a_subject_is_found_as_users_type_it() {
        let strip = |t: &str, s: &str| strip_subject(t, s);
        let cases = [
            // Accents left out, the way many type them.
            ("Who founded Nestle?", "Nestlé", "Who founded it?"),
            (
                "Which river runs through Sao Paulo?",
                "São Paulo",
                "Which river runs through it?",
            ),
            // Accents the record lacks.
            ("Who founded Nestlé?", "Nestle", "Who founded it?"),
            // Decomposed Unicode in the query (e + U+0301), the mark taken out with its letter.
            (
                "Who founded Nestle\u{301} in 1866?",
                "Nestlé",
                "Who founded it in 1866?",
            ),
            // ... and in the subject.
            ("Who founded Nestlé?", "Nestle\u{301}", "Who founded it?"),
            // Capitals beyond ASCII.
            (
                "WHO WROTE ÉMILE ZOLA'S NOVELS?",
                "émile zola",
                "WHO WROTE it'S NOVELS?",
            ),
            // The phone keyboard's apostrophe, and the record's.
            ("Who founded McDonald’s?", "McDonald's", "Who founded it?"),
            ("Who founded McDonald's?", "McDonald’s", "Who founded it?"),
            // White space doubled or non-breaking; a dash typed as an en dash.
            (
                "When did Jane  Eyre appear?",
                "Jane Eyre",
                "When did it appear?",
            ),
            (
                "When did Jane\u{a0}Eyre appear?",
                "Jane Eyre",
                "When did it appear?",
            ),
            ("Where is Saint–Tropez?", "Saint-Tropez", "Where is it?"),
            // The article dropped as with the exact form.
            (
                "Where is the Mont-Saint-Michel?",
                "Mont–Saint–Michel",
                "Where is it?",
            ),
            // Vietnamese (Latin Extended Additional).
            ("Who founded Ha Noi?", "Hà Nội", "Who founded it?"),
        ];
        for (text, subject, want) in cases {
            assert_eq!(
                strip(text, subject).as_deref(),
                Some(want),
                "{text:?} / {subject:?}"
            );
        }
        // Still the last occurrence.
        assert_eq!(
            strip("Nestle or Nestle?", "Nestlé").as_deref(),
            Some("Nestle or it?")
        );
        // What is not the subject stays out.
        for (text, subject) in [
            ("Who founded Nestor?", "Nestlé"),
            ("The capital of France is", "Italy"),
            ("anything", ""),
            ("anything", " \u{301} "),
            ("", "Nestlé"),
        ] {
            assert_eq!(strip(text, subject), None, "{text:?} / {subject:?}");
        }
    }

    #[test]
    fn where_the_record_spelling_occurs_nothing_changes() {
        // The exact form wins over a folded one later in the text: the same range as before.
        let t = "Nestlé and Nestle";
        assert_eq!(
            find_subject_as_typed(t, "Nestlé"),
            find_subject(t, "Nestlé")
        );
        assert_eq!(find_subject_as_typed(t, "Nestlé"), Some(0..7));
    }

    #[test]
    fn every_range_lies_on_character_boundaries() {
        // Whatever folds to what, the range must index the text (no panic slicing it).
        let texts = [
            "e\u{301}\u{301}e\u{301}",
            "\u{301}Nestle\u{301}",
            "  É  é  ",
            "İstanbul",
            "ßẞ",
            "ǅǆǄ",
        ];
        let subjects = [
            "e", "é", "e\u{301}", " é ", "istanbul", "i", "ss", "ǆ", "\u{301}e",
        ];
        for t in texts {
            for s in subjects {
                if let Some(r) = find_subject_as_typed(t, s) {
                    assert!(t.get(r.clone()).is_some(), "{t:?} / {s:?}: {r:?}");
                    assert!(strip_subject(t, s).is_some());
                }
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]
        /// Any text and subject from characters that fold in every way (marks, accents,
        /// capitals, apostrophes, dashes, spaces of several kinds, letters that lowercase to
        /// two characters): a range found lies on the text's character boundaries and covers
        /// a folded occurrence; where the exact form occurs, its range is the one returned.
        #[test]
        fn matching_any_text_never_panics_and_keeps_the_exact_form(
            text in "[aeEéÉ\u{301}\u{308} \u{a0}\t'\u{2019}\u{2013}İßẞǅ\u{1e9e}x-]{0,24}",
            subject in "[aeEéÉ\u{301}\u{308} \u{a0}'\u{2019}\u{2013}İßẞǅx-]{0,6}",
        ) {
            let exact = find_subject(&text, &subject);
            let typed = find_subject_as_typed(&text, &subject);
            if exact.is_some() {
                proptest::prop_assert_eq!(&typed, &exact);
            }
            if let Some(r) = typed {
                let part = text.get(r.clone());
                proptest::prop_assert!(part.is_some(), "{:?} / {:?}: {:?}", text, subject, r);
                let fold = |t: &str| {
                    let (f, _) = folded(t);
                    f.trim_matches(' ').to_string()
                };
                proptest::prop_assert!(
                    exact.is_some() || fold(part.unwrap()) == fold(&subject),
                    "{:?} / {:?}: {:?}", text, subject, r
                );
                proptest::prop_assert!(strip_subject(&text, &subject).is_some());
            }
        }
    }

    #[test]
    fn the_latin_tables_follow_unicode_decompositions() {
        use unicode_normalization::char::decompose_canonical;
        for c in ('\u{c0}'..='\u{24f}').chain('\u{1e00}'..='\u{1eff}') {
            let mut first = None;
            decompose_canonical(c, |d| {
                first.get_or_insert(d);
            });
            let want = first
                .filter(|&f| f != c && f.is_ascii_alphabetic())
                .map(|f| f.to_ascii_lowercase());
            assert_eq!(latin_base(c), want, "U+{:04X} {c}", c as u32);
        }
    }
}
