"""One exception type for every problem a user can fix.

The CLI prints ``SparsambaError`` as a single line (no traceback unless ``--debug``); anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations


class SparsambaError(Exception):
    """A problem with the user's input: the message says what, where, and what to do."""
