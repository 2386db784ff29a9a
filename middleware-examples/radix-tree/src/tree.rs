//! A radix tree over text whose edges are sequences of token *pieces*: the trajectory cache.
//!
//! A cached trajectory is a sequence of pieces. A piece is non-empty UTF-8 text plus the one
//! or more tokens that decode to exactly that text (several when byte-level tokens split a
//! multi-byte character; a special token with no text joins a neighbour). Node boundaries are
//! always piece boundaries, so every split of an edge is a token boundary and a cached prefix
//! always maps to whole tokens.
//!
//! Matching compares text only, so two tokenisations of overlapping text (pieces `hello` and
//! `help`) may live side by side as siblings sharing a first byte. Two siblings never start
//! with an identical piece (same text and same ids): an insert shares such a piece and splits
//! where the paths differ.
//!
//! Children are indexed by their first piece: each child entry holds the piece's length and a
//! hash of its text ([`Child`]), sorted, in the 8 bytes a first-byte index took. An insert looks
//! up its next piece directly; a lookup hashes the query's prefix of each first-piece length
//! present and binary-searches for it. So the siblings visited are those whose first piece is
//! a prefix of the query (and the rare hash collision), not all those sharing a first byte:
//! with byte-level BPE most pieces start with a space, and a prompt whose samples diverge at
//! their first token (` The`, ` Let`, ` We`, ...) would otherwise be one bucket scanned whole.
//!
//! Segment ends: the end of every insert (a prompt or an output, i.e. where some request's
//! text or some response's output ended) is marked on its last token. An insert always ends
//! at the end of a node's edge (splitting if needed), splits keep the end of every edge, and
//! nodes are never merged, so a marked token is always the last of its node: lookups test one
//! token per node and evicting descendants leaves the mark in place. There are two lookups:
//! [`RadixTree::lookup`] stops at the longest piece boundary (the stored tokens of any cached
//! text), [`RadixTree::lookup_segment`] at the longest segment end (the only places where
//! `/generate` joins freshly tokenised text to cached tokens: see [`crate::cache`]).
//!
//! Memory: each token is a packed 12-byte [`Token`]; each piece costs 4 more bytes (its end
//! offset in the edge text); each node 96 bytes; plus the text itself. Measured: ~16-17.5
//! bytes per token without the text, ~20-21.5 with English-like text.
//!
//! Eviction: plain LRU over leaves (a parent becomes a candidate once its last child goes).
//! Every lookup and insert stamps its whole path, so a parent is never older than its
//! children and the path an insert just returned is evicted last; and versions: see
//! [`Config::keep_versions`]. Nodes are never merged back after an eviction, so that refs
//! to them stay valid.
//!
//! Every call of the guest runs under a deadline of a few milliseconds, so eviction work is
//! spread over inserts: each insert evicts what keeps the tree within its budget plus a
//! bounded number of extra leaves toward 90% of it, and advances a version sweep by a bounded
//! number of nodes. Candidate leaves come from a heap built by one scan and checked when
//! popped, not from a scan per insert.
//!
//! The tree is plain Rust with no dependencies so that it can be tested and benchmarked
//! natively; the wasm guest in `lib.rs` is a thin layer over it.

use std::cmp::{Ordering, Reverse};
use std::collections::{BTreeMap, BinaryHeap};

use crate::scan::{bytes_eq, common_prefix_len};

#[cfg(test)]
mod tests;

/// Weight version given to tokens inserted before any version was seen.
pub const DEFAULT_VERSION: &str = "default";

/// Where one piece of an insert ends, counted from the start of the inserted text and ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PieceEnd {
    /// Byte offset just past the piece's text.
    pub text: u32,
    /// Index just past the piece's last token.
    pub tokens: u32,
}

/// Groups tokens into pieces from the byte length each token adds to the decoded text
/// (`tokenizer.token-lengths`).
///
/// A piece ends after token `i` when `lengths[i] > 0` and the running offset is a character
/// boundary of `text`; tokens with no text after the last boundary join the last piece. When
/// the lengths are inconsistent with `text` (wrong count, wrong sum, e.g. a normalising
/// tokenizer) the result is one piece covering everything: still correct, only not
/// splittable. Returns no pieces when `text` or `ids` is empty, since a piece needs both.
pub fn pieces_from_lengths(text: &str, ids: &[u32], lengths: &[u32]) -> Vec<PieceEnd> {
    if text.is_empty() || ids.is_empty() || u32::try_from(text.len()).is_err() {
        return Vec::new();
    }
    let Ok(token_count) = u32::try_from(ids.len()) else {
        return Vec::new();
    };
    let whole = || {
        vec![PieceEnd {
            text: text.len() as u32,
            tokens: token_count,
        }]
    };
    if lengths.len() != ids.len() {
        return whole();
    }
    let mut ends = Vec::with_capacity(ids.len());
    let mut offset = 0usize;
    for (i, &len) in lengths.iter().enumerate() {
        offset = match offset.checked_add(len as usize) {
            Some(o) if o <= text.len() => o,
            _ => return whole(),
        };
        if len > 0 && text.is_char_boundary(offset) {
            ends.push(PieceEnd {
                text: offset as u32,
                tokens: i as u32 + 1,
            });
        }
    }
    if offset != text.len() {
        return whole();
    }
    match ends.last_mut() {
        // The last positive-length token ends at text.len(), so the last piece ends there;
        // trailing empty tokens (an EOS decoded with specials skipped) join it.
        Some(last) => last.tokens = token_count,
        None => return whole(),
    }
    ends
}

/// The validated input of an insert: text cut into pieces, with their token ids and
/// optionally logprobs, all under one loss mask.
#[derive(Clone, Copy, Debug)]
pub struct Pieces<'a> {
    text: &'a str,
    ids: &'a [u32],
    logprobs: Option<&'a [f32]>,
    loss_mask: bool,
    ends: &'a [PieceEnd],
}

