//! amend engine (see README).
