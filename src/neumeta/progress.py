"""Progress bars that also read well in a log file.

In a terminal a bar redraws ten times a second; written to a file or a CI log every redraw is a
new line, so there it redraws every 30 s instead.
"""
import sys

from tqdm.auto import tqdm

LOG_INTERVAL_S = 30.0


def progress_bar(**kwargs) -> tqdm:
    """``tqdm(**kwargs)`` with a redraw interval suited to where stderr goes."""
    interactive = hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
    kwargs.setdefault("mininterval", 0.1 if interactive else LOG_INTERVAL_S)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(**kwargs)
