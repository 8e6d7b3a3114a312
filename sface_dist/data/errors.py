"""The errors of the data package: a dataset, a record or a data setting that cannot be used as asked."""


class DataError(ValueError):
    """A dataset or data configuration that cannot be loaded as asked; the message names file, key and offset."""


class BadRecordError(DataError):
    """One record that cannot be used (framing, label, image): the message names the file, its key and offset.

    Its own type because the readers that may leave a bad record out (``on_bad_record=skip``,
    ``repack --skip-bad``) skip exactly these and stop at every other ``DataError``.
    """


class ConvertError(DataError):
    """An input that cannot be converted as it is; the message names the file (and key, offset)."""
