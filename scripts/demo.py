"""Runnable entry point: `python scripts/demo.py ...` or `accelerate launch scripts/demo.py ...` (= `keel demo ...`)."""

import sys

from keel.commands.demo import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
