"""Everything MLflow: the run's tracker and its outbox (:mod:`~clipexp.tracking.tracker`, :mod:`~clipexp.tracking.outbox`),
the sweep's parent run (:mod:`~clipexp.tracking.sweep`), and a run's outputs: metrics, summary table, plots.
``clipexp replay`` replays a run's held writes."""
