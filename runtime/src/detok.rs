//! Streaming detokenization: token pieces are byte strings that can split a UTF-8 character
//! (byte-fallback tokens, multi-byte emoji); only complete characters are emitted.

/// Turns a stream of token byte pieces into text, holding back an incomplete UTF-8 tail.
#[derive(Default, Debug, Clone)]
pub struct Detokenizer {
    pending: Vec<u8>,
}

impl Detokenizer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one piece; returns the text that is now complete (possibly empty).
    /// Invalid bytes become U+FFFD.
    pub fn push(&mut self, piece: &[u8]) -> String {
        self.pending.extend_from_slice(piece);
        let mut out = String::new();
        let mut start = 0;
        loop {
            match std::str::from_utf8(&self.pending[start..]) {
                Ok(s) => {
                    out.push_str(s);
                    start = self.pending.len();
                    break;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    // SAFETY-free: the prefix is valid UTF-8 by construction.
                    out.push_str(std::str::from_utf8(&self.pending[start..start + valid]).unwrap());
                    start += valid;
                    match e.error_len() {
                        // Incomplete character at the end: wait for more bytes.
                        None => break,
                        Some(n) => {
                            out.push('\u{FFFD}');
                            start += n;
                        }
                    }
                }
            }
        }
        self.pending.drain(..start);
        out
    }

    /// Whether bytes of an incomplete character are held back.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Flushes what is held back (an incomplete character becomes U+FFFD).
    pub fn finish(&mut self) -> String {
        let s = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_multibyte_across_pieces() {
        let bytes = "né😀".as_bytes();
        let mut d = Detokenizer::new();
        let mut out = String::new();
        for b in bytes {
            let s = d.push(std::slice::from_ref(b));
            // never a partial character or replacement char
            assert!(!s.contains('\u{FFFD}'));
            out.push_str(&s);
        }
        assert!(!d.has_pending());
        assert_eq!(out, "né😀");
    }

    #[test]
    fn invalid_bytes_become_replacement() {
        let mut d = Detokenizer::new();
        assert_eq!(d.push(&[b'a', 0xff, b'b']), "a\u{FFFD}b");
        assert_eq!(d.push(&[0xe2, 0x82]), "");
        assert_eq!(d.finish(), "\u{FFFD}");
    }
}
