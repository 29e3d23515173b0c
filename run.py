#!/usr/bin/env python3
"""The one launcher: `python run.py --help`. Same as the `scls` console script."""

import sys

from engine.cli import main

if __name__ == "__main__":
    sys.exit(main())
