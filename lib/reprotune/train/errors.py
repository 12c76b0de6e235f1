"""The exception the training guards raise (kept free of heavy imports: the stage catches it)."""


class TrainingStopped(RuntimeError):
    """A guard stopped training (diverging or non-finite loss); the stage exits 1 with this message."""
