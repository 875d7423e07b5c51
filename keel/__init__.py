"""keel's upper layers: evaluation (``keel.evaluation``) and the application (one loader, the commands,
the synthetic organism and its demo). The mechanism lives in ``interventions`` and ``trainers``."""
