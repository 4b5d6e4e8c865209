"""Pipeline-level helpers: tiny random-weight pipelines for demos and tests (:mod:`.tiny`)."""
