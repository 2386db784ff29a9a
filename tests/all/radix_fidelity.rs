//! The trajectory cache stays token-exact through the cases the RL loop produces (see each
//! test), under the shipped byte-level BPE and a WordPiece tokenizer the tests build.
