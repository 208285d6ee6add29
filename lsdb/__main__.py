"""``python -m lsdb``: the same command line as the ``lsdb`` script."""

from lsdb.cli import main

if __name__ == "__main__":
    main()
