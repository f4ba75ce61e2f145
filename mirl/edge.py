"""The edge every command shares: what a script body raises becomes one line on stderr and an exit code.

Inside `mirl` errors are precise exceptions; here they meet the user: input errors as one `error:` line
and exit code 2, a non-finite loss as exit code 1, a stop signal (the state saved) or Ctrl-C as exit code 130.
"""
from __future__ import annotations

import sys
from typing import Callable

from mirl.errors import InputError
from mirl.run_files import release_output_dirs
from mirl.training import TrainingInterrupted


class StudyStopped(Exception):
    """A run inside a study failed; it has said why, and its exit status is the study's."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


def guarded(run: Callable[[], None]) -> int:
    """Run a script body; input errors become `error: ...` on stderr and exit code 2."""
    try:
        run()
    except StudyStopped as stopped:
        return stopped.status
    except InputError as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)  # one line, even if a file's text had breaks
        return 2
    except FloatingPointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except TrainingInterrupted as error:
        print(f"stopped: {error}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # Ctrl-C before training began, or a second one during it
        print("stopped: interrupted; a run continues from its newest saved state with --resume auto "
              "(one that had saved none starts afresh)", file=sys.stderr)
        return 130
    finally:
        release_output_dirs()
    return 0
