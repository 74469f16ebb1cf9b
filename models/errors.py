"""The error type of models/: bad input about a model, data set, weights or split."""


class ModelError(ValueError):
    """Bad input about a model, data set, weights or split.

    The message is one line naming the thing, its value and the fix. The CLI prints
    `error: <message>` and exits 2.
    """
