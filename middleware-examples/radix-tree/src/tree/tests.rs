//! Unit tests, a property test against a naive reference model, and an ignored benchmark
//! (`cargo test --release -- --ignored --nocapture bench`).

use super::*;

/// Checks every structural invariant and the incremental counters.
fn check(tree: &RadixTree) {
    let (mut nodes, mut tokens, mut text, mut heap) = (0u64, 0u64, 0u64, 0usize);
    for (i, n) in tree.nodes.iter().enumerate() {
        if !n.live {
            assert_ne!(i, 0, "root freed");
            assert!(n.text.is_empty() && n.tokens.is_empty() && n.children.is_empty());
            assert!(
                tree.free.contains(&(i as u32)),
                "vacant slot {i} not in free list"
            );
            continue;
        }
        heap += n.heap_bytes();
        for pair in n.children.windows(2) {
            assert!(pair[0].key <= pair[1].key, "children unsorted");
        }
        for (a, c) in n.children.iter().enumerate() {
            let child = &tree.nodes[c.node as usize];
            assert!(child.live, "dead child");
            assert_eq!(child.parent as usize, i, "parent pointer");
            let first = &child.text[..child.piece_ends[0] as usize];
            assert_eq!(piece_key(first), c.key, "child key");
            if i != 0 {
                assert_ne!(
                    tree.versions.cmp(n.newest_version, child.newest_version),
                    Ordering::Less,
                    "parent older than child"
                );
            }
            for d in &n.children[a + 1..] {
                let other = &tree.nodes[d.node as usize];
                let (s1, e1, c1) = child.piece_at(0, 0);
                let (s2, e2, c2) = other.piece_at(0, 0);
                let same = child.text[s1..e1] == other.text[s2..e2]
                    && child.tokens[..c1]
                        .iter()
                        .map(Token::id)
                        .eq(other.tokens[..c2].iter().map(Token::id));
                assert!(!same, "siblings share an identical first piece");
            }
        }
        if i == 0 {
            continue;
        }
        nodes += 1;
        tokens += n.tokens.len() as u64;
        text += n.text.len() as u64;
        let edge = std::str::from_utf8(&n.text).expect("edge is UTF-8");
        assert!(!edge.is_empty() && !n.tokens.is_empty());
        let mut prev = 0;
        for &e in n.piece_ends.iter() {
            assert!(e > prev && edge.is_char_boundary(e as usize), "piece ends");
            prev = e;
        }
        assert_eq!(prev as usize, edge.len(), "last piece end");
        assert!(n.tokens[0].starts_piece());
        let (last, inner) = n.tokens.split_last().expect("non-empty edge");
        assert!(
            !inner.iter().any(Token::ends_segment),
            "segment end inside an edge"
        );
        assert_eq!(n.ends_segment(), last.ends_segment());
        let starts = n.tokens.iter().filter(|t| t.starts_piece()).count();
        assert_eq!(starts, n.piece_ends.len(), "piece starts");
        assert!(n.last_access <= tree.nodes[n.parent as usize].last_access || n.parent == 0);
    }
    assert_eq!(tree.stats.nodes, nodes, "node count");
    assert_eq!(tree.stats.tokens, tokens, "token count");
    assert_eq!(tree.stats.text_bytes, text, "text count");
    assert_eq!(tree.node_heap_bytes, heap, "heap bytes");
    assert!(
        tree.stats.tokens <= tree.config.max_tokens as u64,
        "over budget"
    );
}

/// Owned input for `Pieces`.
#[derive(Clone, Debug, Default)]
struct Owned {
    text: String,
    ids: Vec<u32>,
    logprobs: Vec<f32>,
    ends: Vec<PieceEnd>,
}

impl Owned {
    fn of(parts: &[(&str, &[u32])]) -> Self {
        let mut o = Owned::default();
        for (text, ids) in parts {
            o.push(text, ids, -0.5);
        }
        o
    }

    fn push(&mut self, text: &str, ids: &[u32], logprob: f32) {
        self.text.push_str(text);
        self.ids.extend_from_slice(ids);
        self.logprobs.extend(ids.iter().map(|_| logprob));
        self.ends.push(PieceEnd {
            text: self.text.len() as u32,
            tokens: self.ids.len() as u32,
        });
    }

    fn pieces(&self, mask: bool) -> Pieces<'_> {
        Pieces::new(&self.text, &self.ids, &self.ends)
            .and_then(|p| p.with_logprobs(&self.logprobs))
            .expect("valid pieces")
            .with_loss_mask(mask)
    }
}

fn big() -> Config {
    Config {
        max_tokens: usize::MAX,
        keep_versions: None,
    }
}

fn ids_at(tree: &RadixTree, at: &Location) -> Vec<u32> {
    let mut out = Vec::new();
    assert!(tree.extend_ids(at, &mut out));
    out
}

fn entries_at(tree: &RadixTree, at: &Location) -> Vec<(u32, f32, u8)> {
    tree.path_tokens(at)
        .expect("live location")
        .into_iter()
        .flatten()
        .map(|t| (t.id(), t.logprob(), t.loss_mask()))
        .collect()
}

#[test]
fn pieces_from_lengths_groups_tokens() {
    // "aé" + EOS: é split over two byte tokens, EOS has no text.
    let text = "aéb";
    let ids = [1, 2, 3, 4, 99];
    let ends = pieces_from_lengths(text, &ids, &[1, 1, 1, 1, 0]);
    let expect = [(1, 1), (3, 3), (4, 5)].map(|(t, k)| PieceEnd { text: t, tokens: k });
    assert_eq!(ends, expect);
    // A leading special token joins the next piece.
    let ends = pieces_from_lengths("ab", &[7, 1, 2], &[0, 1, 1]);
    assert_eq!(ends[0], PieceEnd { text: 1, tokens: 2 });
    // Inconsistent lengths: one piece.
    let whole = vec![PieceEnd { text: 3, tokens: 2 }];
    assert_eq!(pieces_from_lengths("abc", &[1, 2], &[1, 1]), whole);
    assert_eq!(pieces_from_lengths("abc", &[1, 2], &[1]), whole);
    assert_eq!(pieces_from_lengths("abc", &[1, 2], &[4, 0]), whole);
    assert_eq!(pieces_from_lengths("abc", &[1, 2], &[0, 0]), whole);
    assert!(pieces_from_lengths("", &[1], &[0]).is_empty());
    assert!(pieces_from_lengths("a", &[], &[]).is_empty());
}

#[test]
fn common_prefix_lengths() {
    let a = b"abcdefghijklmnopqrstuvwxyz";
    for n in 0..=a.len() {
        let mut b = a.to_vec();
        if n < b.len() {
            b[n] ^= 1;
        }
        assert_eq!(common_prefix_len(a, &b), n);
        assert_eq!(common_prefix_len(&a[..n], a), n);
    }
}

#[test]
fn pieces_validation() {
    let ends = [PieceEnd { text: 1, tokens: 1 }];
    assert!(
        Pieces::new("é", &[1], &ends).is_none(),
        "not a char boundary"
    );
    assert!(
        Pieces::new("ab", &[1], &ends).is_none(),
        "does not cover text"
    );
    assert!(
        Pieces::new("a", &[1, 2], &ends).is_none(),
        "does not cover ids"
    );
    assert!(Pieces::new("a", &[1], &ends).is_some());
    assert!(Pieces::new("", &[], &[]).is_some());
    let zero = [PieceEnd { text: 0, tokens: 1 }];
    assert!(Pieces::new("", &[1], &zero).is_none(), "empty piece text");
    let p = Pieces::new("a", &[1], &ends).expect("valid");
    assert!(p.with_logprobs(&[0.1, 0.2]).is_none());
}

