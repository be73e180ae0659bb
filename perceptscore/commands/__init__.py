"""What each CLI command does, as plain functions: ``cli.py`` parses arguments and prints, these do the
work (``score``: scoring into a file or stdout, and the rows rank/filter/eval need; ``weights``: the
``perceptscore weights`` commands)."""
