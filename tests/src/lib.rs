//! Cross-crate end-to-end and fault tests live in `tests/tests/`.
//!
//! This library holds nothing but the workspace README, included so that `cargo test --doc`
//! compiles and runs its "Embed it" example: the README cannot drift from the API.
#![doc = include_str!("../../README.md")]
