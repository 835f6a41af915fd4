"""The `simple-dit` command. Importing the CLI imports PyTorch, which takes a second or more; a
Ctrl-C meanwhile ends here in one line, not in Python's KeyboardInterrupt traceback."""

import sys


def main() -> int:
    try:
        from .cli import main as run
    except KeyboardInterrupt:
        print("simple-dit: interrupted", file=sys.stderr)
        return 130
    return run()
