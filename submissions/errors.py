"""The one exception type the command line turns into a single clear line."""


class UserError(Exception):
    """A problem the user can fix (bad file, bad row, bad option).

    The CLI prints its message as one line and exits non-zero, without a traceback,
    so the message must name the file / row / option and say what to do.
    """
