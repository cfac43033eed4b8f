"""Thin entry point: ``python data_prep/prepare.py <command> ...`` equals ``terrafm-data``."""

import sys

from terrafm_lightning.prep.cli import main

if __name__ == "__main__":
    sys.exit(main())
