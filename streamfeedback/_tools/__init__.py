"""Commands that work on a run's output: export, binarize, report.

Each module defines HELP (one line), configure_parser(parser) and main(args) -> exit status.
"""
