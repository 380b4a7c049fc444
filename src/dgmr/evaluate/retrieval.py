"""Zero-shot image-text retrieval recall@K (COCO / Flickr30k protocol)."""
from __future__ import annotations

from typing import Any, Sequence

import torch

from ..errors import DgmrError


@torch.no_grad()
def retrieval_recall(sim: torch.Tensor, caption_image: Sequence[int] | torch.Tensor,
                     ks: Sequence[int] = (1, 5, 10)) -> dict[str, Any]:
    """Recall@K from an (images x captions) similarity matrix; ``caption_image[j]`` is the
    image of caption j (an image may have several captions).

    image->text: an image counts at K if any of its captions is among its K most similar
    captions; text->image: a caption counts if its image is among its K most similar images.
    Rank = number of wrong items scored strictly higher than the (best) right one."""
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
    best_right = sim.masked_fill(~correct, float("-inf")).max(1).values          # (n_img,)
    i2t_rank = (sim.masked_fill(correct, float("-inf")) > best_right[:, None]).sum(1)
    right = sim[ci, torch.arange(n_txt, device=sim.device)]                        # (n_txt,)
    t2i_rank = (sim > right[None, :]).sum(0)
    i2t = {f"R@{k}": float((i2t_rank < k).float().mean()) for k in ks}
    t2i = {f"R@{k}": float((t2i_rank < k).float().mean()) for k in ks}
    mean = (sum(i2t.values()) + sum(t2i.values())) / (2 * len(ks))
    return {"metric": "retrieval", "image_to_text": i2t, "text_to_image": t2i, "mean_recall": mean,
            "n_images": n_img, "n_captions": n_txt}
