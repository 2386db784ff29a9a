//! The mock's tokenizer: the same Hugging Face tokenizer.json the router loads, or one token
//! per byte without one.

use std::path::Path;

use anyhow::anyhow;

/// Encodes and decodes prompts and outputs.
pub struct Tokenizer(tokenizers::Tokenizer);

impl Tokenizer {
    /// Loads `path`: a model directory holding tokenizer.json, or the file itself.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let file = if path.is_dir() {
            path.join("tokenizer.json")
        } else {
            path.to_path_buf()
        };
        let mut inner = tokenizers::Tokenizer::from_file(&file)
            .map_err(|e| anyhow!("cannot load tokenizer {}: {e}", file.display()))?;
        inner.with_padding(None);
        inner
            .with_truncation(None)
            .map_err(|e| anyhow!("cannot disable truncation: {e}"))?;
        Ok(Self(inner))
    }

    /// Ids of `text`, no special tokens added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, String> {
        self.0
            .encode_fast(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| e.to_string())
    }

    /// The text of `ids`.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, String> {
        self.0.decode(ids, skip_special).map_err(|e| e.to_string())
    }
}
