"""Everything MLflow: the run's tracker and its outbox (:mod:`~clipexp.tracking.tracker`, :mod:`~clipexp.tracking.outbox`),
the sweep's parent run (:mod:`~clipexp.tracking.sweep`), a run's outputs: metrics, summary table, plots, and where
MLflow's UI shows them (:mod:`~clipexp.tracking.ui`). ``clipexp replay`` replays a run's held writes."""
