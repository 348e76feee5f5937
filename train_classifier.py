"""Placeholder: this script is being written (see the open issues)."""

import sys

if __name__ == "__main__":
    print("error: train_classifier.py is not implemented yet", file=sys.stderr)
    sys.exit(1)
