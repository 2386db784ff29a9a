//! Trains the small byte-level BPE tokenizer that the tests and the quick-start demo use
//! (tests/fixtures/tokenizer.json), since real model weights cannot be downloaded here.
//!
//! cargo run --release --example make_tokenizer -- tests/fixtures/tokenizer.json

use anyhow::anyhow;
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper,
    Tokenizer, TokenizerBuilder,
};

/// Chat-template text with a little code, CJK and emoji, so multi-byte characters appear and
/// some of them split across tokens.
const CORPUS: &[&str] = &[
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\nThe capital of France is Paris.<|im_end|>\n",
    "The quick brown fox jumps over the lazy dog. The brown fox keeps running far away from the dog.",
    "Let me think step by step. First, we compute the sum: 12 + 30 = 42. Therefore the answer is 42.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n",
    "Search results: the tool returned three documents about foxes, dogs and their habitats.",
    "Reinforcement learning from human feedback trains a policy with rewards over rollouts.",
    "東京は日本の首都です。こんにちは世界。",
    "Emoji test: 🦊🐶 are friends 😀 and the fox says hello 👋.",
    "Numbers like 3.14159, 2.71828 and 1e-7 appear in scientific text.",
];

fn main() -> anyhow::Result<()> {
    let out = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "tests/fixtures/tokenizer.json".into());
    let specials = vec![
        AddedToken::from("<|im_start|>", true),
        AddedToken::from("<|im_end|>", true),
    ];
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(700)
        .min_frequency(2)
        .show_progress(false)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .special_tokens(specials.clone())
        .build();
    let mut tokenizer = TokenizerBuilder::<
        BPE,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    >::new()
    .with_model(BPE::default())
    .with_pre_tokenizer(Some(ByteLevel::new(false, true, true).into()))
    .with_decoder(Some(ByteLevel::default().into()))
    .build()
    .map_err(|e| anyhow!("{e}"))?;
    let corpus = CORPUS.iter().cycle().take(CORPUS.len() * 20);
    tokenizer
        .train(&mut trainer, corpus)
        .map_err(|e| anyhow!("{e}"))?;
    tokenizer.add_special_tokens(&specials);
    let tokenizer = Tokenizer::from(tokenizer);
    tokenizer.save(&out, false).map_err(|e| anyhow!("{e}"))?;
    println!("wrote {out} ({} tokens)", tokenizer.get_vocab_size(true));
    Ok(())
}
