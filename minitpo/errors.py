"""The one exception type for user mistakes (the CLI prints it as a single line and exits with status 2),
and SIGTERM's: Terminated, raised by the handler the CLI installs."""

import sys


class UserError(Exception):
    """A problem the user can fix (bad recipe key, missing file, empty data). The message names
    the thing, the bad value and the fix; no traceback is shown."""


class Terminated(BaseException):
    """SIGTERM (what a scheduler or `kill` sends): stops the run as Ctrl-C does. A BaseException, as
    KeyboardInterrupt is, so that no `except Exception` on the way swallows it."""


_terminated = False  # a SIGTERM came: set even when the exception it raised was dropped


def terminate(signum, frame):
    """The SIGTERM handler. Python runs it between two bytecodes of whatever runs then; when that is a
    __del__ (a library's object collected mid-run) or a C callback, the exception is printed and dropped
    ("Exception ignored in ...") and the run would go on: the flag lets the next stage stop it."""
    global _terminated
    _terminated = True
    raise Terminated()


def quiet_dropped_terminate(unraisable):
    """sys.unraisablehook: a Terminated dropped inside a __del__ prints nothing (check_terminated raises it
    again); anything else is printed as Python would."""
    if unraisable.exc_type is not Terminated:
        sys.__unraisablehook__(unraisable)


def check_terminated():
    """Raise Terminated if a SIGTERM came and its exception was dropped on the way."""
    if _terminated:
        raise Terminated()
