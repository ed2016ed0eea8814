"""``python -m refusal_fast`` runs the ``refusal-fast`` command line."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
