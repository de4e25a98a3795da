"""I/O backends that read byte ranges of files into host or device buffers."""
