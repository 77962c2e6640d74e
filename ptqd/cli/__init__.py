"""``ptqd``: the command line, a thin shell over :mod:`ptqd.api`.

A user error prints one line (``ptqd: error: ...``) and exits 1, wrong flags included; ``--debug``
shows the traceback. Anything else is a ptqd bug: its traceback, a line asking for a report, exit 2.
"""

from __future__ import annotations

import os
import sys
import traceback

from ptqd.cli.parser import UsageError, build_parser
from ptqd.errors import InternalError, PtqdError

BUG_REPORT = ("ptqd: internal error: this is a bug in ptqd, not in your input. Please report it with the command "
              "you ran and the traceback above.")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as e:
        msg, verb = str(e), next((a for a in argv or sys.argv[1:] if a in parser.commands), None)
        if verb and msg.endswith("(see `ptqd --help`)"):  # e.g. unrecognized arguments, found by the top parser
            msg = msg.replace("`ptqd --help`", f"`ptqd {verb} --help`")
        print(f"ptqd: error: {msg}", file=sys.stderr)
        return 1
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    if args.debug:  # third-party warnings too (ptqd.models.quiet)
        os.environ["PTQD_DEBUG"] = "1"
    try:
        return int(args.func(args) or 0)
    except InternalError:  # ptqd broke its own invariant: a bug, reported as one
        traceback.print_exc()
        print(BUG_REPORT, file=sys.stderr)
        return 2
    except PtqdError as e:  # a user error or a failed validation (the message names the check)
        if args.debug:
            raise
        print(f"ptqd: error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("ptqd: interrupted; the bundle was left as it was", file=sys.stderr)
        return 130
    except Exception:  # noqa: BLE001 - the last resort: a bug in ptqd, shown in full and said to be one
        traceback.print_exc()
        print(BUG_REPORT, file=sys.stderr)
        return 2
