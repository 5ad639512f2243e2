"""The one exception type for bad user input: the CLI prints its message as a single line."""


class UserError(Exception):
    """Bad input (config, flags, files, layout). The message names the offending key/file/flag."""
