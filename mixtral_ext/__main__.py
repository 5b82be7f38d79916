"""`python -m mixtral_ext ...`: the same command as `mixtral-ext` (see cli.py)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
