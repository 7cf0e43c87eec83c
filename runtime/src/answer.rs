//! A routed memory's answer: the tokens the model says right after the prompt.
//!
//! A memory whose template ends with `{answer}` does not ask the model to infer the new fact
//! from context; once the scope model routes a request to a record, the record's target is the
//! answer. The session raises the target's next token above every other logit at the positions
//! that follow the prompt, for as long as the evaluated tokens follow the answer. After the
//! answer, or as soon as the text leaves it (a caller teacher-forcing something else), the
//! logits are the model's own. The logits every caller reads (generation, scoring, the C ABI)
//! are the edited ones, as with any other edit.

use crate::{Model, RuntimeError, Token};

/// The text following `prompt` when it is answered with `answer`: KnowEdit's `prompt + ' ' +
/// answer`, without a space after a prompt that ends in a newline or when the answer already
/// starts with whitespace.
pub fn continuation(prompt: &str, answer: &str) -> String {
    if prompt.is_empty() || prompt.ends_with('\n') || answer.starts_with(char::is_whitespace) {
        answer.to_string()
    } else {
        format!(" {answer}")
    }
}

/// Splits `prompt` + answer into prompt tokens (with BOS when the model wants it) and answer
/// tokens, joined as [`continuation`] does. The answer tokens come from the tokenization of the
/// whole string when it extends the prompt's (the tokens the model would see), else from the
/// answer tokenized on its own.
pub fn prompt_answer_tokens(
    model: &Model,
    prompt: &str,
    answer: &str,
) -> Result<(Vec<Token>, Vec<Token>), RuntimeError> {
    let add_bos = model.info().add_bos;
    let cont = continuation(prompt, answer);
    let p = model.tokenize(prompt, add_bos)?;
    let full = model.tokenize(&format!("{prompt}{cont}"), add_bos)?;
    if full.len() > p.len() && full[..p.len()] == p[..] {
        let answer = full[p.len()..].to_vec();
        return Ok((p, answer));
    }
    Ok((p, model.tokenize(&cont, false)?))
}

/// How far the forced token is raised above the largest other logit: e^-30 leaves every other
/// token of a 262k vocabulary below 1e-7 probability, even at temperature 1.
pub const ANSWER_MARGIN: f32 = 30.0;

/// The answer of the current request and how far the evaluated text has followed it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AnswerPlan {
    tokens: Vec<Token>,
    /// Position of the first answer token (the one after the last prompt token), once the
    /// prompt has been evaluated.
    start: Option<usize>,
    /// Answer tokens already evaluated, in order, at `start..`.
    matched: usize,
    /// The text left the answer: nothing more is forced until the next prompt.
    left: bool,
}

impl AnswerPlan {
    pub fn new(tokens: Vec<Token>) -> AnswerPlan {
        AnswerPlan {
            tokens,
            ..Default::default()
        }
    }

    pub fn tokens(&self) -> &[Token] {
        &self.tokens
    }

    /// Sees the token at position `pos`; `last_prompt`: it ends the prompt (arms the answer).
    pub fn observe(&mut self, pos: usize, token: Token, last_prompt: bool) {
        if last_prompt {
            self.start = Some(pos + 1);
            self.matched = 0;
            self.left = false;
            return;
        }
        let Some(start) = self.start else { return };
        if pos < start || self.left {
            return;
        }
        let k = pos - start;
        if k == self.matched && self.tokens.get(k) == Some(&token) {
            self.matched += 1;
        } else if k < self.tokens.len() {
            self.left = true;
        }
    }

    /// The token the logits at position `pos` (predicting `pos + 1`) must put first, if any.
    pub fn forced(&self, pos: usize) -> Option<Token> {
        let start = self.start?;
        if self.left || pos + 1 < start {
            return None;
        }
        let k = pos + 1 - start;
        (k == self.matched)
            .then(|| self.tokens.get(k).copied())
            .flatten()
    }

    /// The KV cache now holds positions `..keep` only.
    pub fn truncate(&mut self, keep: usize) {
        match self.start {
            // The prompt's end is gone: wait for the next one.
            Some(s) if keep < s => *self = AnswerPlan::new(std::mem::take(&mut self.tokens)),
            // Rewound into the answer: forcing resumes where the kept text ends.
            Some(s) if keep - s <= self.matched => {
                self.matched = keep - s;
                self.left = false;
            }
            _ => {}
        }
    }
}

/// Raises `token` [`ANSWER_MARGIN`] above the largest logit of `logits`.
pub fn force(logits: &mut [f32], token: Token) {
    let Some(slot) = usize::try_from(token).ok().filter(|&t| t < logits.len()) else {
        return;
    };
    let max = logits
        .iter()
        .enumerate()
        .filter(|&(i, v)| i != slot && v.is_finite())
        .fold(f32::NEG_INFINITY, |m, (_, &v)| m.max(v));
    logits[slot] = if max.is_finite() {
        max + ANSWER_MARGIN
    } else {
        ANSWER_MARGIN
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follows_the_answer_then_lets_go() {
        let mut p = AnswerPlan::new(vec![7, 8, 9]);
        // Prompt at positions 0..=3.
        for pos in 0..3 {
            p.observe(pos, 1, false);
            assert_eq!(p.forced(pos), None);
        }
        p.observe(3, 1, true);
        assert_eq!(p.forced(3), Some(7));
        p.observe(4, 7, false);
        assert_eq!(p.forced(4), Some(8));
        p.observe(5, 8, false);
        assert_eq!(p.forced(5), Some(9));
        p.observe(6, 9, false);
        assert_eq!(p.forced(6), None, "after the answer the model speaks");
        // Rewind to just after the first answer token: forcing resumes there.
        p.truncate(5);
        assert_eq!(p.forced(4), Some(8));
        // Leave the answer: nothing more is forced.
        p.observe(5, 42, false);
        assert_eq!(p.forced(5), None);
        assert_eq!(p.forced(6), None);
        // Rewind to just before the token that left: forcing resumes.
        p.truncate(5);
        assert_eq!(p.forced(4), Some(8));
        // Rewind before the prompt's end: disarmed until the next prompt.
        p.truncate(2);
        assert_eq!(p.forced(3), None);
        p.observe(2, 1, true);
        assert_eq!(p.forced(2), Some(7));
    }

    #[test]
    fn force_puts_the_token_first() {
        let mut l = vec![1.0, 5.0, f32::NAN, -3.0];
        force(&mut l, 3);
        assert_eq!(l[3], 5.0 + ANSWER_MARGIN);
        let mut l = vec![1.0, 2.0];
        force(&mut l, 9); // out of range: unchanged
        assert_eq!(l, vec![1.0, 2.0]);
    }
}
