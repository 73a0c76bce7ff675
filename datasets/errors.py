"""Errors raised by the data layer. Messages name the file, band or key at fault and what to do."""


class DataError(ValueError):
    """Input data that eoforge refuses: unknown bands, mismatched band counts, empty inputs."""