#[test]
fn a_newer_output_refreshes_shared_output_tokens() {
    let mut tree = RadixTree::new(big());
    let prompt = Owned::of(&[("P:", &[7])]);
    let p = tree
        .insert(&Location::ROOT, &prompt.pieces(false), Some("1"))
        .expect("insert");
    let output = |logprob| {
        let mut o = Owned::default();
        o.push("ab", &[1], logprob);
        o.push("cd", &[2, 3], logprob);
        o
    };
    let v1 = output(-1.0);
    let end = tree
        .insert_below(p, &v1.pieces(true), Some("1"))
        .expect("insert");
    // The same output under version 2, then a late one of version 1.
    tree.insert_below(p, &output(-2.0).pieces(true), Some("2"));
    tree.insert_below(p, &output(-3.0).pieces(true), Some("1"));
    let got = entries_at(&tree, &Location::end_of(end));
    assert_eq!(
        got,
        [(7, -0.5, 0), (1, -2.0, 1), (2, -2.0, 1), (3, -2.0, 1)]
    );
    let tokens = tree.path_tokens(&Location::end_of(end)).expect("live");
    assert_eq!(tree.version_name(tokens[1][2].version()), Some("2"));
    // A newer prompt through them changes nothing, nor does an output over prompt tokens.
    let mut again = Owned::of(&[("P:", &[7])]);
    again.push("ab", &[1], 0.0);
    tree.insert(&Location::ROOT, &again.pieces(false), Some("3"));
    tree.insert(&Location::ROOT, &output(-4.0).pieces(false), Some("3"));
    tree.insert(&Location::ROOT, &output(-5.0).pieces(true), Some("4"));
    assert_eq!(entries_at(&tree, &Location::end_of(end)), got);
    let m = tree.lookup("abcd");
    assert_eq!(
        entries_at(&tree, &m.at),
        [(1, -4.0, 0), (2, -4.0, 0), (3, -4.0, 0)]
    );
}

#[test]
fn split_mid_edge_and_node_ref_survives() {
    let mut tree = RadixTree::new(big());
    let a = Owned::of(&[("hello", &[1]), (" world", &[2]), ("!", &[3])]);
    let leaf = tree
        .insert(&Location::ROOT, &a.pieces(true), Some("1"))
        .expect("insert");
    assert_eq!(tree.stats().nodes, 1);

    let m = tree.lookup("hello there");
    assert_eq!((m.len, m.tokens), (5, 1));
    let tail = Owned::of(&[(" there", &[4])]);
    let b = tree
        .insert(&m.at, &tail.pieces(false), None)
        .expect("insert");
    check(&tree);
    assert_eq!(tree.stats().nodes, 3, "split into hello / world! / there");
    // The old leaf keeps its identity and its full path.
    assert!(tree.is_live(leaf));
    assert_eq!(ids_at(&tree, &Location::end_of(leaf)), [1, 2, 3]);
    assert_eq!(
        tree.path_text(&Location::end_of(leaf)).as_deref(),
        Some("hello world!")
    );
    assert_eq!(ids_at(&tree, &Location::end_of(b)), [1, 4]);
    // The prompt got the newest version, "1".
    let tokens = tree.path_tokens(&Location::end_of(b)).expect("live");
    let v = tokens[1][0].version();
    assert_eq!(tree.version_name(v), Some("1"));

    // Inserting a prefix ending mid-edge splits again and returns the new middle node.
    let prefix = Owned::of(&[("hello", &[1]), (" world", &[2])]);
    let mid = tree
        .insert(&Location::ROOT, &prefix.pieces(false), None)
        .expect("insert");
    check(&tree);
    assert_eq!(tree.stats().nodes, 4);
    assert_eq!(
        tree.path_text(&Location::end_of(mid)).as_deref(),
        Some("hello world")
    );
    assert!(tree.is_live(leaf) && tree.is_live(b));
    assert_eq!(ids_at(&tree, &Location::end_of(leaf)), [1, 2, 3]);
    // Shared pieces keep the first writer's values: mask 1 and logprob -0.5.
    let e = entries_at(&tree, &Location::end_of(mid));
    assert_eq!(e, [(1, -0.5, 1), (2, -0.5, 1)]);
    // Nothing new was stored for the shared prefix.
    assert_eq!(tree.stats().tokens, 4);
}

#[test]
fn stale_location_after_split_still_resolves() {
    let mut tree = RadixTree::new(big());
    let a = Owned::of(&[("ab", &[1]), ("cd", &[2]), ("ef", &[3])]);
    tree.insert(&Location::ROOT, &a.pieces(false), None);
    let m = tree.lookup("abcdxx");
    assert_eq!(m.len, 4);
    // Split the same edge above the location before using it.
    let other = Owned::of(&[("ab", &[1]), ("zz", &[9])]);
    tree.insert(&Location::ROOT, &other.pieces(false), None);
    let tail = Owned::of(&[("xx", &[5])]);
    let r = tree
        .insert(&m.at, &tail.pieces(false), None)
        .expect("insert");
    check(&tree);
    assert_eq!(ids_at(&tree, &Location::end_of(r)), [1, 2, 5]);
}

#[test]
fn sibling_conflicts_share_first_byte() {
    let mut tree = RadixTree::new(big());
    // Two tokenisations of overlapping text with no common token boundary.
    let a = Owned::of(&[("hello", &[1])]);
    let b = Owned::of(&[("help", &[2]), ("er", &[3])]);
    let ra = tree.insert(&Location::ROOT, &a.pieces(false), None);
    let rb = tree.insert(&Location::ROOT, &b.pieces(false), None);
    check(&tree);
    assert_eq!(tree.nodes[0].children.len(), 2);
    assert_eq!(tree.lookup("hello world").len, 5);
    assert_eq!(tree.lookup("helper").len, 6);
    assert_eq!(tree.lookup("hel").len, 0);
    // Same first piece text, different ids: still siblings, never merged.
    let c = Owned::of(&[("hello", &[7])]);
    let rc = tree.insert(&Location::ROOT, &c.pieces(false), None);
    check(&tree);
    assert_eq!(tree.nodes[0].children.len(), 3);
    assert!(ra.is_some() && rb.is_some() && rc.is_some());
    // Identical first piece: shared, no new node.
    let d = Owned::of(&[("hello", &[1])]);
    assert_eq!(tree.insert(&Location::ROOT, &d.pieces(false), None), ra);
    assert_eq!(tree.stats().nodes, 3);
}

#[test]
fn wide_nodes_find_every_sibling() {
    // Siblings whose first pieces are prefixes of each other (" ab", " abab", ...), longer than
    // a key covers (300 bytes, the first 255 shared), or the same text under other ids.
    let mut tree = RadixTree::new(big());
    let prompt = Owned::of(&[("P", &[1])]);
    let root = tree
        .insert(&Location::ROOT, &prompt.pieces(false), None)
        .expect("live");
    let mut firsts: Vec<String> = (1..=40).map(|n| format!(" {}", "ab".repeat(n))).collect();
    firsts.extend([" y", " z", " é"].map(String::from));
    firsts.extend(['a', 'b'].map(|c| format!(" {}{c}", "x".repeat(298))));
    let mut samples = Vec::new();
    for (i, first) in firsts.iter().enumerate() {
        for alt in 0..2 {
            let first_id = 100 + 2 * i as u32 + alt;
            let tail = format!(" tail{i}");
            let out = Owned::of(&[(first.as_str(), &[first_id]), (tail.as_str(), &[7])]);
            let end = tree
                .insert_below(root, &out.pieces(true), None)
                .expect("live");
            samples.push((format!("P{first}{tail}"), first_id, end, out));
        }
    }
    check(&tree);
    assert_eq!(
        tree.nodes[root.index as usize].children.len(),
        2 * firsts.len()
    );
    for (text, first_id, end, out) in &samples {
        // Found whole; of two tokenisations of the same text, the most recently used.
        let found = tree.lookup_read_only(text);
        assert_eq!(found.len, text.len(), "{text}");
        let ids = ids_at(&tree, &found.at);
        assert_eq!((ids.len(), ids[1] / 2), (3, first_id / 2), "{text}");
        // Inserting a sample again finds its child and shares everything.
        let nodes = tree.stats().nodes;
        assert_eq!(tree.insert_below(root, &out.pieces(true), None), Some(*end));
        assert_eq!(tree.stats().nodes, nodes);
    }
    // The longest whole first piece wins: " ab", " abab", " ababab" all prefix the query.
    assert_eq!(tree.lookup_read_only("P abababzz").len, "P ababab".len());
    check(&tree);
}

