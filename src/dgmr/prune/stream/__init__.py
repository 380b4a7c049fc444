"""Streaming prune: cut a safetensors checkpoint one MLP at a time, in bounded memory.

The architecture comes from the model spec, built on the ``meta`` device (no memory, no
download); the weights come from a safetensors file or a sharded Hugging Face style
``model.safetensors.index.json``. Every tensor is read on its own when it is needed, so
the resident set stays about one MLP (its weights, the float64 scoring matrix and the
selection workspace) plus one output shard, whatever the checkpoint's size:

1. :mod:`dgmr.io.checkpoints`: the checkpoint's header (names, dtypes, shapes) is checked against
   the meta model's state dict: a missing, unexpected or wrongly shaped tensor, or a
   truncated file, is a :class:`~dgmr.core.errors.DgmrError` before any output exists;
2. :mod:`.plan`: shard bytes and MLPs selected at once are sized within ``max_memory``;
3. :mod:`.run`: each MLP's tensors are loaded into that MLP's (otherwise meta) module,
   scored with :func:`dgmr.select_neurons` and cut with :func:`dgmr.shrink_mlp`: the very
   code of the in-memory :func:`dgmr.prune`, so the result is the same bit for bit;
4. :mod:`dgmr.io.writers`: every other tensor is copied through unchanged; the output is one
   streamed ``model.safetensors`` or HF-style shards (the family decides, see
   :meth:`dgmr.Family.stream_layout`), all inside a temporary directory renamed into place
   only on success, next to the library's config files, ``dgmr.json``, the card and
   the kept indices,
   so :func:`dgmr.load` opens it.

Several MLPs are selected at once (threads) when the cores and ``max_memory`` allow it.
"""
from ...io.checkpoints import Checkpoint, TensorInfo, match_names, open_checkpoint
from ...io.writers import FileWriter, ShardWriter
from .plan import Plan, make_plan, parse_size
from .run import stream_prune

__all__ = ["Checkpoint", "FileWriter", "Plan", "ShardWriter", "TensorInfo", "make_plan", "match_names",
           "open_checkpoint", "parse_size", "stream_prune"]
