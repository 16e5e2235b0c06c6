"""``python -m clipexp``: the command line (:mod:`clipexp.cli.train`)."""

from clipexp.cli.train import main

if __name__ == "__main__":
    main()