#[test]
fn ties_go_to_most_recently_used() {
    let mut tree = RadixTree::new(big());
    let a = Owned::of(&[("hel", &[1]), ("lo", &[2])]);
    let b = Owned::of(&[("he", &[3]), ("llo", &[4])]);
    tree.insert(&Location::ROOT, &a.pieces(false), None);
    tree.insert(&Location::ROOT, &b.pieces(false), None);
    let m = tree.lookup("hello!");
    assert_eq!(ids_at(&tree, &m.at), [3, 4], "b inserted last");
    // Only a matches "hel" whole; that touches a.
    assert_eq!(tree.lookup("hel").len, 3);
    let m = tree.lookup_read_only("hello!");
    assert_eq!(ids_at(&tree, &m.at), [1, 2]);
}

#[test]
fn read_only_lookup_changes_nothing() {
    let mut tree = RadixTree::new(big());
    let a = Owned::of(&[("ab", &[1]), ("c", &[2])]);
    tree.insert(&Location::ROOT, &a.pieces(true), None);
    let before: Vec<u64> = tree.nodes.iter().map(|n| n.last_access).collect();
    let stats = tree.stats();
    let m = tree.lookup_read_only("abcd");
    assert_eq!((m.len, m.tokens), (3, 2));
    let after: Vec<u64> = tree.nodes.iter().map(|n| n.last_access).collect();
    assert_eq!(before, after);
    assert_eq!(stats, tree.stats());
    assert_eq!(tree.lookup_read_only("a").len, 0, "mid-piece is no match");
}

#[test]
fn multi_token_pieces_split_only_between_pieces() {
    let mut tree = RadixTree::new(big());
    // "é" is two byte tokens; EOS joins "!".
    let a = Owned::of(&[("a", &[1]), ("é", &[2, 3]), ("!", &[4, 99])]);
    tree.insert(&Location::ROOT, &a.pieces(true), None);
    let m = tree.lookup("aéx");
    assert_eq!((m.len, m.tokens), (3, 3));
    let tail = Owned::of(&[("x", &[5])]);
    let r = tree
        .insert(&m.at, &tail.pieces(false), None)
        .expect("insert");
    check(&tree);
    assert_eq!(ids_at(&tree, &Location::end_of(r)), [1, 2, 3, 5]);
    assert_eq!(tree.lookup("aé!").tokens, 5);
}

#[test]
fn lru_eviction_keeps_budget_and_invalidates_refs() {
    let mut tree = RadixTree::new(Config {
        max_tokens: 10,
        keep_versions: None,
    });
    let old = Owned::of(&[("a", &[1]), ("b", &[2]), ("c", &[3])]);
    let r_old = tree
        .insert(&Location::ROOT, &old.pieces(false), None)
        .expect("insert");
    let warm = Owned::of(&[("x", &[4]), ("y", &[5]), ("z", &[6])]);
    let r_warm = tree
        .insert(&Location::ROOT, &warm.pieces(false), None)
        .expect("insert");
    tree.lookup("abc");
    tree.lookup("xyz");
    // Pushes the total to 11 > 10: evicts down to 9, oldest first ("abc").
    let new = Owned::of(&[
        ("m", &[7]),
        ("n", &[8]),
        ("o", &[9]),
        ("p", &[10]),
        ("q", &[12]),
    ]);
    let r_new = tree
        .insert(&Location::ROOT, &new.pieces(false), None)
        .expect("insert");
    check(&tree);
    assert!(!tree.is_live(r_old), "LRU leaf evicted");
    assert!(tree.is_live(r_warm) && tree.is_live(r_new));
    assert_eq!(tree.stats().tokens, 8);
    assert_eq!(tree.stats().evicted_tokens, 3);
    assert_eq!(tree.insert_below(r_old, &Pieces::EMPTY, None), None);
    assert_eq!(tree.path_tokens(&Location::end_of(r_old)), None);
    // The slot is reused with a new generation: the old ref stays stale.
    let again = Owned::of(&[("q", &[11])]);
    let r = tree
        .insert(&Location::ROOT, &again.pieces(false), None)
        .expect("insert");
    assert_eq!(r.index, r_old.index);
    assert_ne!(r.generation, r_old.generation);
    assert!(!tree.is_live(r_old));

    // A trajectory larger than the whole budget evicts itself: bound held, ref stale.
    let huge = Owned::of(&[("h", &[1; 11])]);
    let r_huge = tree
        .insert(&Location::ROOT, &huge.pieces(false), None)
        .expect("insert");
    check(&tree);
    assert!(!tree.is_live(r_huge));
}

#[test]
fn parents_evicted_after_their_leaves() {
    let mut tree = RadixTree::new(Config {
        max_tokens: 10,
        keep_versions: None,
    });
    let a = Owned::of(&[("a", &[1]), ("b", &[2])]);
    let ra = tree
        .insert(&Location::ROOT, &a.pieces(false), None)
        .expect("insert");
    let tail = Owned::of(&[("c", &[3])]);
    let rc = tree
        .insert_below(ra, &tail.pieces(false), None)
        .expect("ok");
    let other = Owned::of(&[("z", &[9]), ("y", &[8]), ("x", &[7])]);
    tree.insert(&Location::ROOT, &other.pieces(false), None);
    // 6 tokens; 5 more make 11 > 10: evicts "c" (LRU leaf) then "ab" (now a leaf, older
    // than "zyx") down to 9.
    let more = Owned::of(&[("q", &[5; 5])]);
    tree.insert(&Location::ROOT, &more.pieces(false), None);
    check(&tree);
    assert!(!tree.is_live(rc) && !tree.is_live(ra));
    assert_eq!(tree.stats().tokens, 8);
}

#[test]
fn version_eviction_drops_old_subtrees() {
    let mut tree = RadixTree::new(Config {
        max_tokens: usize::MAX,
        keep_versions: Some(2),
    });
    let prompt = Owned::of(&[("sys", &[1])]);
    let p = tree
        .insert(&Location::ROOT, &prompt.pieces(false), Some("1"))
        .expect("insert");
    let o1 = Owned::of(&[("one", &[11])]);
    let r1 = tree
        .insert_below(p, &o1.pieces(true), Some("1"))
        .expect("ok");
    let o2 = Owned::of(&[("two", &[12])]);
    let r2 = tree
        .insert_below(p, &o2.pieces(true), Some("2"))
        .expect("ok");
    let o10 = Owned::of(&[("ten", &[13])]);
    // "10" > "2" numerically, so 1 falls out of the newest two.
    let r10 = tree
        .insert_below(p, &o10.pieces(true), Some("10"))
        .expect("ok");
    check(&tree);
    assert!(!tree.is_live(r1), "version 1 evicted");
    assert!(tree.is_live(p) && tree.is_live(r2) && tree.is_live(r10));
    assert_eq!(tree.stats().version_evicted_tokens, 1);
    assert_eq!(tree.newest_version(), Some("10"));
    // An older integer version arriving late is not newer than all: no eviction.
    let o5 = Owned::of(&[("five", &[15])]);
    let r5 = tree
        .insert_below(p, &o5.pieces(true), Some("5"))
        .expect("ok");
    assert!(tree.is_live(r2) && tree.is_live(r5));
    // 11 arrives: the newest two are 10 and 11; 2 and 5 go, the shared prompt stays.
    let o11 = Owned::of(&[("eleven", &[16])]);
    tree.insert_below(p, &o11.pieces(true), Some("11"));
    check(&tree);
    assert!(!tree.is_live(r2) && !tree.is_live(r5));
    assert!(tree.is_live(p) && tree.is_live(r10));
    // A whole old trajectory goes, root-level node included.
    let lone = Owned::of(&[("lone", &[20])]);
    let rl = tree
        .insert(&Location::ROOT, &lone.pieces(true), Some("11"))
        .expect("insert");
    tree.insert_below(p, &o11.pieces(true), Some("12"));
    tree.insert_below(p, &o11.pieces(true), Some("13"));
    check(&tree);
    assert!(!tree.is_live(rl));
}

