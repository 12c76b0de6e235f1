"""Data: read every source, check and normalise each record, keep rejects with reasons."""
