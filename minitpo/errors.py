"""The one exception type for user mistakes: the CLI prints it as a single line and exits with status 2."""


class UserError(Exception):
    """A problem the user can fix (bad recipe key, missing file, empty data). The message names
    the thing, the bad value and the fix; no traceback is shown."""
