"""The one exception type of onnxlrp: the CLI turns it into a single line on stderr."""


class LrpError(Exception):
    """A problem with the user's model, composite or options, worded for the user."""
