"""Calibrated pruning: statistics of a few hundred unlabeled images decide and repair the cut.

With calibration images, :func:`dgmr.prune` runs the model over them and, for every MLP in
forward order (docs/calibration.md):

* an activation criterion (``diversity-act``) scores the neurons on their activations over
  the calibration tokens instead of on the fc1 weights;
* **compensation** refits the down projection (weight and bias) of the cut MLP by least
  squares, so that its output best reproduces the original MLP's output on the same input.
  Inputs come from the blocks before, already cut and refitted, so errors do not compound.

Statistics are second moments accumulated in float64 over batches (never all activations).
The solve is ridge-regularised *towards the original down weights*: with nothing cut the
original weights are the exact solution, and where the data say little (fewer tokens than
kept neurons) the weights stay near the original instead of shrinking to zero.

:mod:`.allocate` uses the same statistics to spend the parameter budget across layers.

The passes run the tower's blocks one at a time on stored hidden states (:mod:`.sweep`), so
a calibrated prune costs a few forward passes whatever the depth; a model whose blocks
cannot run one by one gets full forward passes up to each MLP instead, with a warning.

The modules, in the order a calibrated prune uses them: :mod:`.settings` (what the user
asks for), :mod:`.images` (the calibration images), :mod:`.runner` (full forward passes over
them, and the first pass that refuses what calibration cannot handle), :mod:`.sweep` (the
blocks one at a time, and the steps a block's sites take), :mod:`.moments` (second moments
gathered with hooks), :mod:`.refit` (the least-squares refit), :mod:`.cut` (the MLP step and
the calibrated prune).
"""