impl<'a> Pieces<'a> {
    /// No pieces: inserting it returns the node ending exactly at the insert location.
    pub const EMPTY: Pieces<'static> = Pieces {
        text: "",
        ids: &[],
        logprobs: None,
        loss_mask: false,
        ends: &[],
    };

    /// Checks that `ends` cut `text` and `ids` into non-empty pieces at character boundaries
    /// and cover both exactly. Logprobs default to 0.0 and the loss mask to 0 (prompt).
    pub fn new(text: &'a str, ids: &'a [u32], ends: &'a [PieceEnd]) -> Option<Self> {
        if u32::try_from(text.len()).is_err() || u32::try_from(ids.len()).is_err() {
            return None;
        }
        let mut prev = PieceEnd { text: 0, tokens: 0 };
        for &end in ends {
            let valid = end.text > prev.text
                && end.tokens > prev.tokens
                && (end.text as usize) <= text.len()
                && (end.tokens as usize) <= ids.len()
                && text.is_char_boundary(end.text as usize);
            if !valid {
                return None;
            }
            prev = end;
        }
        if prev.text as usize != text.len() || prev.tokens as usize != ids.len() {
            return None;
        }
        Some(Self {
            text,
            ids,
            logprobs: None,
            loss_mask: false,
            ends,
        })
    }

    /// Attaches one logprob per token; `None` if the count differs from the ids.
    pub fn with_logprobs(self, logprobs: &'a [f32]) -> Option<Self> {
        (logprobs.len() == self.ids.len()).then_some(Self {
            logprobs: Some(logprobs),
            ..self
        })
    }

    /// Sets the loss mask of every token: `true` for model output, `false` for prompt text.
    pub fn with_loss_mask(self, loss_mask: bool) -> Self {
        Self { loss_mask, ..self }
    }

    /// Number of pieces.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// True when there are no pieces.
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    fn start(&self, piece: usize) -> PieceEnd {
        match piece.checked_sub(1) {
            Some(prev) => self.ends[prev],
            None => PieceEnd { text: 0, tokens: 0 },
        }
    }

    fn piece_text(&self, piece: usize) -> &'a [u8] {
        let (start, end) = (self.start(piece).text, self.ends[piece].text);
        &self.text.as_bytes()[start as usize..end as usize]
    }

    fn piece_ids(&self, piece: usize) -> &'a [u32] {
        let (start, end) = (self.start(piece).tokens, self.ends[piece].tokens);
        &self.ids[start as usize..end as usize]
    }
}

const LOSS_MASK_BIT: u32 = 1 << 31;
const PIECE_START_BIT: u32 = 1 << 30;
const SEGMENT_END_BIT: u32 = 1 << 29;
/// Interned version ids take the 29 low bits.
const VERSION_MASK: u32 = SEGMENT_END_BIT - 1;

/// One cached token, packed into 12 bytes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Token {
    id: u32,
    logprob: f32,
    /// Loss mask (bit 31), first token of its piece (bit 30), last token of an insert
    /// (bit 29), interned weight version (bits 0-28).
    meta: u32,
}

impl Token {
    /// Token id.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Logprob the model gave this token (0.0 for prompt tokens).
    pub fn logprob(&self) -> f32 {
        self.logprob
    }

    /// 1 for model output, 0 for prompt and tool text.
    pub fn loss_mask(&self) -> u8 {
        u8::from(self.meta & LOSS_MASK_BIT != 0)
    }

    /// Weight version the token was cached under; see [`RadixTree::version_name`].
    pub fn version(&self) -> VersionId {
        VersionId(self.meta & VERSION_MASK)
    }

    /// True for the last token of an insert (the end of a prompt or an output): see
    /// [`RadixTree::lookup_segment`].
    pub fn ends_segment(&self) -> bool {
        self.meta & SEGMENT_END_BIT != 0
    }

    fn starts_piece(&self) -> bool {
        self.meta & PIECE_START_BIT != 0
    }
}

/// An interned weight version.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct VersionId(u32);

/// A stable handle on a node: it stays valid while the node lives (splits above it keep its
/// identity) and goes stale once the node is evicted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NodeRef {
    /// Slot in the node arena.
    pub index: u32,
    /// Bumped each time the slot is freed, so that a stale handle is detected.
    pub generation: u32,
}

impl NodeRef {
    /// The root: the empty text. Never evicted.
    pub const ROOT: NodeRef = NodeRef {
        index: 0,
        generation: 0,
    };

    /// Little-endian bytes, e.g. for a request's stash.
    pub fn to_bytes(self) -> [u8; 8] {
        let mut out = [0; 8];
        out[..4].copy_from_slice(&self.index.to_le_bytes());
        out[4..].copy_from_slice(&self.generation.to_le_bytes());
        out
    }

    /// Reads what [`NodeRef::to_bytes`] wrote.
    pub fn from_bytes(bytes: [u8; 8]) -> Self {
        let [a, b, c, d, e, f, g, h] = bytes;
        NodeRef {
            index: u32::from_le_bytes([a, b, c, d]),
            generation: u32::from_le_bytes([e, f, g, h]),
        }
    }
}

/// A position in the tree on a piece boundary: `back` bytes before the end of `node`'s edge.
///
/// It stays valid across splits (which keep node end positions) and goes stale when `node`
/// is evicted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Location {
    node: NodeRef,
    back: u32,
}

impl Location {
    /// The empty prefix.
    pub const ROOT: Location = Location::end_of(NodeRef::ROOT);

    /// The end of `node`'s text.
    pub const fn end_of(node: NodeRef) -> Self {
        Location { node, back: 0 }
    }
}

/// The result of a lookup: the longest cached prefix of the query that ends on a piece
/// boundary ([`RadixTree::lookup`]) or at a segment end ([`RadixTree::lookup_segment`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Match {
    /// Bytes of the query matched (0 on a miss).
    pub len: usize,
    /// Tokens of the matched prefix.
    pub tokens: usize,
    /// Where the match ends: read its tokens with [`RadixTree::path_tokens`], or insert the
    /// rest of the text there.
    pub at: Location,
}

