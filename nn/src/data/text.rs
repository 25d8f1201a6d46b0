//! Text for language models (T30): optional normalisation steps, a character or byte-level
//! BPE tokenizer saved with the model, and the train/validation split by position.

pub use super::bpe::BpeTokenizer;
use super::{Batch, Examples};
use crate::{NnError, Result};
use lockstep_kernels::IGNORE_TARGET;
use std::collections::{BTreeSet, HashMap};
use std::path::Path;

/// Optional preprocessing applied before tokenising.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TextNormalization {
    /// Full-width ASCII forms (U+FF01..U+FF5E) and the ideographic space (U+3000) to their
    /// half-width equivalents.
    pub half_width: bool,
    pub lowercase: bool,
}

impl TextNormalization {
    pub fn apply(&self, text: &str) -> String {
        text.chars()
            .map(|c| {
                let c = if self.half_width { to_half_width(c) } else { c };
                if self.lowercase {
                    c.to_lowercase().next().unwrap_or(c)
                } else {
                    c
                }
            })
            .collect()
    }
}

fn to_half_width(c: char) -> char {
    match c as u32 {
        0x3000 => ' ',
        cp @ 0xFF01..=0xFF5E => char::from_u32(cp - 0xFF01 + 0x21).unwrap_or(c),
        _ => c,
    }
}

/// One token per distinct character, ids in sorted character order (so the same text
/// always gives the same vocabulary).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CharTokenizer {
    pub chars: Vec<char>,
}

impl CharTokenizer {
    pub fn fit(text: &str) -> Self {
        Self { chars: text.chars().collect::<BTreeSet<_>>().into_iter().collect() }
    }

    pub fn vocab_size(&self) -> usize {
        self.chars.len()
    }

    /// Token ids of `text`; a character outside the vocabulary is an error naming it and
    /// its position.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        text.chars()
            .enumerate()
            .map(|(i, c)| {
                self.chars
                    .binary_search(&c)
                    .map(|id| id as u32)
                    .map_err(|_| NnError::Invalid(format!("character {c:?} at position {i} is not in the vocabulary")))
            })
            .collect()
    }

    pub fn decode(&self, ids: &[u32]) -> String {
        ids.iter().map(|&i| self.chars.get(i as usize).copied().unwrap_or('\u{FFFD}')).collect()
    }

    /// The vocabulary as text, one character per line, escaped, so it is saved beside a
    /// checkpoint and read back exactly.
    pub fn to_vocab_file(&self) -> String {
        self.chars.iter().map(|c| format!("{}\n", c.escape_default())).collect()
    }

    pub fn from_vocab_file(text: &str, path: &Path) -> Result<Self> {
        let mut chars = Vec::new();
        for (line_no, line) in text.lines().enumerate() {
            let c = unescape(line).ok_or_else(|| NnError::Data {
                path: path.to_path_buf(),
                offset: text.lines().take(line_no).map(|l| l.len() as u64 + 1).sum(),
                message: format!("line {}: {line:?} is not one escaped character", line_no + 1),
            })?;
            chars.push(c);
        }
        if chars.windows(2).any(|w| w[0] >= w[1]) {
            return Err(NnError::Data {
                path: path.to_path_buf(),
                offset: 0,
                message: "vocabulary is not sorted and unique".into(),
            });
        }
        Ok(Self { chars })
    }
}

/// Model-file header keys: a character vocabulary, or a BPE `tokenizer.json`.
pub const VOCAB_KEY: &str = "lockstep.vocab";
pub const TOKENIZER_KEY: &str = "lockstep.tokenizer";

/// A language model's tokenizer, saved in its model file's header.
#[derive(Debug, Clone)]
pub enum Tokenizer {
    Char(CharTokenizer),
    Bpe(BpeTokenizer),
}