#[test]
fn version_sweep_spans_inserts_and_spares_refreshed_nodes() {
    let mut tree = RadixTree::new(Config {
        max_tokens: usize::MAX,
        keep_versions: Some(1),
    });
    tree.sweep_work = 1;
    let mut refs = Vec::new();
    for word in ["a", "b", "c", "d", "e"] {
        let o = Owned::of(&[(word, &[1]), ("x", &[2]), ("y", &[3])]);
        refs.push(
            tree.insert(&Location::ROOT, &o.pieces(false), Some("1"))
                .expect("insert"),
        );
    }
    let z = Owned::of(&[("z", &[9])]);
    tree.insert(&Location::ROOT, &z.pieces(false), Some("2"));
    assert!(
        tree.sweep.is_some(),
        "one unit of work per insert: still sweeping"
    );
    // Extending an old trajectory at the new version refreshes its whole path.
    let more = Owned::of(&[("m", &[7])]);
    let kept = tree.insert_below(refs[4], &more.pieces(false), Some("2"));
    for _ in 0..20 {
        tree.insert_below(NodeRef::ROOT, &z.pieces(false), Some("2"));
        check(&tree);
    }
    assert!(tree.sweep.is_none());
    assert!(refs[..4].iter().all(|r| !tree.is_live(*r)));
    assert!(tree.is_live(refs[4]) && kept.is_some_and(|k| tree.is_live(k)));
    assert_eq!(tree.stats().version_evicted_tokens, 12);
}

#[test]
fn lru_heap_tracks_reuse_between_inserts() {
    let mut tree = RadixTree::new(Config {
        max_tokens: 6,
        keep_versions: None,
    });
    let a = Owned::of(&[("a", &[1, 1])]);
    let b = Owned::of(&[("b", &[2, 2])]);
    let c = Owned::of(&[("c", &[3, 3])]);
    let ra = tree.insert(&Location::ROOT, &a.pieces(false), None);
    let rb = tree.insert(&Location::ROOT, &b.pieces(false), None);
    let rc = tree.insert(&Location::ROOT, &c.pieces(false), None);
    // Over budget: builds the heap and evicts "a" (oldest).
    let d = Owned::of(&[("d", &[4])]);
    tree.insert(&Location::ROOT, &d.pieces(false), None);
    assert!(!tree.is_live(ra.expect("ref")));
    // "b" is used after the heap was built: "c" must go before it.
    tree.lookup("b");
    let e = Owned::of(&[("e", &[5, 5])]);
    tree.insert(&Location::ROOT, &e.pieces(false), None);
    check(&tree);
    assert!(tree.is_live(rb.expect("ref")) && !tree.is_live(rc.expect("ref")));
}

#[test]
fn version_order_rules() {
    let mut v = Versions::default();
    assert_eq!(v.intern("default"), (0, true));
    assert_eq!(v.intern("2"), (1, true));
    assert_eq!(v.intern("10"), (2, true));
    assert_eq!(v.intern("9"), (3, false));
    assert_eq!(v.intern("abc"), (4, true));
    assert_eq!(v.intern("9"), (3, false));
    let order: Vec<&str> = v.order.iter().map(|&i| &*v.names[i as usize]).collect();
    assert_eq!(order, ["default", "2", "9", "10", "abc"]);
    // Inconsistent inputs still give a total order: 12, default, 5.
    let mut w = Versions::default();
    w.intern("12");
    w.intern("default");
    assert!(w.intern("5").1, "after a non-integer, appearance decides");
}

#[test]
fn empty_insert_returns_location_node() {
    let mut tree = RadixTree::new(big());
    assert_eq!(
        tree.insert(&Location::ROOT, &Pieces::EMPTY, None),
        Some(NodeRef::ROOT)
    );
    let a = Owned::of(&[("ab", &[1]), ("cd", &[2])]);
    let r = tree.insert(&Location::ROOT, &a.pieces(false), None);
    assert_eq!(tree.insert_below(r.expect("ok"), &Pieces::EMPTY, None), r);
    let m = tree.lookup("abzz");
    let mid = tree.insert(&m.at, &Pieces::EMPTY, None).expect("insert");
    check(&tree);
    assert_eq!(ids_at(&tree, &Location::end_of(mid)), [1]);
    assert_eq!(
        NodeRef::from_bytes(mid.to_bytes()),
        mid,
        "byte round trip for stashes"
    );
}

/// Token counts from the root at which the path to `at` has a segment end.
fn marks_at(tree: &RadixTree, at: &Location) -> Vec<usize> {
    tree.path_tokens(at)
        .expect("live location")
        .into_iter()
        .flatten()
        .enumerate()
        .filter(|(_, t)| t.ends_segment())
        .map(|(i, _)| i + 1)
        .collect()
}

#[test]
fn segment_marks_survive_splits_and_descendant_eviction() {
    let mut tree = RadixTree::new(Config {
        max_tokens: 12,
        keep_versions: None,
    });
    let a = Owned::of(&[
        ("a", &[1]),
        ("b", &[2]),
        ("c", &[3]),
        ("d", &[4]),
        ("e", &[5]),
        ("f", &[6]),
    ]);
    let ra = tree
        .insert(&Location::ROOT, &a.pieces(false), Some("7"))
        .expect("insert");
    let end = Location::end_of(ra);
    assert_eq!(marks_at(&tree, &end), [6]);
    // The mark is a flag beside the version, not part of it.
    let last = *tree.path_tokens(&end).expect("live")[0]
        .last()
        .expect("token");
    assert!(last.ends_segment());
    assert_eq!(tree.version_name(last.version()), Some("7"));
    // Inside the segment the piece lookup goes on, the segment lookup does not.
    assert_eq!(tree.lookup("abcdxx").len, 4);
    let miss = Match {
        len: 0,
        tokens: 0,
        at: Location::ROOT,
    };
    assert_eq!(tree.lookup_segment("abcdxx"), miss);
    assert_eq!(tree.lookup_segment("abcde"), miss);
    let m = tree.lookup_segment("abcdefg");
    assert_eq!((m.len, m.tokens, m.at), (6, 6, end));

    // A prompt ending mid-edge splits it and marks the head; the old mark stays at the end.
    let ab = Owned::of(&[("a", &[1]), ("b", &[2])]);
    let rab = tree
        .insert(&Location::ROOT, &ab.pieces(false), None)
        .expect("insert");
    check(&tree);
    assert_eq!(marks_at(&tree, &end), [2, 6]);
    assert_eq!(tree.lookup_segment("abcdxx").len, 2);
    // A split below both marks ("cdef" -> "cd" / "ef") adds no mark of its own.
    let zz = Owned::of(&[("c", &[3]), ("d", &[4]), ("zz", &[8, 9])]);
    let rzz = tree.insert_below(rab, &zz.pieces(false), None).expect("ok");
    check(&tree);
    assert_eq!(tree.stats().nodes, 4);
    assert_eq!(marks_at(&tree, &end), [2, 6]);
    assert_eq!(marks_at(&tree, &Location::end_of(rzz)), [2, 6]);
    assert_eq!(tree.lookup_segment("abcdq").len, 2);
    assert_eq!(tree.lookup_segment("abcdzzq").len, 6);
    assert_eq!(tree.lookup_segment("abcdefq").len, 6);
    // Inserting an existing path again marks its end without storing anything.
    let abcd = Owned::of(&[("a", &[1]), ("b", &[2]), ("c", &[3]), ("d", &[4])]);
    let rcd = tree
        .insert(&Location::ROOT, &abcd.pieces(false), None)
        .expect("insert");
    assert_eq!(tree.stats().tokens, 8);
    assert_eq!(marks_at(&tree, &end), [2, 4, 6]);
    assert_eq!(tree.lookup_segment("abcdq").len, 4);

    // 8 new tokens push the total to 16 > 12: "ef", "zz" and then "cd" go (oldest leaves
    // first) down to 10; "ab" keeps its mark with no descendant left.
    let q = Owned::of(&[("q", &[5; 8])]);
    tree.insert(&Location::ROOT, &q.pieces(false), None);
    check(&tree);
    assert!(!tree.is_live(ra) && !tree.is_live(rzz) && !tree.is_live(rcd));
    assert!(tree.is_live(rab));
    assert!(tree.nodes[rab.index as usize].children.is_empty());
    assert_eq!(marks_at(&tree, &Location::end_of(rab)), [2]);
    let m = tree.lookup_segment("abcdef");
    assert_eq!((m.len, m.tokens), (2, 2));
    assert_eq!(ids_at(&tree, &m.at), [1, 2]);
}