/// Limits of a [`RadixTree`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// Token budget. An insert that pushes the total above it evicts least recently used
    /// leaves down to 90% of it.
    pub max_tokens: usize,
    /// When a version newer than all seen arrives, evict nodes that no trajectory of the
    /// newest `k` versions goes through. `None` (or 0) keeps every version.
    pub keep_versions: Option<usize>,
}

impl Default for Config {
    /// 4M tokens (~80 MB with text) and the 3 newest weight versions.
    fn default() -> Self {
        Config {
            max_tokens: 4_000_000,
            keep_versions: Some(3),
        }
    }
}

/// Counters and sizes; the counters only grow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Live nodes, the root excluded.
    pub nodes: u64,
    /// Tokens stored.
    pub tokens: u64,
    /// Bytes of text stored.
    pub text_bytes: u64,
    /// Distinct weight versions seen.
    pub versions: u64,
    /// LRU-touching lookups ([`RadixTree::lookup`], [`RadixTree::lookup_segment`]) that
    /// matched something.
    pub hits: u64,
    /// LRU-touching lookups that matched nothing.
    pub misses: u64,
    /// Tokens served from the cache by LRU-touching lookups.
    pub matched_tokens: u64,
    /// Tokens added by inserts (shared pieces excluded).
    pub inserted_tokens: u64,
    /// Nodes evicted for the token budget.
    pub evicted_nodes: u64,
    /// Tokens evicted for the token budget.
    pub evicted_tokens: u64,
    /// Nodes evicted because no recent weight version goes through them.
    pub version_evicted_nodes: u64,
    /// Tokens evicted because no recent weight version goes through them.
    pub version_evicted_tokens: u64,
}

#[derive(Clone, Copy, Debug)]
struct Child {
    /// [`piece_key`] of the child's first piece; siblings are sorted by it.
    key: u32,
    node: u32,
}

/// Up to this many children, a lookup compares them all rather than hashing its prefixes.
const FEW_CHILDREN: usize = 4;
/// The most bytes of a first piece its key covers; longer pieces are keyed by this prefix.
const KEY_BYTES: usize = 255;
const HASH_SEED: u32 = 0x811c_9dc5;

/// The index key of a first piece: its length (up to [`KEY_BYTES`]) in the top byte and a 24-bit
/// hash of (that much of) its text below, so that sorted keys group siblings by length. A
/// lookup compares every sibling it finds in full, so a collision costs only a comparison.
fn piece_key(piece: &[u8]) -> u32 {
    let len = piece.len().min(KEY_BYTES);
    key_of(len, hash_bytes(HASH_SEED, &piece[..len]))
}

/// FNV-1a over `bytes`, continuing from `state`: prefixes of a query hash incrementally.
fn hash_bytes(state: u32, bytes: &[u8]) -> u32 {
    bytes
        .iter()
        .fold(state, |h, &b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193))
}

fn key_of(len: usize, state: u32) -> u32 {
    let mixed = state.wrapping_mul(0x9e37_79b9);
    ((len as u32) << 24) | ((mixed ^ (mixed >> 16)) >> 8)
}

#[derive(Debug)]
struct Node {
    /// Edge text from the parent (valid UTF-8; empty only for the root and vacant slots).
    text: Box<[u8]>,
    tokens: Box<[Token]>,
    /// End offset in `text` of each piece, strictly increasing, the last one `text.len()`.
    piece_ends: Box<[u32]>,
    children: Vec<Child>,
    parent: u32,
    generation: u32,
    last_access: u64,
    /// Newest version of any trajectory inserted through this node, so never older than any
    /// descendant's: version eviction can drop whole subtrees.
    newest_version: u32,
    live: bool,
}

impl Node {
    fn vacant(generation: u32) -> Self {
        Node {
            text: Box::default(),
            tokens: Box::default(),
            piece_ends: Box::default(),
            children: Vec::new(),
            parent: 0,
            generation,
            last_access: 0,
            newest_version: 0,
            live: false,
        }
    }

    fn heap_bytes(&self) -> usize {
        self.text.len()
            + std::mem::size_of_val::<[Token]>(&self.tokens)
            + std::mem::size_of_val::<[u32]>(&self.piece_ends)
            + self.children.capacity() * std::mem::size_of::<Child>()
    }

    /// Index of the first token of piece `piece` (`tokens.len()` past the last piece).
    fn token_index(&self, piece: usize) -> usize {
        if piece >= self.piece_ends.len() {
            return self.tokens.len();
        }
        if self.tokens.len() == self.piece_ends.len() {
            // One token per piece is the common case: no scan.
            return piece;
        }
        self.tokens
            .iter()
            .enumerate()
            .filter(|(_, t)| t.starts_piece())
            .nth(piece)
            .map_or(self.tokens.len(), |(i, _)| i)
    }

    /// The piece whose first token is `token`: its text range and token count.
    fn piece_at(&self, piece: usize, token: usize) -> (usize, usize, usize) {
        let start = match piece.checked_sub(1) {
            Some(prev) => self.piece_ends[prev] as usize,
            None => 0,
        };
        let end = self.piece_ends[piece] as usize;
        let count = if self.tokens.len() == self.piece_ends.len() {
            1
        } else {
            1 + self.tokens[token + 1..]
                .iter()
                .take_while(|t| !t.starts_piece())
                .count()
        };
        (start, end, count)
    }

    /// True when the edge ends where an insert ended: only an edge's last token is ever marked.
    fn ends_segment(&self) -> bool {
        self.tokens.last().is_some_and(Token::ends_segment)
    }

