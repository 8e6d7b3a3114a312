"""The error the data loaders raise."""


class DataError(ValueError):
    """A dataset or data configuration that cannot be loaded as asked; the message names file, key and offset."""
