"""Tokenization and sequence packing: turn validated records into fixed-length training blocks."""