    /// Calls `visit` with each child whose first piece may be a prefix of `text`: all those
    /// that are, and any whose key collides (or all children, when there are only a few). One
    /// hash step per byte up to the longest first piece that fits, one binary search per
    /// first-piece length present.
    fn children_prefixing(&self, text: &[u8], mut visit: impl FnMut(u32)) {
        // A few children (a chain of turns has one) are cheaper to compare than to hash for.
        if self.children.len() <= FEW_CHILDREN {
            for child in &self.children {
                visit(child.node);
            }
            return;
        }
        let (mut state, mut hashed, mut i) = (HASH_SEED, 0, 0);
        while let Some(first) = self.children.get(i) {
            let length = first.key >> 24;
            let group = &self.children[i..];
            let group = &group[..group.partition_point(|c| c.key >> 24 == length)];
            i += group.len();
            let len = length as usize;
            // Groups come shortest first: no longer piece fits either.
            if len > text.len() {
                break;
            }
            state = hash_bytes(state, &text[hashed..len]);
            hashed = len;
            let key = key_of(len, state);
            let from = group.partition_point(|c| c.key < key);
            for child in group[from..].iter().take_while(|c| c.key == key) {
                visit(child.node);
            }
        }
    }

    /// The children whose first piece may be `piece` (all that are, and any whose key
    /// collides).
    fn children_with_first_piece(&self, piece: &[u8]) -> &[Child] {
        let key = piece_key(piece);
        let from = self.children.partition_point(|c| c.key < key);
        let to = from + self.children[from..].partition_point(|c| c.key == key);
        &self.children[from..to]
    }
}

/// Weight versions, interned, with a total order: numeric when both parse as integers,
/// otherwise by first appearance.
#[derive(Debug, Default)]
struct Versions {
    names: Vec<Box<str>>,
    ids: BTreeMap<Box<str>, u32>,
    numbers: Vec<Option<i128>>,
    /// Ids from oldest to newest.
    order: Vec<u32>,
    /// Position of each id in `order`.
    rank: Vec<u32>,
    name_bytes: usize,
}

impl Versions {
    /// Returns the id of `name` and whether it is newer than every version seen before.
    fn intern(&mut self, name: &str) -> (u32, bool) {
        if let Some(&id) = self.ids.get(name) {
            return (id, false);
        }
        // Ids share a token's 32 bits with three flags; beyond 2^29 ids, reuse the newest rather
        // than fail (half a billion distinct versions would exhaust memory first).
        let Ok(id) = u32::try_from(self.names.len()) else {
            return (self.newest().unwrap_or(0), false);
        };
        if id > VERSION_MASK {
            return (self.newest().unwrap_or(0), false);
        }
        let number = name.parse::<i128>().ok();
        self.names.push(name.into());
        self.ids.insert(name.into(), id);
        self.numbers.push(number);
        self.name_bytes += 2 * name.len();
        // A new version is newer than every version seen before it (first appearance), except
        // that integer versions order numerically among themselves: it goes before the integer
        // versions at the end of the order that are larger. When the two rules disagree
        // (`12`, `default`, `5`), first appearance wins for the versions before the last
        // non-integer, which keeps the order total.
        let mut at = self.order.len();
        if let Some(n) = number {
            while at > 0 && self.numbers[self.order[at - 1] as usize].is_some_and(|m| m > n) {
                at -= 1;
            }
        }
        let newest = at == self.order.len();
        self.order.insert(at, id);
        self.rank.push(0);
        for (position, &v) in self.order.iter().enumerate().skip(at) {
            self.rank[v as usize] = position as u32;
        }
        (id, newest)
    }

    fn newest(&self) -> Option<u32> {
        self.order.last().copied()
    }

    fn cmp(&self, a: u32, b: u32) -> Ordering {
        self.rank[a as usize].cmp(&self.rank[b as usize])
    }

    fn heap_bytes(&self) -> usize {
        // Names are stored twice (list and map); ~48 bytes of map overhead per entry.
        self.name_bytes
            + self.names.capacity() * std::mem::size_of::<Box<str>>()
            + self.numbers.capacity() * std::mem::size_of::<Option<i128>>()
            + (self.order.capacity() + self.rank.capacity()) * 4
            + self.ids.len() * 48
    }
}

/// Nodes an insert may evict beyond what the budget requires, toward the 90% mark.
const LRU_EXTRA_PER_INSERT: usize = 32;
/// Nodes a version sweep may visit or free per insert.
const SWEEP_WORK_PER_INSERT: usize = 256;

/// An unfinished version sweep: drops subtrees whose newest version is older than `keep_from`.
#[derive(Debug)]
struct Sweep {
    /// Oldest version kept.
    keep_from: u32,
    /// Nodes whose children are still to be checked, as (index, generation).
    walk: Vec<(u32, u32)>,
    /// Nodes to free, children after their parents: popped from the end.
    doomed: Vec<(u32, u32)>,
}

/// The trajectory cache: text -> (token ids, logprobs, loss mask, weight version).
#[derive(Debug)]
pub struct RadixTree {
    /// Arena; slot 0 is the root. Freed slots go to `free` with a bumped generation.
    nodes: Vec<Node>,
    free: Vec<u32>,
    versions: Versions,
    config: Config,
    clock: u64,
    stats: Stats,
    /// Heap bytes owned by live nodes (text, tokens, piece ends, child lists).
    node_heap_bytes: usize,
    /// Eviction candidates as (last access, index, generation), oldest first; stale entries
    /// (touched, freed or grown a child since) are skipped when popped.
    lru: BinaryHeap<Reverse<(u64, u32, u32)>>,
    sweep: Option<Sweep>,
    /// [`SWEEP_WORK_PER_INSERT`]; smaller in tests, so that sweeps span inserts.
    sweep_work: usize,
}

impl RadixTree {
    /// An empty tree.
    pub fn new(config: Config) -> Self {
        let mut root = Node::vacant(0);
        root.live = true;
        RadixTree {
            nodes: vec![root],
            free: Vec::new(),
            versions: Versions::default(),
            config,
            clock: 0,
            stats: Stats::default(),
            node_heap_bytes: 0,
            lru: BinaryHeap::new(),
            sweep: None,
            sweep_work: SWEEP_WORK_PER_INSERT,
        }
    }

