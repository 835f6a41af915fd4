"""The `simple-dit` command. Importing the CLI imports PyTorch, and building its parser imports
more, which takes a second or more; a Ctrl-C meanwhile ends here in one line, not in Python's
KeyboardInterrupt traceback (the commands themselves say what they leave intact)."""

import sys


def main() -> int:
    try:
        from .cli import end_if_distributed, main as run

        status = run()
    except KeyboardInterrupt:
        print("simple-dit: interrupted", file=sys.stderr)
        return 130
    end_if_distributed(status)
    return status
