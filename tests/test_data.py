"""Unlabeled image sources and the seeded train transform (dgmr.data)."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from dgmr.data.unlabeled import (ImageDataset, RunSampler, ShardImages, TrainTransform, collate, resolve_data,
                       sample_generator)
from dgmr.core.errors import DgmrError

from helpers import image_folder

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def test_transform_is_seeded_per_sample_and_normalises():
    tr = TrainTransform(16, MEAN, STD)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8))
    a = tr(img, sample_generator(0, 1, 7))
    assert a.shape == (3, 16, 16) and a.dtype == torch.float32
    assert torch.equal(a, tr(img, sample_generator(0, 1, 7)))  # same (seed, epoch, index): same crop + flip
    assert not torch.equal(a, tr(img, sample_generator(0, 2, 7)))  # next epoch: another view
    # a constant image normalises to (v - mean) / std whatever the crop
    flat = Image.new("RGB", (33, 21), (128, 128, 128))
    out = tr(flat, sample_generator(0, 0, 0))
    expect = (128 / 255 - torch.tensor(MEAN)) / torch.tensor(STD)
    assert torch.allclose(out.mean((1, 2)), expect, atol=1e-3)
    # tensors (uint8 or float in [0, 1]) take the same path
    t8 = torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()
    assert tr(t8, sample_generator(0, 0, 1)).shape == (3, 16, 16)
    assert torch.allclose(tr(t8, sample_generator(0, 0, 1)), tr(t8.float() / 255, sample_generator(0, 0, 1)))


def test_folder_list_and_errors(tmp_path):
    image_folder(tmp_path / "imgs", [f"class{i}" for i in range(3)], 1, style="noise", size=(30, 20), name="{i}.png")
    (tmp_path / "imgs" / "meta.json").write_text("{}")
    (tmp_path / "imgs" / ".hidden.png").write_bytes(b"x")
    src = resolve_data(tmp_path / "imgs")
    assert src.kind == "files" and src.num_samples == 3 and src.ignored_files == 1
    lst = tmp_path / "list.txt"
    lst.write_text("# train images\nimgs/class0/0.png\t3\n\nimgs/class1/1.png\n")
    src = resolve_data(lst)
    assert src.items == [str(tmp_path / "imgs/class0/0.png"), str(tmp_path / "imgs/class1/1.png")]
    with pytest.raises(DgmrError, match="does not exist"):
        resolve_data(tmp_path / "missing")
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(DgmrError, match="empty"):
        resolve_data(tmp_path / "empty.txt")
    (tmp_path / "blob.bin").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(DgmrError, match="not a text file"):
        resolve_data(tmp_path / "blob.bin")
    with pytest.raises(DgmrError, match="empty"):
        resolve_data([])
    with pytest.raises(DgmrError, match="shard"):
        resolve_data(str(tmp_path / "shards-{0000..0001}.tar"))


def test_corrupt_items_are_reported_not_raised(tmp_path):
    (good,) = image_folder(tmp_path, ["good"], 1, style="noise", size=(30, 20))
    bad = tmp_path / "b.jpg"
    bad.write_bytes(b"\xff\xd8 broken")
    ds = ImageDataset([str(good), str(bad), str(tmp_path / "gone.png")], TrainTransform(8, MEAN, STD))
    x, names = collate([ds[(4, i)] for i in range(3)])
    assert x.shape == (1, 3, 8, 8)
    assert [n.split(":")[0] for n in names] == [str(bad), str(tmp_path / "gone.png")]


def test_run_sampler_crosses_epochs_like_one_sampler_per_epoch():
    """One endless sampler (one DataLoader, workers never restart) yields exactly what a fresh
    DistributedSampler per epoch would, cut to whole batches, resuming mid-epoch by skipping."""
    from itertools import islice

    from torch.utils.data import DistributedSampler

    from dgmr.core.dist import DistInfo

    ds = list(range(23))

    def epoch_order(epoch: int, rank: int) -> list[int]:
        s = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=5, drop_last=True)
        s.set_epoch(epoch)
        return list(s)[:8]

    for rank in (0, 1):
        got = list(islice(RunSampler(ds, DistInfo(rank=rank, world=2), seed=5, per_epoch=8, epoch=0, skip=0), 24))
        assert got == [(e, i) for e in range(3) for i in epoch_order(e, rank)]
    resumed = list(islice(RunSampler(ds, DistInfo(rank=1, world=2), seed=5, per_epoch=8, epoch=1, skip=3), 13))
    assert resumed == [(1, i) for i in epoch_order(1, 1)[3:]] + [(2, i) for i in epoch_order(2, 1)]
    assert set(epoch_order(0, 0)).isdisjoint(epoch_order(0, 1))  # ranks see different images


def test_shard_stream_skips_exactly_and_splits_ranks(tmp_path):
    import webdataset as wds

    pngs = image_folder(tmp_path / "src", ["s0", "s1", "s2"], 4, style="noise", size=(30, 20))
    for s in range(3):
        with wds.TarWriter(str(tmp_path / f"s-{s}.tar")) as w:
            for i in range(4):
                w.write({"__key__": f"{s}/{i}", "jpg": pngs[4 * s + i].read_bytes()})
    src = resolve_data(str(tmp_path / "s-{0..2}.tar"))
    assert src.kind == "shards" and src.num_samples == 12
    tr = TrainTransform(8, MEAN, STD)

    def take(n: int, **kw) -> list[torch.Tensor]:
        return [x for x, _ in itertools.islice(iter(ShardImages(src.items, tr, batch_size=2, **kw)), n)]

    full = take(10)
    later = take(6, skip_batches=2)  # two batches of two: four samples skipped without decoding
    assert all(torch.equal(a, b) for a, b in zip(full[4:], later))
    # as many streams as shards or fewer: whole shards per rank, disjoint
    r0, r1 = take(6, rank=0, world=2), take(6, rank=1, world=2)
    assert not any(torch.equal(a, b) for a in r0 for b in r1)
    # more streams than shards: every rank reads all shards and keeps every 4th sample; one pass = all 12, once
    parts = [take(3, rank=k, world=4) for k in range(4)]
    flat = [x for p in parts for x in p]
    assert len(flat) == 12
    assert not any(torch.equal(flat[i], flat[j]) for i in range(12) for j in range(i + 1, 12))


@pytest.mark.parametrize("skip", [1, 3, 4, 5])
def test_shard_resume_with_workers_sees_the_same_batches(tmp_path, skip):
    """DataLoader workers take batches round-robin: a loader resumed at batch k (k not a multiple of
    the worker count included) must yield exactly the uninterrupted loader's batches from k on."""
    import webdataset as wds
    from torch.utils.data import DataLoader

    pngs = image_folder(tmp_path / "src", ["s"], 24, style="noise", size=(20, 20))
    for s in range(6):
        with wds.TarWriter(str(tmp_path / f"s-{s}.tar")) as w:
            for i in range(4):
                w.write({"__key__": f"{s}/{i}", "png": pngs[4 * s + i].read_bytes()})
    urls = resolve_data(str(tmp_path / "s-{0..5}.tar")).items
    tr = TrainTransform(8, MEAN, STD)

    def batches(n: int, skip_batches: int) -> list[torch.Tensor]:
        ds = ShardImages(urls, tr, batch_size=2, skip_batches=skip_batches)
        loader = DataLoader(ds, batch_size=2, collate_fn=collate, num_workers=2)
        return [x for x, _ in itertools.islice(iter(loader), n)]

    full, resumed = batches(skip + 4, 0), batches(4, skip)
    assert len(resumed) == 4 and all(torch.equal(a, b) for a, b in zip(full[skip:], resumed))
