//! Byte-level BPE (T30) through the Hugging Face `tokenizers` crate: GPT-2's byte-level
//! pre-tokenising (its regex splits words, spaces and punctuation; every byte maps to one
//! of 256 base symbols, so any UTF-8 text encodes and decodes exactly), merges learned on
//! the training text up to a vocabulary size, saved as `tokenizer.json` text with the
//! model. A GPT-2 `tokenizer.json` loads the same way.

use crate::{NnError, Result};
use std::path::Path;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::{ModelWrapper, TrainerWrapper};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper, TokenizerBuilder};

#[derive(Clone)]
pub struct BpeTokenizer {
    inner: Box<tokenizers::Tokenizer>, // 1.5 KB inline
}

impl std::fmt::Debug for BpeTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BpeTokenizer({} tokens)", self.vocab_size())
    }
}

fn invalid(what: &str, e: impl std::fmt::Display) -> NnError {
    NnError::Invalid(format!("BPE tokenizer: {what}: {e}"))
}

impl BpeTokenizer {
    /// Learns merges on `text` until the vocabulary (256 byte symbols + merges) has
    /// `vocab_size` tokens, or no pair repeats.
    pub fn train(text: &str, vocab_size: usize) -> Result<Self> {
        let alphabet = ByteLevel::alphabet().into_iter().collect();
        let trainer = BpeTrainerBuilder::new().vocab_size(vocab_size).show_progress(false).initial_alphabet(alphabet);
        let byte_level = ByteLevel::default().add_prefix_space(false);
        let built = TokenizerBuilder::<
            ModelWrapper,
            NormalizerWrapper,
            PreTokenizerWrapper,
            PostProcessorWrapper,
            DecoderWrapper,
        >::new()
        .with_model(BPE::default().into())
        .with_pre_tokenizer(Some(byte_level.into()))
        .with_decoder(Some(byte_level.into()))
        .build()
        .map_err(|e| invalid("building", e))?;
        let mut inner = tokenizers::Tokenizer::from(built);
        inner
            .train(&mut TrainerWrapper::BpeTrainer(trainer.build()), std::iter::once(text))
            .map_err(|e| invalid("training", e))?;
        Ok(Self { inner: Box::new(inner) })
    }

    /// A tokenizer from `tokenizer.json` text (`path` names it in errors).
    pub fn from_json(json: &str, path: &Path) -> Result<Self> {
        let inner = json.parse::<tokenizers::Tokenizer>().map_err(|e| NnError::Data {
            path: path.to_path_buf(),
            offset: 0,
            message: format!("not a tokenizer.json: {e}"),
        })?;
        Ok(Self { inner: Box::new(inner) })
    }

    pub fn to_json(&self) -> Result<String> {
        self.inner.to_string(false).map_err(|e| invalid("saving", e))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.inner.encode(text, false).map_err(|e| invalid("encoding", e))?.get_ids().to_vec())
    }

    /// The text of `ids`; bytes that do not form whole UTF-8 characters (a sequence cut
    /// inside one) come out as U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> String {
        self.inner.decode(ids, false).unwrap_or_else(|_| "\u{FFFD}".repeat(ids.len()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n";

    /// Every byte-level encoding round-trips, including characters never seen in training
    /// (multi-byte, control, emoji), because the 256 byte symbols are always there.
    #[test]
    fn round_trips_any_text_and_merges_what_repeats() {
        let bpe = BpeTokenizer::train(&TEXT.repeat(20), 300).unwrap();
        assert!(bpe.vocab_size() > 256 && bpe.vocab_size() <= 300, "{}", bpe.vocab_size());
        let ids = bpe.encode(TEXT).unwrap();
        assert!(ids.len() < TEXT.len() / 2, "{} tokens for {} bytes: merges unused", ids.len(), TEXT.len());
        let samples = ["", "héllo wörld", "🦀 \u{0}\t\r\n  x", "日本語のテキスト", "\u{10FFFF}\u{7F}", TEXT];
        for s in samples {
            assert_eq!(bpe.decode(&bpe.encode(s).unwrap()), s);
        }
        // Every single character from U+0000 to U+2FFF, in one string.
        let all: String = (0..0x3000u32).filter_map(char::from_u32).collect();
        assert_eq!(bpe.decode(&bpe.encode(&all).unwrap()), all);
    }

    #[test]
    fn saved_json_loads_back_to_the_same_tokenizer() {
        let bpe = BpeTokenizer::train(&TEXT.repeat(20), 280).unwrap();
        let back = BpeTokenizer::from_json(&bpe.to_json().unwrap(), Path::new("t.json")).unwrap();
        assert_eq!(back.vocab_size(), bpe.vocab_size());
        assert_eq!(back.encode(TEXT).unwrap(), bpe.encode(TEXT).unwrap());
        let err = BpeTokenizer::from_json("{not json", Path::new("bad/tokenizer.json")).unwrap_err();
        assert!(err.to_string().contains("bad/tokenizer.json"), "{err}");
    }
}
