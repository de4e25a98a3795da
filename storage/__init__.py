"""Bytes on disk: the block-store format, HF checkpoint readers, I/O backends, durable writes."""
