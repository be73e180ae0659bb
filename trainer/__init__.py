"""perceptscore.trainer: training and evaluation (``pip install perceptscore[train]``). Not yet written."""
