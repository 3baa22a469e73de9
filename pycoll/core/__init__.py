"""The C core's boundary: the compiled library, the one engine wrapper that calls it, dtypes,
buffers and hashing."""
