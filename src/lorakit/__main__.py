"""``python -m lorakit``: the same command line as the ``lorakit`` script."""

from lorakit.cli import main

if __name__ == "__main__":
    main()
