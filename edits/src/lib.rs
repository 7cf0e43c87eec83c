//! amend bundles and edit math.