impl Tokenizer {
    pub fn vocab_size(&self) -> usize {
        match self {
            Tokenizer::Char(t) => t.vocab_size(),
            Tokenizer::Bpe(t) => t.vocab_size(),
        }
    }
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match self {
            Tokenizer::Char(t) => t.encode(text),
            Tokenizer::Bpe(t) => t.encode(text),
        }
    }
    pub fn decode(&self, ids: &[u32]) -> String {
        match self {
            Tokenizer::Char(t) => t.decode(ids),
            Tokenizer::Bpe(t) => t.decode(ids),
        }
    }
    /// The header key and text that save it.
    pub fn to_metadata(&self) -> Result<(&'static str, String)> {
        Ok(match self {
            Tokenizer::Char(t) => (VOCAB_KEY, t.to_vocab_file()),
            Tokenizer::Bpe(t) => (TOKENIZER_KEY, t.to_json()?),
        })
    }
    /// The tokenizer saved in a header, if any (`path` names the file in errors).
    pub fn from_metadata(metadata: &HashMap<String, String>, path: &Path) -> Result<Option<Self>> {
        if let Some(json) = metadata.get(TOKENIZER_KEY) {
            return Ok(Some(Tokenizer::Bpe(BpeTokenizer::from_json(json, path)?)));
        }
        metadata.get(VOCAB_KEY).map(|v| Ok(Tokenizer::Char(CharTokenizer::from_vocab_file(v, path)?))).transpose()
    }
}

/// The inverse of `char::escape_default` for one character.
fn unescape(s: &str) -> Option<char> {
    let mut it = s.chars();
    let first = it.next()?;
    if first != '\\' {
        return (it.next().is_none()).then_some(first);
    }
    let c = match it.next()? {
        'n' => '\n',
        't' => '\t',
        'r' => '\r',
        '\\' => '\\',
        '\'' => '\'',
        '"' => '"',
        'u' => {
            let hex: String = it.by_ref().collect();
            let hex = hex.strip_prefix('{')?.strip_suffix('}')?;
            return char::from_u32(u32::from_str_radix(hex, 16).ok()?);
        }
        _ => return None,
    };
    it.next().is_none().then_some(c)
}

/// The first `train_fraction` of the characters for training, the rest for validation
/// (cut at a character, so every tokenizer splits the text at the same place).
pub fn split_text(text: &str, train_fraction: f64) -> (&str, &str) {
    let cut = ((text.chars().count() as f64) * train_fraction).round() as usize;
    text.split_at(text.char_indices().nth(cut).map_or(text.len(), |(i, _)| i))
}

/// Next-token examples cut from a token stream: window i starts at `i · stride`, its input
/// is `context` tokens and its targets the same positions shifted by one.
///
/// With `pad_last`, the windows tile the whole stream (stride = context) and the last one
/// is padded: its missing inputs are token 0, its missing targets `IGNORE_TARGET`, and its
/// valid length is reported so attention never looks at the padding. Validation uses this
/// so that every token of the split is predicted exactly once.
#[derive(Debug, Clone)]
pub struct TokenWindows {
    pub tokens: Vec<u32>,
    pub vocab: usize,
    pub context: usize,
    pub stride: usize,
    pub pad_last: bool,
}

impl TokenWindows {
    /// Full windows every `stride` tokens (training).
    pub fn full(tokens: Vec<u32>, vocab: usize, context: usize, stride: usize) -> Self {
        Self { tokens, vocab, context, stride: stride.max(1), pad_last: false }
    }
    /// Non-overlapping windows covering every target, the last one padded (evaluation).
    pub fn tiled(tokens: Vec<u32>, vocab: usize, context: usize) -> Self {
        Self { tokens, vocab, context, stride: context, pad_last: true }
    }
}

