"""Base models: the built-in tiny model and resolution of a local folder or hub id to a pinned copy."""