#[test]
fn segment_lookup_backs_off_to_the_last_segment_end() {
    let mut tree = RadixTree::new(big());
    // Turn 1: prompt "P:", output " the cat"; turn 2's prompt tail "\nQ" below it.
    let prompt = Owned::of(&[("P", &[1]), (":", &[2])]);
    let rp = tree
        .insert(&Location::ROOT, &prompt.pieces(false), None)
        .expect("insert");
    let output = Owned::of(&[(" the", &[10]), (" cat", &[11])]);
    let ro = tree
        .insert_below(rp, &output.pieces(true), None)
        .expect("ok");
    let tail = Owned::of(&[("\nQ", &[20])]);
    let rt = tree
        .insert_below(ro, &tail.pieces(false), None)
        .expect("ok");
    let cases = [
        // (query, piece-boundary length, segment-end length)
        ("P: them", 6, 2),
        ("P: the ca", 6, 2),
        ("P: the cat", 10, 10),
        ("P: the cat\nX", 10, 10),
        ("P: the cat\nQ more", 12, 12),
        ("P", 1, 0),
        ("X", 0, 0),
    ];
    for (query, piece, segment) in cases {
        assert_eq!(tree.lookup_read_only(query).len, piece, "{query:?}");
        let m = tree.lookup_segment(query);
        assert_eq!(m.len, segment, "{query:?}");
        assert_eq!(tree.path_text(&m.at).as_deref(), Some(&query[..segment]));
        let ids = ids_at(&tree, &m.at);
        assert_eq!(ids.len(), m.tokens);
        assert_eq!(ids, [1, 2, 10, 11, 20][..m.tokens], "{query:?}");
    }
    assert_eq!(
        tree.lookup_segment("P: the cat\nQ").at,
        Location::end_of(rt)
    );

    // Another tokenisation of "P: the cat" in one piece: a sibling with a segment end at the
    // same length. Ties go to the most recently used, length wins over recency.
    let other = Owned::of(&[("P: the cat", &[99])]);
    tree.insert(&Location::ROOT, &other.pieces(false), None);
    check(&tree);
    let m = tree.lookup_segment("P: the cat!");
    assert_eq!((m.len, ids_at(&tree, &m.at)), (10, vec![99]));
    let m = tree.lookup_segment("P: the cat\nQ!");
    assert_eq!((m.len, ids_at(&tree, &m.at)), (12, vec![1, 2, 10, 11, 20]));
    let m = tree.lookup_segment("P: the cat!");
    assert_eq!((m.len, ids_at(&tree, &m.at)), (10, vec![1, 2, 10, 11]));
    // The sibling's only segment end is its whole text: "P: them" still backs off to "P:".
    let m = tree.lookup_segment("P: them");
    assert_eq!((m.len, ids_at(&tree, &m.at)), (2, vec![1, 2]));
}

// ---- Property test against a naive reference model ----

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }
}

const ALPHABET: [char; 5] = ['a', 'b', 'é', '中', '😀'];

#[derive(Clone, Debug, PartialEq)]
struct RefPiece {
    text: String,
    ids: Vec<u32>,
    logprob: f32,
    mask: u8,
    /// The version it was inserted under (set at the insert).
    version: u32,
}

/// Random pieces of 1-2 chars; ids mostly a function of the text, so that identical pieces
/// recur, sometimes a different "tokenisation" of the same text.
fn random_pieces(rng: &mut Rng, count: usize, mask: u8) -> Vec<RefPiece> {
    (0..count)
        .map(|_| {
            let text: String = (0..1 + rng.below(2))
                .map(|_| ALPHABET[rng.below(ALPHABET.len())])
                .collect();
            let hash = text
                .chars()
                .fold(7u32, |h, c| h.wrapping_mul(31) ^ c as u32)
                % 10_000;
            let variant = u32::from(rng.chance(10));
            let n = if rng.chance(15) { 2 } else { 1 };
            let ids = (0..n).map(|k| hash * 4 + variant + k * 100_000).collect();
            RefPiece {
                text,
                ids,
                logprob: -(rng.below(1000) as f32) / 100.0,
                mask,
                version: 0,
            }
        })
        .collect()
}

fn owned(pieces: &[RefPiece]) -> Owned {
    let mut o = Owned::default();
    for p in pieces {
        o.push(&p.text, &p.ids, p.logprob);
    }
    o
}

fn same_piece(a: &RefPiece, b: &RefPiece) -> bool {
    a.text == b.text && a.ids == b.ids
}

/// Every trajectory ever inserted, in order, from the root.
#[derive(Default)]
struct Reference {
    trajectories: Vec<Vec<RefPiece>>,
}

impl Reference {
    /// Longest piece-boundary prefix of any trajectory that prefixes `query`, and every
    /// (trajectory, piece count) reaching it.
    fn best(&self, query: &str) -> (usize, Vec<(usize, usize)>) {
        let mut best = (0, Vec::new());
        for (t, traj) in self.trajectories.iter().enumerate() {
            let mut len = 0;
            for (j, p) in traj.iter().enumerate() {
                if !query[len..].starts_with(&p.text) {
                    break;
                }
                len += p.text.len();
                if len > best.0 {
                    best = (len, Vec::new());
                }
                if len == best.0 {
                    best.1.push((t, j + 1));
                }
            }
        }
        best
    }

    /// Longest segment end prefixing `query` and every trajectory ending there. Every
    /// trajectory is the whole path of one insert, so its end is a segment end, and those are
    /// all the segment ends.
    fn best_segment(&self, query: &str) -> (usize, Vec<usize>) {
        let mut best = (0, Vec::new());
        for (t, traj) in self.trajectories.iter().enumerate() {
            let text: String = traj.iter().map(|p| p.text.as_str()).collect();
            if !query.starts_with(&text) {
                continue;
            }
            if text.len() > best.0 {
                best = (text.len(), Vec::new());
            }
            if text.len() == best.0 {
                best.1.push(t);
            }
        }
        best
    }

