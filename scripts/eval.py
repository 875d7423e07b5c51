"""Runnable entry point: `python scripts/eval.py ...` or `accelerate launch scripts/eval.py ...` (= `keel eval ...`)."""

import sys

from keel.commands.eval import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
