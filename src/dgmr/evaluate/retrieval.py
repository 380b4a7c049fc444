"""Zero-shot image-text retrieval recall@K (COCO / Flickr30k protocol), with an explicit
rule for tied scores.

A query counts at K if one of its right items is among its K best-scored items. Where a
right item ties with wrong ones, "among the K best" needs a tie rule (``ties``):

* ``expected`` (default): the recall expected when ties are broken uniformly at random.
  With g wrong items scored above the best right one and, at its score, t_right right and
  t_wrong wrong items, the query counts with probability 1 - C(t_wrong, q) / C(t_right +
  t_wrong, q), q = K - g (the chance that not all q places left go to wrong items). It is
  monotonic in K and lies between the two bounds below;
* ``optimistic``: ties go to the right items (rank = wrong items scored strictly higher);
* ``pessimistic``: ties go to the wrong items.

Without ties all three equal clip_benchmark's recall (``torch.topk`` order, which breaks
ties arbitrarily).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from ..core.errors import DgmrError

TIE_MODES = ("expected", "optimistic", "pessimistic")


def _hit_probability(above: torch.Tensor, tied_right: torch.Tensor, tied_wrong: torch.Tensor, k: int,
                     ties: str) -> torch.Tensor:
    """P(a right item is among the first ``k``) per query, from the counts at the best right score."""
    if ties == "optimistic":
        return (above < k).double()
    if ties == "pessimistic":
        return (above + tied_wrong < k).double()
    q = (k - above).double()
    m = (tied_right + tied_wrong).double()
    w = tied_wrong.double()
    qc = q.clamp(min=0)
    # C(w, q) / C(m, q) in log space; zero when q > w (then a right item must be among the q)
    lg = (torch.lgamma(w + 1) - torch.lgamma((w - qc).clamp(min=0) + 1)
          - torch.lgamma(m + 1) + torch.lgamma((m - qc).clamp(min=0) + 1))
    miss = torch.where(qc > w, torch.zeros_like(lg), lg.exp())
    p = 1 - miss
    return torch.where(q <= 0, torch.zeros_like(p), p)


def _query_counts(sim: torch.Tensor, correct: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per row: (wrong items above the best right score, right items at it, wrong items at it)."""
    best = sim.masked_fill(~correct, float("-inf")).max(1).values[:, None]
    wrong = ~correct
    above = ((sim > best) & wrong).sum(1)
    at = sim == best
    return above, (at & correct).sum(1), (at & wrong).sum(1)


def check_options(ks: Sequence[int], ties: str) -> None:
    """Refuse a K below 1 or an unknown tie rule."""
    if ties not in TIE_MODES:
        raise DgmrError(f"unknown tie rule {ties!r}: use one of {', '.join(TIE_MODES)}")
    if any(int(k) < 1 for k in ks):
        raise DgmrError(f"K must be >= 1, got {list(ks)}")


@torch.no_grad()
def retrieval_recall(sim: torch.Tensor, caption_image: Sequence[int] | torch.Tensor,
                     ks: Sequence[int] = (1, 5, 10), *, ties: str = "expected") -> dict[str, Any]:
    """Recall@K from an (images x captions) similarity matrix; ``caption_image[j]`` is the
    image of caption j (an image may have several captions).

    image->text: an image counts at K if any of its captions is among its K most similar
    captions; text->image: a caption counts if its image is among its K most similar images.
    ``ties``: see the module docstring."""
    check_options(ks, ties)
    sim = sim.float()
    ci = torch.as_tensor(list(caption_image) if not torch.is_tensor(caption_image) else caption_image,
                         dtype=torch.long, device=sim.device)
    n_img, n_txt = sim.shape
    if n_img == 0 or n_txt == 0:
        raise DgmrError("retrieval needs at least one image and one caption")
    if len(ci) != n_txt:
        raise DgmrError(f"{len(ci)} caption->image links for {n_txt} captions")
    if int(ci.min()) < 0 or int(ci.max()) >= n_img:
        raise DgmrError("a caption points to an image that does not exist")
    has = torch.zeros(n_img, dtype=torch.bool, device=sim.device)
    has[ci] = True
    if not bool(has.all()):
        raise DgmrError(f"{int((~has).sum())} images have no caption")
    correct = torch.zeros(n_img, n_txt, dtype=torch.bool, device=sim.device)
    correct[ci, torch.arange(n_txt, device=sim.device)] = True
    i2t_counts = _query_counts(sim, correct)
    t2i_counts = _query_counts(sim.T, correct.T)
    i2t = {f"R@{k}": float(_hit_probability(*i2t_counts, int(k), ties).mean()) for k in ks}
    t2i = {f"R@{k}": float(_hit_probability(*t2i_counts, int(k), ties).mean()) for k in ks}
    mean = (sum(i2t.values()) + sum(t2i.values())) / (2 * len(ks))
    return {"metric": "retrieval", "image_to_text": i2t, "text_to_image": t2i, "mean_recall": mean,
            "ties": ties, "tied_queries": int((i2t_counts[2] > 0).sum() + (t2i_counts[2] > 0).sum()),
            "n_images": n_img, "n_captions": n_txt}