    /// Values of trajectory `t`'s first `j` pieces as the tree keeps them: each piece from the
    /// earliest trajectory with the identical piece sequence up to it.
    ///
    /// The first writer's, except that a later output of a newer version replaces the
    /// logprobs of an output piece (see `RadixTree::refresh`).
    fn canonical(&self, t: usize, j: usize) -> Vec<(u32, f32, u8)> {
        let traj = &self.trajectories[t];
        let mut out = Vec::new();
        for m in 0..j {
            let mut writers = self.trajectories.iter().filter(|s| {
                s.len() > m
                    && s[..=m]
                        .iter()
                        .zip(&traj[..=m])
                        .all(|(a, b)| same_piece(a, b))
            });
            let mut p = &writers.next().expect("t itself qualifies")[m];
            let mask = p.mask;
            for s in writers {
                if mask == 1 && s[m].mask == 1 && s[m].version > p.version {
                    p = &s[m];
                }
            }
            out.extend(p.ids.iter().map(|&id| (id, p.logprob, mask)));
        }
        out
    }
}

fn random_query(rng: &mut Rng, reference: &Reference) -> String {
    let mut q = String::new();
    if !reference.trajectories.is_empty() && rng.chance(85) {
        let t = &reference.trajectories[rng.below(reference.trajectories.len())];
        let full: String = t.iter().map(|p| p.text.as_str()).collect();
        let chars: Vec<char> = full.chars().collect();
        q.extend(&chars[..rng.below(chars.len() + 1)]);
    }
    for _ in 0..rng.below(4) {
        q.push(ALPHABET[rng.below(ALPHABET.len())]);
    }
    q
}

/// A (trajectory, piece count) whose prefix has `len` bytes of text prefixing `query` and the
/// ids `ids`: the tree's answer must be one. With `best`, only the reference's longest.
fn explain(
    reference: &Reference,
    query: &str,
    len: usize,
    ids: &[u32],
    values: Option<&[(u32, f32, u8)]>,
) -> Option<(usize, usize)> {
    let (best_len, candidates) = reference.best(query);
    if let Some(values) = values {
        // Exact mode: the longest, with the first writer's values.
        assert_eq!(len, best_len, "lookup {query:?}");
        return candidates
            .into_iter()
            .find(|&(t, j)| reference.canonical(t, j) == values);
    }
    assert!(len <= best_len, "longer than anything stored: {query:?}");
    for (t, traj) in reference.trajectories.iter().enumerate() {
        let mut text_len = 0;
        for (j, p) in traj.iter().enumerate() {
            if !query[text_len..].starts_with(&p.text) {
                break;
            }
            text_len += p.text.len();
            if text_len == len {
                let same = traj[..=j]
                    .iter()
                    .flat_map(|p| p.ids.iter().copied())
                    .eq(ids.iter().copied());
                if same {
                    return Some((t, j + 1));
                }
            }
        }
    }
    None
}

/// A trajectory whose whole text is `query[..len]` and whose ids are `ids`: the tree's answer
/// to a segment lookup must be one. With `values`, only the reference's longest, with the
/// first writer's values.
fn explain_segment(
    reference: &Reference,
    query: &str,
    len: usize,
    ids: &[u32],
    values: Option<&[(u32, f32, u8)]>,
) -> Option<usize> {
    let (best_len, candidates) = reference.best_segment(query);
    if let Some(values) = values {
        assert_eq!(len, best_len, "segment lookup {query:?}");
        return candidates
            .into_iter()
            .find(|&t| reference.canonical(t, reference.trajectories[t].len()) == values);
    }
    assert!(len <= best_len, "longer than any segment end: {query:?}");
    reference.trajectories.iter().position(|traj| {
        traj.iter().map(|p| p.text.len()).sum::<usize>() == len
            && query.starts_with(&*traj.iter().map(|p| p.text.as_str()).collect::<String>())
            && traj
                .iter()
                .flat_map(|p| p.ids.iter().copied())
                .eq(ids.iter().copied())
    })
}

/// Runs random inserts and lookups; with `exact`, compares against the reference exactly
/// (no eviction), else checks what still holds under eviction.
fn run_random(seed: u64, steps: usize, config: Config, exact: bool) {
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mut tree = RadixTree::new(config);
    // Sweeps of old versions span several inserts.
    tree.sweep_work = 1 + seed as usize % 4;
    let mut reference = Reference::default();
    let mut refs: Vec<(NodeRef, Vec<RefPiece>)> = Vec::new();
    let mut version = 1u32;
    for _ in 0..steps {
        let mask = u8::from(rng.chance(50));
        if rng.chance(10) {
            version += 1;
        }
        // Sometimes a late response of the previous version.
        let v = if rng.chance(10) { version - 1 } else { version }.to_string();
        let op = rng.below(10);
        let (at, prefix, new) = if op < 3 || reference.trajectories.is_empty() {
            let count = rng.below(6);
            (
                Location::ROOT,
                Vec::new(),
                random_pieces(&mut rng, count, mask),
            )
        } else if op < 7 {
            // lookup + insert the tail: the /generate flow (segment ends) or a piece match.
            let query = random_query(&mut rng, &reference);
            let segment = rng.chance(50);
            let m = if segment {
                tree.lookup_segment(&query)
            } else {
                tree.lookup(&query)
            };
            let got = entries_at(&tree, &m.at);
            let ids: Vec<u32> = got.iter().map(|e| e.0).collect();
            let values = exact.then_some(&got[..]);
            let prefix: Vec<RefPiece> = if m.len == 0 {
                if exact {
                    let best = if segment {
                        reference.best_segment(&query).0
                    } else {
                        reference.best(&query).0
                    };
                    assert_eq!(best, 0, "missed {query:?}");
                }
                Vec::new()
            } else if segment {
                let t = explain_segment(&reference, &query, m.len, &ids, values)
                    .unwrap_or_else(|| panic!("{query:?}: {got:?} is no segment end"));
                reference.trajectories[t].clone()
            } else {
                let (t, j) = explain(&reference, &query, m.len, &ids, values)
                    .unwrap_or_else(|| panic!("{query:?}: {got:?} is no stored prefix"));
                reference.trajectories[t][..j].to_vec()
            };
            let mut tail = Vec::new();
            let mut rest = &query[m.len..];
            while !rest.is_empty() {
                let n = 1 + rng.below(2);
                let take = rest.char_indices().nth(n).map_or(rest.len(), |x| x.0);
                let mut p = random_pieces(&mut rng, 1, mask).remove(0);
                p.text = rest[..take].to_string();
                tail.push(p);
                rest = &rest[take..];
            }
            (m.at, prefix, tail)
        } else {
            let (node, path) = refs[rng.below(refs.len())].clone();
            if !tree.is_live(node) {
                assert!(!exact, "ref went stale without eviction");
                continue;
            }
            let count = rng.below(4);
            (
                Location::end_of(node),
                path,
                random_pieces(&mut rng, count, mask),
            )
        };
        let mut new = new;
        for p in &mut new {
            p.version = v.parse().expect("a number");
        }
        let input = owned(&new);
        let was_newest = tree.newest_version().map(str::to_owned);
        let r = tree.insert(&at, &input.pieces(mask == 1), Some(&v));
        check(&tree);
        let became_newest = tree.newest_version() == Some(v.as_str());
        if became_newest
            && was_newest.as_deref() != Some(v.as_str())
            && let Some(k) = config.keep_versions
            && rng.chance(50)
        {
            tree.sweep_versions(usize::MAX);
            assert!(tree.sweep.is_none(), "sweep finished");
            check(&tree);
            let kept = tree.versions.order.len().saturating_sub(k);
            for n in tree.nodes.iter().skip(1).filter(|n| n.live) {
                assert!(tree.versions.rank[n.newest_version as usize] as usize >= kept);
            }
        }
        let r = r.expect("location was live");
        let mut full = prefix;
        full.extend(new);
        if exact {
            assert!(tree.is_live(r));
        }
        if !full.is_empty() {
            reference.trajectories.push(full.clone());
        }
        refs.push((r, full));

        // Lookups: read-only and touching agree, answers match the reference.
        for _ in 0..2 {
            let query = random_query(&mut rng, &reference);
            let ro = tree.lookup_read_only(&query);
            let m = tree.lookup(&query);
            assert_eq!(ro, m);
            assert_eq!(tree.path_text(&m.at).as_deref(), Some(&query[..m.len]));
            let got = entries_at(&tree, &m.at);
            assert_eq!(got.len(), m.tokens);
            if m.len == 0 {
                assert!(got.is_empty());
                if exact {
                    assert_eq!(reference.best(&query).0, 0, "missed {query:?}");
                }
                continue;
            }
            let ids: Vec<u32> = got.iter().map(|e| e.0).collect();
            let values = exact.then_some(&got[..]);
            assert!(
                explain(&reference, &query, m.len, &ids, values).is_some(),
                "{query:?}: {got:?} is no stored prefix"
            );
        }
        // Segment lookups: at most the piece match, ending at a marked token of an insert end.
        for _ in 0..2 {
            let query = random_query(&mut rng, &reference);
            let piece = tree.lookup_read_only(&query);
            let m = tree.lookup_segment(&query);
            assert!(m.len <= piece.len);
            assert_eq!(tree.path_text(&m.at).as_deref(), Some(&query[..m.len]));
            let got = entries_at(&tree, &m.at);
            assert_eq!(got.len(), m.tokens);
            let last = tree.path_tokens(&m.at).expect("live").concat().pop();
            assert_eq!(last.is_some_and(|t| t.ends_segment()), m.len > 0);
            if m.len == 0 {
                if exact {
                    assert_eq!(reference.best_segment(&query).0, 0, "missed {query:?}");
                }
                continue;
            }
            let ids: Vec<u32> = got.iter().map(|e| e.0).collect();
            let values = exact.then_some(&got[..]);
            assert!(
                explain_segment(&reference, &query, m.len, &ids, values).is_some(),
                "{query:?}: {got:?} is no segment end"
            );
        }
        // Every live ref still ends where it did.
        if rng.chance(20) {
            for (node, path) in &refs {
                if !tree.is_live(*node) {
                    assert!(!exact);
                    continue;
                }
                let text: String = path.iter().map(|p| p.text.as_str()).collect();
                let at = Location::end_of(*node);
                assert_eq!(tree.path_text(&at), Some(text));
                let ids: Vec<u32> = path.iter().flat_map(|p| p.ids.iter().copied()).collect();
                assert_eq!(ids_at(&tree, &at), ids);
            }
        }
    }
}

