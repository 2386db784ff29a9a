//! The model's Hugging Face tokenizer, loaded from `--hf-checkpoint`, serving the middleware
//! `tokenizer` import natively (a guest-side tokenizer would be slower and megabytes big).

use std::path::Path;

use anyhow::{Context as _, anyhow};
use tokenizers::DecoderWrapper;

use crate::chat_template::ChatTemplate;

/// A tokenizer.json loaded with padding and truncation off.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Byte length of each id's text for byte-level decoders, where a token's bytes are a
    /// pure function of its id; `None` means lengths come from incremental decoding.
    byte_lengths: Option<ByteLengths>,
    /// The model directory's chat template, for the chat middleware.
    chat_template: Option<ChatTemplate>,
}

struct ByteLengths {
    lengths: Vec<u32>,
    special: Vec<bool>,
}

impl Tokenizer {
    /// Loads `path`: a model directory holding tokenizer.json (and maybe a chat template, see
    /// [`ChatTemplate::load`]), or the file itself.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let (file, chat_template) = if path.is_dir() {
            (path.join("tokenizer.json"), ChatTemplate::load(path)?)
        } else {
            (path.to_path_buf(), None)
        };
        let mut inner = tokenizers::Tokenizer::from_file(&file)
            .map_err(|e| anyhow!("{e}"))
            .with_context(|| format!("cannot load tokenizer {}", file.display()))?;
        // Real tokenizer.json files often ship with padding/truncation for batch training;
        // a router must see every token of the text.
        inner.with_padding(None);
        inner
            .with_truncation(None)
            .map_err(|e| anyhow!("{e}"))
            .with_context(|| format!("cannot disable truncation in {}", file.display()))?;
        let byte_lengths = matches!(inner.get_decoder(), Some(DecoderWrapper::ByteLevel(_)))
            .then(|| ByteLengths::new(&inner));
        tracing::info!(
            file = %file.display(),
            vocab = inner.get_vocab_size(true),
            chat_template = chat_template.is_some(),
            "tokenizer loaded"
        );
        Ok(Self {
            inner,
            byte_lengths,
            chat_template,
        })
    }

    /// The chat template beside tokenizer.json, if the checkpoint has one.
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat_template.as_ref()
    }

    /// Ids of `text` without special tokens added (special-token text still maps to its id).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, String> {
        let encoding = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| e.to_string())?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The text of `ids`; with `skip_special`, special tokens add nothing.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| e.to_string())
    }

    /// Bytes each id adds to `decode(ids, skip_special)`.
    pub fn token_lengths(&self, ids: &[u32], skip_special: bool) -> Result<Vec<u32>, String> {
        match &self.byte_lengths {
            Some(table) => ids
                .iter()
                .map(|&id| table.length(id, skip_special))
                .collect(),
            None => self.streamed_lengths(ids, skip_special),
        }
    }

    /// Lengths by incremental decoding: a token that completes no character adds 0 and the
    /// one that completes it carries the character's bytes.
    fn streamed_lengths(&self, ids: &[u32], skip_special: bool) -> Result<Vec<u32>, String> {
        let mut stream = self.inner.decode_stream(skip_special);
        ids.iter()
            .map(|&id| match stream.step(id) {
                Ok(text) => Ok(text.map_or(0, |t| t.len() as u32)),
                Err(e) => Err(e.to_string()),
            })
            .collect()
    }
}

impl ByteLengths {
    fn new(tokenizer: &tokenizers::Tokenizer) -> Self {
        let byte_of_char = byte_level_chars();
        let size = tokenizer.get_vocab_size(true);
        let added = tokenizer.get_added_tokens_decoder();
        let mut lengths = vec![0; size];
        let mut special = vec![false; size];
        for (id, slot) in lengths.iter_mut().enumerate() {
            let Some(token) = tokenizer.id_to_token(id as u32) else {
                continue;
            };
            // The byte-level decoder maps each char back to one byte, and passes through
            // tokens holding chars outside its alphabet (some added tokens) unchanged.
            let all_mapped = token.chars().all(|c| byte_of_char.contains(&c));
            *slot = if all_mapped {
                token.chars().count()
            } else {
                token.len()
            } as u32;
        }
        for (id, token) in added {
            if let Some(flag) = special.get_mut(id as usize) {
                *flag = token.special;
            }
        }
        Self { lengths, special }
    }

    fn length(&self, id: u32, skip_special: bool) -> Result<u32, String> {
        let index = id as usize;
        let length = self
            .lengths
            .get(index)
            .ok_or_else(|| format!("token id {id} is out of vocabulary"))?;
        Ok(if skip_special && self.special[index] {
            0
        } else {
            *length
        })
    }
}

/// The chars of GPT-2's byte-level alphabet: printable Latin-1 bytes stand for themselves,
/// the other 68 bytes for U+0100 onwards (tokenizers keeps this table private).
fn byte_level_chars() -> std::collections::HashSet<char> {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut chars = std::collections::HashSet::with_capacity(256);
    let mut next = 256u32;
    for byte in 0..=255u8 {
        if printable(byte) {
            chars.insert(char::from(byte));
        } else {
            chars.extend(char::from_u32(next));
            next += 1;
        }
    }
    chars
}
