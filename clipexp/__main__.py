"""``python -m clipexp``: the command line (:mod:`clipexp.cli.main`); no arguments train the defaults, as always."""

from clipexp.cli.main import main

if __name__ == "__main__":
    main(bare="train")
