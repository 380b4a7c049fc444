"""Models: where they come from (:mod:`.sources`, :mod:`.open`), what each library's look
like (:mod:`.families`), where their prunable structures are and the surgery that cuts them
(:mod:`.sites`), what a prune records (:mod:`.record`), their evaluation transforms
(:mod:`.transforms`, :mod:`.preprocess`), what they cost (:mod:`.cost`) and the dgmr directory
they are saved as (:mod:`.artifact`). The order inside is a layer contract too (pyproject.toml)."""
