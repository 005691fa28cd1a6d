"""The one exception type that every stage raises for bad user input."""


class UserError(Exception):
    """A problem with the user's input: files, config or arguments.

    The message is a single line that names the file, the field and what was expected, e.g.
    ``"configs/run.toml: [calibrate] alpha = 1.5: expected a number in (0, 1)"``. Command-line
    entry points print it without a traceback and exit with status 1.
    """
