"""Runnable entry point: `python scripts/extract.py ...` or `accelerate launch scripts/extract.py ...` (= `keel extract ...`)."""

import sys

from keel.commands.extract import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
