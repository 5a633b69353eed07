"""The one exception type the export CLI turns into a clear message and a non-zero exit."""


class ExportError(Exception):
    """A problem the user can fix: the message names it and says what to do."""
