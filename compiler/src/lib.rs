//! amend compiler.