#[test]
fn random_against_reference_exact() {
    for seed in 0..300 {
        run_random(seed, 60, big(), true);
    }
}

#[test]
fn random_under_lru_eviction() {
    for seed in 0..300 {
        let config = Config {
            max_tokens: 5 + (seed as usize % 40),
            keep_versions: None,
        };
        run_random(1000 + seed, 80, config, false);
    }
}

#[test]
fn random_under_version_eviction() {
    for seed in 0..200 {
        let config = Config {
            max_tokens: 60,
            keep_versions: Some(1 + seed as usize % 3),
        };
        run_random(5000 + seed, 80, config, false);
    }
}

// ---- Benchmark ----

/// One piece per word: (text, ends) for `words`.
fn words_to_pieces(words: &[String]) -> (String, Vec<PieceEnd>) {
    let mut text = String::new();
    let mut ends = Vec::new();
    for (i, w) in words.iter().enumerate() {
        text.push_str(w);
        ends.push(PieceEnd {
            text: text.len() as u32,
            tokens: i as u32 + 1,
        });
    }
    (text, ends)
}

/// Multi-turn /generate at 1k and 32k tokens: segment lookup + prefix ids + tail insert, the
/// bytes per cached token, and an eviction burst. Run with
/// `cargo test --release --lib -- --ignored --nocapture bench`.
#[test]
#[ignore = "benchmark"]
fn bench_lookup_insert() {
    use std::time::{Duration, Instant};
    for &total in &[1_000usize, 32_000] {
        // ~4 bytes per token like English BPE, cached in turns of 200 tokens.
        let words: Vec<String> = (0..total).map(|i| format!(" w{:02}", i % 97)).collect();
        let (text, _) = words_to_pieces(&words);
        let ids: Vec<u32> = (0..total as u32).collect();
        let build = || {
            let mut tree = RadixTree::new(Config::default());
            let mut node = NodeRef::ROOT;
            for start in (0..total).step_by(200) {
                let stop = (start + 200).min(total);
                let (turn, turn_ends) = words_to_pieces(&words[start..stop]);
                let p = Pieces::new(&turn, &ids[start..stop], &turn_ends).expect("valid");
                node = tree.insert_below(node, &p, Some("1")).expect("live");
            }
            tree
        };
        let tree = build();
        let (stats, bytes) = (tree.stats(), tree.memory_bytes());
        println!(
            "{total} tokens: {} nodes, {bytes} B, {:.1} B/token with text, {:.1} B/token without",
            stats.nodes,
            bytes as f64 / stats.tokens as f64,
            (bytes as u64 - stats.text_bytes) as f64 / stats.tokens as f64
        );
        // Each request: the whole trajectory so far plus a new 2-token turn.
        let batches = if total > 10_000 { 4 } else { 40 };
        let per_batch = 50;
        let (mut write, mut read) = (Duration::ZERO, Duration::ZERO);
        let mut input_ids = Vec::new();
        for _ in 0..batches {
            let mut tree = build();
            let mut query = text.clone();
            let queries: Vec<String> = (0..per_batch)
                .map(|r| {
                    query.push_str(&format!(" next t{r:04}"));
                    query.clone()
                })
                .collect();
            let tail_ends = [(5, 1), (11, 2)].map(|(t, k)| PieceEnd { text: t, tokens: k });
            let start = Instant::now();
            for q in &queries {
                let m = tree.lookup_segment(q);
                input_ids.clear();
                input_ids.reserve(m.tokens + 2);
                tree.extend_ids(&m.at, &mut input_ids);
                let tail = &q[m.len..];
                let p = Pieces::new(tail, &[1, 2], &tail_ends).expect("2-token tail");
                assert!(tree.insert(&m.at, &p, None).is_some());
                input_ids.extend_from_slice(&[1, 2]);
            }
            write += start.elapsed();
            let start = Instant::now();
            for q in &queries {
                let m = tree.lookup_read_only(q);
                std::hint::black_box(tree.path_tokens(&m.at));
            }
            read += start.elapsed();
        }
        let n = (batches * per_batch) as u32;
        println!(
            "{total} tokens: /generate (lookup + ids + tail insert) {:?}; retrieve (read-only lookup + path) {:?}",
            write / n,
            read / n
        );
    }

    // GRPO-like: 250 prompts of 500 tokens, 8 samples of 1500 tokens each.
    let mut tree = RadixTree::new(Config::default());
    let mut rng = Rng(42);
    let prompt_words: Vec<String> = (0..500).map(|i| format!(" p{:02}", i % 97)).collect();
    let prompt_ids: Vec<u32> = (0..500).collect();
    for g in 0..250 {
        let mut words = prompt_words.clone();
        words[0] = format!("{g:04}");
        let (prompt, ends) = words_to_pieces(&words);
        let p = Pieces::new(&prompt, &prompt_ids, &ends).expect("valid");
        let node = tree.insert(&Location::ROOT, &p, Some("1")).expect("live");
        for _ in 0..8 {
            let out: Vec<String> = (0..1500)
                .map(|_| format!(" {}", ["x", "yy", "zzz", "wwww"][rng.below(4)]))
                .collect();
            let (out, ends) = words_to_pieces(&out);
            let ids: Vec<u32> = (0..1500).map(|_| rng.below(150_000) as u32).collect();
            let lp = vec![-0.25f32; 1500];
            let p = Pieces::new(&out, &ids, &ends)
                .and_then(|p| p.with_logprobs(&lp))
                .expect("valid")
                .with_loss_mask(true);
            tree.insert_below(node, &p, Some("1"));
        }
    }
    let (stats, bytes) = (tree.stats(), tree.memory_bytes());
    println!(
        "GRPO-like: {} tokens, {} nodes, {bytes} B, {:.1} B/token with text, {:.1} B/token without",
        stats.tokens,
        stats.nodes,
        bytes as f64 / stats.tokens as f64,
        (bytes as u64 - stats.text_bytes) as f64 / stats.tokens as f64
    );
    // 1M more tokens push the 4M budget over: LRU leaves go until it holds again.
    let words: Vec<String> = (0..1_000_000).map(|i| format!(" {}", i % 10)).collect();
    let (text, ends) = words_to_pieces(&words);
    let ids: Vec<u32> = (0..1_000_000).collect();
    let p = Pieces::new(&text, &ids, &ends).expect("valid");
    let start = Instant::now();
    tree.insert(&Location::ROOT, &p, Some("1"));
    println!(
        "insert of 1M tokens over the budget: {:?}, {} nodes / {} tokens evicted",
        start.elapsed(),
        tree.stats().evicted_nodes,
        tree.stats().evicted_tokens
    );
}

