//! Minimal GGUF reader/writer.
