"""The command line: ``python -m clipexp`` / ``clipexp`` (:mod:`~clipexp.cli.train`, the Hydra entry point)."""
