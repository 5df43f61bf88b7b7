//! Turns a sequence's tokens into text and watches for stop strings. Text that could still be
//! the start of a stop string is held back, so a stop string is never emitted in part even when
//! it spans several tokens.

use crate::tokenizer::{IncrementalDecoder, TextTokenizer, TokenizerError};

pub struct TextStop {
    decoder: IncrementalDecoder,
    stops: Vec<String>,
    /// Decoded text not yet emitted.
    pending: String,
}

/// The result of one token.
#[derive(Debug, PartialEq, Eq)]
pub struct TextStep {
    /// Text safe to emit now.
    pub text: String,
    /// A stop string was reached; `text` ends right before it.
    pub stopped: bool,
}

impl TextStop {
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            decoder: IncrementalDecoder::new(),
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            pending: String::new(),
        }
    }

    pub fn push(&mut self, tokenizer: &TextTokenizer, id: u32) -> Result<TextStep, TokenizerError> {
        let piece = self.decoder.push(tokenizer, id)?;
        Ok(self.take(&piece))
    }

    /// Text held back at the end of generation (no stop string can complete any more).
    pub fn finish(&mut self, tokenizer: &TextTokenizer) -> Result<String, TokenizerError> {
        let tail = self.decoder.flush(tokenizer)?;
        let step = self.take(&tail);
        if step.stopped {
            return Ok(step.text);
        }
        Ok(step.text + &std::mem::take(&mut self.pending))
    }

    fn take(&mut self, piece: &str) -> TextStep {
        self.pending.push_str(piece);
        if let Some(at) = self.stops.iter().filter_map(|s| self.pending.find(s.as_str())).min() {
            let text = self.pending[..at].to_string();
            self.pending.clear();
            return TextStep { text, stopped: true };
        }
        let hold = self.longest_stop_prefix_suffix();
        let emit_len = self.pending.len() - hold;
        let text = self.pending[..emit_len].to_string();
        self.pending.drain(..emit_len);
        TextStep { text, stopped: false }
    }

    /// Length of the longest suffix of `pending` that begins some stop string.
    fn longest_stop_prefix_suffix(&self) -> usize {
        let p = &self.pending;
        (1..=p.len())
            .rev()
            .filter(|&n| p.is_char_boundary(p.len() - n))
            .find(|&n| self.stops.iter().any(|s| s.starts_with(&p[p.len() - n..])))
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_back_a_possible_stop_prefix() {
        let mut s = TextStop::new(vec!["END".into()]);
        assert_eq!(s.take("abc E"), TextStep { text: "abc ".into(), stopped: false });
        assert_eq!(s.take("N"), TextStep { text: "".into(), stopped: false });
        assert_eq!(s.take("D tail"), TextStep { text: "".into(), stopped: true });
    }

    #[test]
    fn releases_a_false_alarm() {
        let mut s = TextStop::new(vec!["END".into()]);
        assert_eq!(s.take("xE").text, "x");
        assert_eq!(s.take("Nx").text, "ENx");
    }

    #[test]
    fn earliest_stop_wins() {
        let mut s = TextStop::new(vec!["b".into(), "a".into()]);
        assert_eq!(s.take("xxab"), TextStep { text: "xx".into(), stopped: true });
    }

    #[test]
    fn multibyte_text_is_not_split() {
        let mut s = TextStop::new(vec!["é!".into()]);
        assert_eq!(s.take("café").text, "caf");
        assert_eq!(s.take("?").text, "é?");
    }
}
