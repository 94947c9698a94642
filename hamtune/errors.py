"""The one error type user-facing code raises for bad input; the CLI turns it into a one-line message and exit 2."""


class HamtuneError(Exception):
    """Bad input or an unusable environment, explained in one line that names the file, key or value."""