impl Examples for TokenWindows {
    fn len(&self) -> usize {
        // A window needs at least one (input, target) pair.
        let targets = self.tokens.len().saturating_sub(1);
        if self.context == 0 || targets == 0 {
            0
        } else if self.pad_last {
            targets.div_ceil(self.stride)
        } else if targets < self.context {
            0
        } else {
            (targets - self.context) / self.stride + 1
        }
    }
    fn features(&self) -> usize {
        self.context
    }
    fn classes(&self) -> usize {
        self.vocab
    }
    fn distinct_targets(&self) -> usize {
        self.tokens.len().saturating_sub(1)
    }
    fn gather(&self, indices: &[u32]) -> Batch {
        let t = self.context;
        let mut batch = Batch {
            x: Vec::with_capacity(indices.len() * t),
            y: Vec::with_capacity(indices.len() * t),
            seq_lens: Vec::with_capacity(indices.len()),
        };
        let mut padded = false;
        for &i in indices {
            let start = i as usize * self.stride;
            let len = t.min(self.tokens.len().saturating_sub(start + 1));
            let (inputs, targets) = (&self.tokens[start..start + len], &self.tokens[start + 1..start + 1 + len]);
            batch.x.extend(inputs.iter().map(|&id| id as f32));
            batch.x.extend(std::iter::repeat_n(0.0, t - len));
            batch.y.extend_from_slice(targets);
            batch.y.extend(std::iter::repeat_n(IGNORE_TARGET, t - len));
            batch.seq_lens.push(len);
            padded |= len < t;
        }
        if !padded {
            batch.seq_lens.clear(); // all full length: no mask needed beyond causality
        }
        batch
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_unknown_characters() {
        let tok = CharTokenizer::fit("hello world");
        assert_eq!(tok.chars, vec![' ', 'd', 'e', 'h', 'l', 'o', 'r', 'w']);
        let ids = tok.encode("hold").unwrap();
        assert_eq!(ids, vec![3, 5, 4, 1]);
        assert_eq!(tok.decode(&ids), "hold");
        assert!(tok.encode("help!").unwrap_err().to_string().contains("'p' at position 3"));
    }

    #[test]
    fn vocab_file_round_trips_every_character() {
        let tok = CharTokenizer::fit("a\nb\t\\c'\"é漢\u{1F600} ");
        let path = Path::new("vocab.txt");
        assert_eq!(CharTokenizer::from_vocab_file(&tok.to_vocab_file(), path).unwrap(), tok);
        let err = CharTokenizer::from_vocab_file("a\nbc\n", path).unwrap_err().to_string();
        assert!(err.contains("line 2") && err.contains("byte offset 2"), "{err}");
    }

    #[test]
    fn normalisation_steps() {
        let n = TextNormalization { half_width: true, lowercase: false };
        assert_eq!(n.apply("ＡＢＣ！　１２３ｚ"), "ABC! 123z");
        let n = TextNormalization { half_width: true, lowercase: true };
        assert_eq!(n.apply("ＲＯＭＥＯ: Hi"), "romeo: hi");
        assert_eq!(TextNormalization::default().apply("ＡB"), "ＡB");
    }

    #[test]
    fn shakespeare_vocabulary_and_split() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/tinyshakespeare/input.txt");
        let text = std::fs::read_to_string(&path).expect("data/tinyshakespeare/input.txt");
        let tok = CharTokenizer::fit(&text);
        assert_eq!(tok.vocab_size(), 65); // as published
        let ids = tok.encode(&text).unwrap();
        assert_eq!(ids.len(), 1_115_394);
        assert_eq!(tok.decode(&ids[..14]), "First Citizen:");
        let (train, val) = split_text(&text, 0.9);
        assert_eq!(train.chars().count(), 1_003_855);
        assert_eq!(train.len() + val.len(), text.len());
    }

    #[test]
    fn token_windows_shift_targets_and_pad_the_last_window() {
        let tokens: Vec<u32> = (0..10).collect();
        let train = TokenWindows::full(tokens.clone(), 10, 4, 1);
        assert_eq!(train.len(), 6); // starts 0..=5: window 5 is inputs 5..9, targets 6..10
        let b = train.gather(&[0, 5]);
        assert_eq!(b.x, vec![0., 1., 2., 3., 5., 6., 7., 8.]);
        assert_eq!(b.y, vec![1, 2, 3, 4, 6, 7, 8, 9]);
        assert!(b.seq_lens.is_empty());
        let val = TokenWindows::tiled(tokens, 10, 4);
        assert_eq!(val.len(), 3); // 9 targets in windows of 4: 4 + 4 + 1
        let b = val.gather(&[1, 2]);
        assert_eq!(b.x, vec![4., 5., 6., 7., 8., 0., 0., 0.]);
        assert_eq!(b.y, vec![5, 6, 7, 8, 9, IGNORE_TARGET, IGNORE_TARGET, IGNORE_TARGET]);
        assert_eq!(b.seq_lens, vec![4, 1]);
        // Every target of the stream appears exactly once.
        let all = val.gather(&[0, 1, 2]);
        let targets: Vec<u32> = all.y.into_iter().filter(|&y| y != IGNORE_TARGET).collect();
        assert_eq!(targets, (1..10).collect::<Vec<u32>>());
    }
}
