"""``python -m rnnsearch``: see :mod:`rnnsearch.cli`."""

from rnnsearch.cli import main

if __name__ == "__main__":
    main()