    /// The limits the tree was built with.
    pub fn config(&self) -> Config {
        self.config
    }

    /// Counters and sizes.
    pub fn stats(&self) -> Stats {
        Stats {
            versions: self.versions.names.len() as u64,
            ..self.stats
        }
    }

    /// Estimated heap use in bytes, from capacities: nodes, tokens, text and versions.
    pub fn memory_bytes(&self) -> usize {
        std::mem::size_of::<Self>()
            + self.nodes.capacity() * std::mem::size_of::<Node>()
            + self.free.capacity() * std::mem::size_of::<u32>()
            + self.lru.capacity() * std::mem::size_of::<Reverse<(u64, u32, u32)>>()
            + self.sweep.as_ref().map_or(0, |s| {
                (s.walk.capacity() + s.doomed.capacity()) * std::mem::size_of::<(u32, u32)>()
            })
            + self.node_heap_bytes
            + self.versions.heap_bytes()
    }

    /// Name of an interned version.
    pub fn version_name(&self, id: VersionId) -> Option<&str> {
        self.versions.names.get(id.0 as usize).map(|n| &**n)
    }

    /// The newest weight version seen, if any.
    pub fn newest_version(&self) -> Option<&str> {
        let id = self.versions.newest()?;
        self.version_name(VersionId(id))
    }

    /// True while `node` has not been evicted.
    pub fn is_live(&self, node: NodeRef) -> bool {
        self.nodes
            .get(node.index as usize)
            .is_some_and(|n| n.live && n.generation == node.generation)
    }

    /// Longest cached prefix of `text` ending on a piece boundary (see [`Match`]), marking its
    /// path as recently used and counting a hit or a miss. When several paths match (siblings
    /// holding different tokenisations of the same text) the longest wins, then the most
    /// recently used.
    pub fn lookup(&mut self, text: &str) -> Match {
        let found = self.find(text.as_bytes(), false);
        self.touch(found)
    }

    /// Longest cached prefix of `text` that ends at a segment end: where an earlier insert (a
    /// prompt or an output) ended. Otherwise like [`RadixTree::lookup`], which it backs off
    /// from: a prefix ending inside someone else's segment is not used.
    pub fn lookup_segment(&mut self, text: &str) -> Match {
        let found = self.find(text.as_bytes(), true);
        self.touch(found)
    }

