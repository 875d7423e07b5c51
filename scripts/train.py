"""Runnable entry point: `python scripts/train.py ...` or `accelerate launch scripts/train.py ...` (= `keel train ...`)."""

import sys

from keel.commands.train import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
