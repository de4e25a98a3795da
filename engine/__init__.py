"""Model execution: model families, layer executor, KV cache, generation."""