/// Worst single-insert latency while the 4M-token default budget and version sweeps evict:
/// 40k trajectories of 200 tokens in 1000 multi-turn chains, a new weight version every 6k.
/// Run with `cargo test --release --lib -- --ignored --nocapture bench`.
#[test]
#[ignore = "benchmark"]
fn bench_eviction_latency() {
    use std::time::{Duration, Instant};
    let mut tree = RadixTree::new(Config::default());
    let words: Vec<String> = (0..200).map(|i| format!(" w{:02}", i % 97)).collect();
    let (text, ends) = words_to_pieces(&words);
    let ids: Vec<u32> = (0..200).collect();
    let mut chains = vec![NodeRef::ROOT; 1000];
    let mut version = 1;
    // Latencies of inserts that evicted by LRU, by version, or neither.
    let mut times: [Vec<Duration>; 3] = Default::default();
    for i in 0..40_000usize {
        if i % 6_000 == 5_999 {
            version += 1;
        }
        let c = i % 1000;
        // Every 7th trajectory starts a new chain, so old chains go cold.
        if i % 7 == 0 {
            chains[c] = NodeRef::ROOT;
        }
        let mut t = text.clone();
        t.replace_range(0..4, &format!("{:04}", i % 10_000));
        let p = Pieces::new(&t, &ids, &ends).expect("valid");
        let before = tree.stats();
        let start = Instant::now();
        let r = tree.insert_below(chains[c], &p, Some(&version.to_string()));
        let elapsed = start.elapsed();
        chains[c] = r.filter(|r| tree.is_live(*r)).unwrap_or(NodeRef::ROOT);
        let s = tree.stats();
        let kind = if s.version_evicted_nodes > before.version_evicted_nodes {
            1
        } else if s.evicted_nodes > before.evicted_nodes {
            0
        } else {
            2
        };
        times[kind].push(elapsed);
    }
    for (name, mut t) in ["LRU-evicting", "version-sweeping", "other"]
        .into_iter()
        .zip(times)
    {
        t.sort();
        let pick = |q: f64| t.get(((t.len() as f64 - 1.0) * q) as usize).copied();
        println!(
            "{name} inserts: {} , p50 {:?}, p99 {:?}, max {:?}",
            t.len(),
            pick(0.5).unwrap_or_default(),
            pick(0.99).unwrap_or_default(),
            t.last().copied().unwrap_or_default()
        );
    }
    let s = tree.stats();
    println!(
        "{} tokens in {} nodes; evicted {} by LRU, {} by version",
        s.tokens, s.nodes, s.evicted_tokens, s.version_evicted_tokens
    );
}

/// A prompt node with 1000 children, one per sample, whose first pieces are distinct words
/// that all start with a space (` The`, ` Let`, ...): GRPO samples diverging at their first
/// token. Each sample is then continued (turn 2) or looked up. Run with
/// `cargo test --release --lib -- --ignored --nocapture bench_wide`.
#[test]
#[ignore = "benchmark"]
fn bench_wide_node() {
    use std::time::Instant;
    let mut rng = Rng(99);
    let (prompt, prompt_ends) = words_to_pieces(&[
        "<|im_start|>user\n".to_owned(),
        "Solve".to_owned(),
        " it".to_owned(),
        "<|im_end|>\n<|im_start|>assistant\n".to_owned(),
    ]);
    let mut tree = RadixTree::new(Config::default());
    let p = Pieces::new(&prompt, &[1, 2, 3, 4], &prompt_ends).expect("valid");
    let node = tree.insert(&Location::ROOT, &p, Some("1")).expect("live");
    // 1000 distinct first words of 1-12 letters after the space, then 40 shared-ish words.
    let mut firsts = std::collections::BTreeSet::new();
    while firsts.len() < 1000 {
        let len = 1 + rng.below(12);
        let word: String = (0..len)
            .map(|_| char::from(b'a' + rng.below(26) as u8))
            .collect();
        firsts.insert(format!(" {word}"));
    }
    let samples: Vec<(String, Vec<PieceEnd>, Vec<u32>)> = firsts
        .iter()
        .enumerate()
        .map(|(i, first)| {
            let mut words = vec![first.clone()];
            words.extend((0..40).map(|j| format!(" w{}", (i * 7 + j) % 50)));
            let (text, ends) = words_to_pieces(&words);
            let ids = (0..words.len() as u32)
                .map(|j| 1000 + i as u32 * 64 + j)
                .collect();
            (text, ends, ids)
        })
        .collect();
    for (text, ends, ids) in &samples {
        let p = Pieces::new(text, ids, ends)
            .expect("valid")
            .with_loss_mask(true);
        tree.insert_below(node, &p, Some("1")).expect("live");
    }
    let children = tree.nodes[node.index as usize].children.len();
    assert_eq!(children, 1000);
    // Turn 2 of each sample: prompt + its output + a new user turn.
    let queries: Vec<String> = samples
        .iter()
        .map(|(text, _, _)| format!("{prompt}{text}<|im_end|>\n<|im_start|>user\nmore"))
        .collect();
    let rounds = 20;
    let start = Instant::now();
    for _ in 0..rounds {
        for q in &queries {
            let m = tree.lookup_segment(q);
            assert!(m.len > prompt.len());
        }
    }
    let lookup = start.elapsed() / (rounds * queries.len()) as u32;
    // The same outputs again (a retry, or n samples that agree): every piece shared.
    let start = Instant::now();
    for _ in 0..rounds {
        for (text, ends, ids) in &samples {
            let p = Pieces::new(text, ids, ends)
                .expect("valid")
                .with_loss_mask(true);
            tree.insert_below(node, &p, Some("1")).expect("live");
        }
    }
    let insert = start.elapsed() / (rounds * samples.len()) as u32;
    assert_eq!(tree.nodes[node.index as usize].children.len(), 1000);
    println!(
        "node with {children} children: turn-2 lookup {lookup:?}, shared insert {insert:?}, {:.1} B/token",
        tree.memory_bytes() as f64 / tree.stats().tokens as f64
    );
}
