"""Image data: unlabeled sources (folders, list files, WebDataset shards, in-memory images,
the run sampler) that distillation, calibration and evaluation read, and the labeled sets
evaluation reads (:mod:`.labeled`)."""
