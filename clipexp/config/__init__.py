"""The run config: its schema (:mod:`~clipexp.config.schema`, the dataclasses in Hydra's ConfigStore) and its
validation (:mod:`~clipexp.config.validate`: every range checked once, up front; the flat typed view)."""
