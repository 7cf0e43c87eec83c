//! amend C ABI.
