"""winnow: data selection and reweighting for ML training data.

Layers (imports point down only):
  winnow.cli, winnow.flows   orchestration (prefect)
  winnow.pipeline            I/O, models, training, score store, shards, report
  winnow.scorers, winnow.selectors   the algorithms: torch and numpy only
"""

__version__ = "0.1.0"
