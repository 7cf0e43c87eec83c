//! The four edit families' inference-time math (pure, unit-tested).
