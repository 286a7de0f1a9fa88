"""``python -m kcompress`` runs the command line, as ``kcompress`` does."""

from kcompress.cli import main

if __name__ == "__main__":
    main()