    /// [`RadixTree::lookup_segment`] for text not yet known to be UTF-8 (a request's JSON string
    /// as it was unescaped): the matched prefix is UTF-8, since it equals cached text up to a
    /// piece boundary, so only the rest is checked. Returns the match and the rest, or `None`,
    /// changing nothing, when the rest is not UTF-8.
    pub fn lookup_segment_utf8<'t>(&mut self, text: &'t [u8]) -> Option<(Match, &'t str)> {
        let found = self.find(text, true);
        let rest = std::str::from_utf8(&text[found.len..]).ok()?;
        Some((self.touch(found), rest))
    }

    /// Counts a hit or a miss and marks the path of `found` as recently used.
    fn touch(&mut self, found: Match) -> Match {
        if found.len > 0 {
            self.stats.hits += 1;
            self.stats.matched_tokens += found.tokens as u64;
        } else {
            self.stats.misses += 1;
        }
        self.clock += 1;
        let mut node = found.at.node.index as usize;
        while node != 0 {
            self.nodes[node].last_access = self.clock;
            node = self.nodes[node].parent as usize;
        }
        found
    }

    /// Whether a cached model output (a token with loss mask 1) starts right after `at`, a node
    /// end: a text that goes on past `at` but did not follow it diverged from what the model
    /// produced there.
    pub fn output_follows(&self, at: &Location) -> bool {
        let Some((node, piece, _)) = self.resolve(at) else {
            return false;
        };
        let node = &self.nodes[node];
        piece == node.piece_ends.len()
            && node.children.iter().any(|c| {
                let child = &self.nodes[c.node as usize];
                child.tokens.first().is_some_and(|t| t.loss_mask() == 1)
            })
    }

    /// Like [`RadixTree::lookup`] but changes nothing, not even access times or counters.
    pub fn lookup_read_only(&self, text: &str) -> Match {
        self.find(text.as_bytes(), false)
    }

    /// The tokens from the root to `at`, one slice per node; `None` if `at` went stale.
    pub fn path_tokens(&self, at: &Location) -> Option<Vec<&[Token]>> {
        let (node, _, token) = self.resolve(at)?;
        let mut segments = vec![&self.nodes[node].tokens[..token]];
        let mut up = self.nodes[node].parent as usize;
        while up != 0 {
            segments.push(&self.nodes[up].tokens);
            up = self.nodes[up].parent as usize;
        }
        segments.reverse();
        Some(segments)
    }

    /// Appends the token ids from the root to `at` to `out`; false if `at` went stale.
    pub fn extend_ids(&self, at: &Location, out: &mut Vec<u32>) -> bool {
        let Some(segments) = self.path_tokens(at) else {
            return false;
        };
        for segment in segments {
            out.extend(segment.iter().map(Token::id));
        }
        true
    }

    /// The text from the root to `at`; `None` if `at` went stale.
    pub fn path_text(&self, at: &Location) -> Option<String> {
        let (node, piece, _) = self.resolve(at)?;
        let end = match piece.checked_sub(1) {
            Some(p) => self.nodes[node].piece_ends[p] as usize,
            None => 0,
        };
        let mut parts = vec![&self.nodes[node].text[..end]];
        let mut up = self.nodes[node].parent as usize;
        while up != 0 {
            parts.push(&self.nodes[up].text);
            up = self.nodes[up].parent as usize;
        }
        let bytes: Vec<u8> = parts.into_iter().rev().flatten().copied().collect();
        String::from_utf8(bytes).ok()
    }

    /// Inserts `pieces` at `at` (from a lookup, [`Location::ROOT`] or
    /// [`Location::end_of`]) under weight version `version` (`None`: the newest seen, or
    /// [`DEFAULT_VERSION`]). Returns the node ending exactly at the end of the inserted text,
    /// or `None` if `at` went stale (its node was evicted). That end becomes a segment end
    /// (see [`RadixTree::lookup_segment`]), also when nothing new was stored; inserting no
    /// pieces at the root marks nothing.
    ///
    /// A piece identical (text and ids) to the stored one at the same place is shared. The
    /// stored values are kept (the first writer wins), except that an output of a newer
    /// version gives stored output tokens its logprobs and version (see
    /// [`RadixTree::refresh`]). At the first difference the edge is split at the last common
    /// piece boundary and the rest becomes a new child.
    ///
    /// The insert then evicts. A `version` newer than all seen starts a sweep of the subtrees
    /// of versions no longer kept, which each insert advances by a bounded amount. Least
    /// recently used leaves go while the tree is over its token budget, so the budget holds
    /// after every insert. The path just inserted is the most recently used, so it goes last:
    /// only a trajectory larger than the whole budget evicts itself, and then the returned ref
    /// is already stale.
    pub fn insert(
        &mut self,
        at: &Location,
        pieces: &Pieces<'_>,
        version: Option<&str>,
    ) -> Option<NodeRef> {
        let (mut node, mut piece, mut token) = self.resolve(at)?;
        let (version, newest) = match version {
            Some(name) => self.versions.intern(name),
            None => match self.versions.newest() {
                Some(id) => (id, false),
                None => self.versions.intern(DEFAULT_VERSION),
            },
        };
        let mut next = 0;
        let end = loop {
            if piece < self.nodes[node].piece_ends.len() {
                // Inside an edge: share the stored piece if identical, else split here.
                if next < pieces.len()
                    && let Some(count) = self.same_piece(node, piece, token, pieces, next)
                {
                    self.refresh(node, token, count, pieces, next, version);
                    piece += 1;
                    token += count;
                    next += 1;
                    continue;
                }
                let mid = self.split(node, piece, token);
                if next == pieces.len() {
                    break mid;
                }
                break self.add_child(mid, pieces, next, version);
            }
            if next == pieces.len() {
                break node;
            }
            let shared = self.nodes[node]
                .children_with_first_piece(pieces.piece_text(next))
                .iter()
                .find_map(|c| {
                    let count = self.same_piece(c.node as usize, 0, 0, pieces, next)?;
                    Some((c.node as usize, count))
                });
            match shared {
                Some((child, count)) => {
                    self.refresh(child, 0, count, pieces, next, version);
                    node = child;
                    piece = 1;
                    token = count;
                    next += 1;
                }
                None => break self.add_child(node, pieces, next, version),
            }
        };
        // The root has no token to mark.
        if let Some(last) = self.nodes[end].tokens.last_mut() {
            last.meta |= SEGMENT_END_BIT;
        }
        let result = NodeRef {
            index: end as u32,
            generation: self.nodes[end].generation,
        };
        self.clock += 1;
        let mut up = end;
        while up != 0 {
            let n = &mut self.nodes[up];
            n.last_access = self.clock;
            if self.versions.cmp(version, n.newest_version) == Ordering::Greater {
                n.newest_version = version;
            }
            up = n.parent as usize;
        }
        if newest {
            self.start_sweep();
        }
        self.sweep_versions(self.sweep_work);
        self.evict_lru();
        Some(result)
    }

    /// [`RadixTree::insert`] at the end of `node`; `None` if it was evicted.
    pub fn insert_below(
        &mut self,
        node: NodeRef,
        pieces: &Pieces<'_>,
        version: Option<&str>,
    ) -> Option<NodeRef> {
        self.insert(&Location::end_of(node), pieces, version)
    }

    /// Walks the prefixes of `text` down the tree (see [`RadixTree::lookup`]); with
    /// `segment_ends`, only prefixes ending at a segment end count.
    fn find(&self, text: &[u8], segment_ends: bool) -> Match {
        let mut best = Match {
            len: 0,
            tokens: 0,
            at: Location::ROOT,
        };
        let mut best_access = 0;
        // Usually one child matches, so the walk is a loop; the stack only fills when siblings
        // (different tokenisations of the same text) both match whole.
        let mut next = Some((0usize, 0usize, 0usize));
        let mut stack = Vec::new();
        while let Some((parent, pos, tokens)) = next.take().or_else(|| stack.pop()) {
            self.nodes[parent].children_prefixing(&text[pos..], |child| {
                let node = &self.nodes[child as usize];
                let common = common_prefix_len(&node.text, &text[pos..]);
                let pieces = node.piece_ends.partition_point(|&e| e as usize <= common);
                let Some(last) = pieces.checked_sub(1) else {
                    return;
                };
                let bytes = node.piece_ends[last] as usize;
                let len = pos + bytes;
                let count = tokens + node.token_index(pieces);
                let whole = pieces == node.piece_ends.len();
                // Only the end of an edge can be a segment end.
                let candidate = !segment_ends || (whole && node.ends_segment());
                if candidate
                    && (len > best.len || (len == best.len && node.last_access > best_access))
                {
                    best = Match {
                        len,
                        tokens: count,
                        at: Location {
                            node: NodeRef {
                                index: child,
                                generation: node.generation,
                            },
                            back: (node.text.len() - bytes) as u32,
                        },
                    };
                    best_access = node.last_access;
                }
                if whole {
                    let below = (child as usize, len, count);
                    if next.is_none() {
                        next = Some(below);
                    } else {
                        stack.push(below);
                    }
                }
            });
        }
        best
    }

    /// Turns a location into (node, pieces of its edge before it, tokens before it).
    fn resolve(&self, at: &Location) -> Option<(usize, usize, usize)> {
        if !self.is_live(at.node) {
            return None;
        }
        let mut node = at.node.index as usize;
        let mut back = at.back as usize;
        // Splits since the location was taken may have moved its position into an ancestor.
        while back > 0 && node != 0 && back >= self.nodes[node].text.len() {
            back -= self.nodes[node].text.len();
            node = self.nodes[node].parent as usize;
        }
        let n = &self.nodes[node];
        let offset = n.text.len().checked_sub(back)?;
        let piece = if offset == 0 {
            0
        } else {
            1 + n.piece_ends.binary_search(&(offset as u32)).ok()?
        };
        Some((node, piece, n.token_index(piece)))
    }

    /// Token count of `node`'s piece `piece` (first token `token`) if it equals `pieces[next]`.
    fn same_piece(
        &self,
        node: usize,
        piece: usize,
        token: usize,
        pieces: &Pieces<'_>,
        next: usize,
    ) -> Option<usize> {
        let n = &self.nodes[node];
        let (start, end, count) = n.piece_at(piece, token);
        let ids = pieces.piece_ids(next);
        let same = bytes_eq(&n.text[start..end], pieces.piece_text(next))
            && count == ids.len()
            && n.tokens[token..token + count]
                .iter()
                .zip(ids)
                .all(|(t, &id)| t.id == id);
        same.then_some(count)
    }

    /// Gives the tokens of a shared piece (`count` tokens of `node` from `token`) the values of
    /// `pieces[next]` when that is an output of a newer version than theirs: one text generated
    /// again after a weight update trains on the new weights' logprobs, and a late answer of
    /// older weights does not take them back. Only output over output: a prompt's zeros must
    /// never replace an output's logprobs, and a token stored as prompt stays prompt, since
    /// the trajectory that wrote it reads it so.
    fn refresh(
        &mut self,
        node: usize,
        token: usize,
        count: usize,
        pieces: &Pieces<'_>,
        next: usize,
        version: u32,
    ) {
        if !pieces.loss_mask {
            return;
        }
        let first = pieces.start(next).tokens as usize;
        let stored = &mut self.nodes[node].tokens[token..token + count];
        for (i, t) in stored.iter_mut().enumerate() {
            let newer = self.versions.cmp(version, t.meta & VERSION_MASK) == Ordering::Greater;
            if t.meta & LOSS_MASK_BIT != 0 && newer {
                t.logprob = pieces.logprobs.map_or(0.0, |l| l[first + i]);
                t.meta = (t.meta & !VERSION_MASK) | version;
            }
        }
    }

    fn alloc(&mut self, mut node: Node) -> usize {
        node.live = true;
        self.node_heap_bytes += node.heap_bytes();
        self.stats.nodes += 1;
        self.stats.tokens += node.tokens.len() as u64;
        self.stats.text_bytes += node.text.len() as u64;
        match self.free.pop() {
            Some(slot) => {
                node.generation = self.nodes[slot as usize].generation;
                self.nodes[slot as usize] = node;
                slot as usize
            }
            None => {
                self.nodes.push(node);
                self.nodes.len() - 1
            }
        }
    }

    /// Splits `node` before its piece `piece` (first token `token`): a new node takes the
    /// head of the edge and becomes `node`'s parent, so `node` keeps its end and its refs.
    fn split(&mut self, node: usize, piece: usize, token: usize) -> usize {
        let n = &mut self.nodes[node];
        let before = n.heap_bytes();
        let offset = n.piece_ends[piece - 1];
        let cut = offset as usize;
        let head = Node {
            text: n.text[..cut].into(),
            tokens: n.tokens[..token].into(),
            piece_ends: n.piece_ends[..piece].into(),
            children: vec![Child {
                key: piece_key(&n.text[cut..n.piece_ends[piece] as usize]),
                node: node as u32,
            }],
            parent: n.parent,
            generation: 0,
            last_access: n.last_access,
            newest_version: n.newest_version,
            live: true,
        };
        n.text = n.text[cut..].into();
        n.tokens = n.tokens[token..].into();
        n.piece_ends = n.piece_ends[piece..].iter().map(|e| e - offset).collect();
        let after = n.heap_bytes();
        let parent = n.parent as usize;
        self.node_heap_bytes = self.node_heap_bytes - before + after;
        // alloc() counts the head's tokens and text again; they only moved.
        let (tokens, text) = (head.tokens.len() as u64, head.text.len() as u64);
        let mid = self.alloc(head);
        self.stats.tokens -= tokens;
        self.stats.text_bytes -= text;
        self.nodes[node].parent = mid as u32;
        if let Some(entry) = self.nodes[parent]
            .children
            .iter_mut()
            .find(|c| c.node == node as u32)
        {
            entry.node = mid as u32;
        }
        mid
    }

    /// Adds `pieces[from..]` as a new child of `parent`.
    fn add_child(
        &mut self,
        parent: usize,
        pieces: &Pieces<'_>,
        from: usize,
        version: u32,
    ) -> usize {
        let start = pieces.start(from);
        let text = &pieces.text.as_bytes()[start.text as usize..];
        let ids = &pieces.ids[start.tokens as usize..];
        let mask = if pieces.loss_mask { LOSS_MASK_BIT } else { 0 };
        let mut tokens = Vec::with_capacity(ids.len());
        let mut piece_ends = Vec::with_capacity(pieces.len() - from);
        let mut piece_start = 0;
        for (i, &id) in ids.iter().enumerate() {
            let absolute = start.tokens as usize + i;
            let starts = i == piece_start;
            let logprob = pieces.logprobs.map_or(0.0, |l| l[absolute]);
            let flag = if starts { PIECE_START_BIT } else { 0 };
            tokens.push(Token {
                id,
                logprob,
                meta: mask | flag | version,
            });
            let end = pieces.ends[from + piece_ends.len()];
            if absolute + 1 == end.tokens as usize {
                piece_ends.push(end.text - start.text);
                piece_start = i + 1;
            }
        }
        self.stats.inserted_tokens += tokens.len() as u64;
        let key = piece_key(&text[..piece_ends[0] as usize]);
        let child = self.alloc(Node {
            text: text.into(),
            tokens: tokens.into(),
            piece_ends: piece_ends.into(),
            children: Vec::new(),
            parent: parent as u32,
            generation: 0,
            last_access: self.clock,
            newest_version: version,
            live: true,
        });
        let p = &mut self.nodes[parent];
        let before = p.children.capacity();
        // After same-key siblings: lookups break ties by access time, not position.
        let at = p.children.partition_point(|c| c.key <= key);
        p.children.insert(
            at,
            Child {
                key,
                node: child as u32,
            },
        );
        self.node_heap_bytes += (p.children.capacity() - before) * std::mem::size_of::<Child>();
        child
    }

    /// Frees a childless node. Returns its token count.
    fn free_node(&mut self, node: usize) -> usize {
        let generation = self.nodes[node].generation.wrapping_add(1);
        let old = std::mem::replace(&mut self.nodes[node], Node::vacant(generation));
        self.node_heap_bytes -= old.heap_bytes();
        self.stats.nodes -= 1;
        self.stats.tokens -= old.tokens.len() as u64;
        self.stats.text_bytes -= old.text.len() as u64;
        let siblings = &mut self.nodes[old.parent as usize].children;
        if let Some(i) = siblings.iter().position(|c| c.node == node as u32) {
            siblings.remove(i);
        }
        self.free.push(node as u32);
        old.tokens.len()
    }

    /// Starts a sweep for the newest `keep_versions` versions, replacing an unfinished one:
    /// what the old sweep would have dropped is older still, so the new one finds it again.
    fn start_sweep(&mut self) {
        let Some(keep) = self.config.keep_versions.filter(|&k| k > 0) else {
            return;
        };
        let Some(oldest_kept) = self.versions.order.len().checked_sub(keep) else {
            return;
        };
        self.sweep = Some(Sweep {
            keep_from: self.versions.order[oldest_kept],
            walk: vec![(0, 0)],
            doomed: Vec::new(),
        });
    }

    /// Advances the version sweep by about `work` nodes visited or freed.
    ///
    /// A node's newest version is at least its descendants', so a node too old has only old
    /// descendants and the walk stops there. Between calls inserts may refresh a doomed node
    /// (an insert through it stamps the new version on its whole path), so each node is
    /// checked again just before it is freed.
    fn sweep_versions(&mut self, work: usize) {
        let Some(mut sweep) = self.sweep.take() else {
            return;
        };
        let too_old = |tree: &Self, node: usize| {
            tree.versions
                .cmp(tree.nodes[node].newest_version, sweep.keep_from)
                == Ordering::Less
        };
        let mut done = 0;
        while done < work {
            if let Some((index, generation)) = sweep.doomed.pop() {
                done += 1;
                let node = index as usize;
                let n = &self.nodes[node];
                if n.live
                    && n.generation == generation
                    && n.children.is_empty()
                    && too_old(self, node)
                {
                    let tokens = self.free_node(node);
                    self.stats.version_evicted_nodes += 1;
                    self.stats.version_evicted_tokens += tokens as u64;
                }
                continue;
            }
            let Some((index, generation)) = sweep.walk.pop() else {
                // Finished.
                return;
            };
            let n = &self.nodes[index as usize];
            if !n.live || n.generation != generation {
                continue;
            }
            for child in &n.children {
                done += 1;
                let c = child.node as usize;
                let entry = (child.node, self.nodes[c].generation);
                if !too_old(self, c) {
                    sweep.walk.push(entry);
                    continue;
                }
                // The whole subtree, parents first; popping from the end frees children first.
                let start = sweep.doomed.len();
                sweep.doomed.push(entry);
                let mut i = start;
                while let Some(&(node, _)) = sweep.doomed.get(i) {
                    for grandchild in &self.nodes[node as usize].children {
                        let g = grandchild.node;
                        sweep.doomed.push((g, self.nodes[g as usize].generation));
                    }
                    i += 1;
                }
            }
        }
        self.sweep = Some(sweep);
    }

    /// Evicts least recently used leaves (and parents that become leaves) until the tree is
    /// within its budget, then up to [`LRU_EXTRA_PER_INSERT`] more toward 90% of it, so that
    /// most inserts evict nothing.
    fn evict_lru(&mut self) {
        let max = self.config.max_tokens as u64;
        if self.stats.tokens <= max {
            return;
        }
        let target = max - max / 10;
        let mut extra = 0;
        let mut rebuilt = false;
        loop {
            let tokens = self.stats.tokens;
            if tokens <= target || (tokens <= max && extra >= LRU_EXTRA_PER_INSERT) {
                break;
            }
            if tokens <= max {
                extra += 1;
            }
            let Some(Reverse((access, index, generation))) = self.lru.pop() else {
                if rebuilt {
                    break;
                }
                // One scan refills the candidates for many inserts.
                self.lru = self
                    .nodes
                    .iter()
                    .enumerate()
                    .skip(1)
                    .filter(|(_, n)| n.live && n.children.is_empty())
                    .map(|(i, n)| Reverse((n.last_access, i as u32, n.generation)))
                    .collect();
                rebuilt = true;
                continue;
            };
            let n = &self.nodes[index as usize];
            if !n.live || n.generation != generation || !n.children.is_empty() {
                continue;
            }
            if n.last_access != access {
                // Used since the heap was built: back in at its new time.
                self.lru.push(Reverse((n.last_access, index, generation)));
                continue;
            }
            let parent = n.parent;
            let tokens = self.free_node(index as usize);
            self.stats.evicted_nodes += 1;
            self.stats.evicted_tokens += tokens as u64;
            let p = &self.nodes[parent as usize];
            if parent != 0 && p.children.is_empty() {
                self.lru
                    .push(Reverse((p.last_access, parent, p.generation)));
            }
        }
    }
}
