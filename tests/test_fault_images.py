"""Image decoding (dgmr.io.images) and the distill readers built on it: odd modes, bombs,
FIFOs and devices, names that are not UTF-8, shards of nothing but corrupt images."""
from __future__ import annotations

import io
import itertools
import json
import os
import subprocess
import sys
import tarfile
import textwrap

import numpy as np
import pytest
from PIL import Image

from dgmr.data.unlabeled import ImageDataset, ShardImages, TrainTransform, collate, hash_str, resolve_data
from dgmr.core.errors import DgmrError
from dgmr.io.images import MAX_PIXELS, UnreadableImage, open_image, printable

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
RAMP = np.linspace(0, 1, 64 * 64).reshape(64, 64)  # mean 0.5


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def test_16_bit_and_float_images_keep_their_brightness(tmp_path):
    Image.fromarray((RAMP * 65535).astype(np.uint16)).save(tmp_path / "g16.png")
    Image.fromarray(RAMP.astype(np.float32), "F").save(tmp_path / "f.tif")
    Image.fromarray((RAMP * 65535).astype(np.int32), "I").save(tmp_path / "i32.tif")
    for name in ("g16.png", "f.tif", "i32.tif"):
        img = open_image(tmp_path / name)
        assert img.mode == "RGB" and img.size == (64, 64)
        # convert("RGB") gave ~0.995 for 16-bit (clipped to 255) and 0 for float (values below 1)
        assert np.asarray(img).mean() / 255 == pytest.approx(0.5, abs=0.01), name


@pytest.mark.parametrize("values, reason", [(RAMP * 300, r"values in \[0, 300\]"), (RAMP * np.nan, "NaN")])
def test_float_images_out_of_range_are_refused(tmp_path, values, reason):
    Image.fromarray(values.astype(np.float32), "F").save(tmp_path / "f.tif")
    with pytest.raises(UnreadableImage, match=reason) as e:
        open_image(tmp_path / "f.tif")
    assert str(tmp_path / "f.tif") in str(e.value) and isinstance(e.value, DgmrError)


def test_decompression_bomb_is_refused_from_its_header():
    side = int(MAX_PIXELS ** 0.5) + 100
    bomb = _png(Image.new("1", (side, side)))  # a few kB that would decode to ~90 MP
    with pytest.raises(UnreadableImage, match="decompression bomb") as e:
        open_image(bomb, name="bomb.png")
    assert e.value.name == "bomb.png"


def test_fifo_and_devices_are_refused_without_blocking(tmp_path):
    """A FIFO named in a --data list file: open_image must refuse it at once (opening it for
    reading used to block forever, waiting for a writer). Run in a child with a timeout."""
    os.mkfifo(tmp_path / "pipe.png")
    (tmp_path / "list.txt").write_text("pipe.png\n/dev/zero\n")
    code = textwrap.dedent(f"""
        from dgmr.data.unlabeled import ImageDataset, TrainTransform, collate, resolve_data
        src = resolve_data({str(tmp_path / 'list.txt')!r})
        ds = ImageDataset(src.items, TrainTransform(8, (0.5,) * 3, (0.5,) * 3))
        x, bad = collate([ds[i] for i in range(len(ds))])
        print(x, bad)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "None" in r.stdout and r.stdout.count("not a regular file") == 2


def test_names_that_are_not_utf8_are_read_and_reported(tmp_path):
    """A tar whose member names are not UTF-8: every image is read (hash_str used to raise on them,
    which made every one "unreadable"), and the corrupt one is named printably."""
    good = _png(Image.fromarray((RAMP * 255).astype(np.uint8)))
    with tarfile.open(tmp_path / "s.tar", "w", format=tarfile.GNU_FORMAT) as tf:
        for i, data in enumerate([good, good, b"garbage"]):
            info = tarfile.TarInfo(os.fsdecode(f"\xe9t\xe9-{i}.png".encode("latin-1")))
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    src = resolve_data(str(tmp_path / "s.tar"))
    assert src.num_samples == 3
    out = list(itertools.islice(iter(ShardImages(src.items, TrainTransform(8, MEAN, STD))), 3))
    assert sum(x is not None for x, _ in out) == 2
    (bad,) = [name for x, name in out if x is None]
    bad.encode("utf-8")  # printable: no lone surrogates left
    assert "\\xe9t\\xe9-2" in bad and "not an image" in bad
    assert hash_str(os.fsdecode(b"\xff")) != hash_str(os.fsdecode(b"\xfe"))
    assert printable(os.fsdecode(b"a\xffb")) == "a\\xffb"


def test_shard_stream_of_only_corrupt_images_ends(tmp_path):
    with tarfile.open(tmp_path / "s.tar", "w") as tf:
        for i in range(3):
            info = tarfile.TarInfo(f"{i}.jpg")
            info.size = 7
            tf.addfile(info, io.BytesIO(b"garbage"))
    src = resolve_data(str(tmp_path / "s.tar"))
    out = list(itertools.islice(iter(ShardImages(src.items, TrainTransform(8, MEAN, STD))), 1000))
    assert len(out) == 3 and all(x is None for x, _ in out)  # one pass, then the stream ends


def test_folder_reader_reports_odd_files_by_reason(tmp_path):
    Image.fromarray((RAMP * 65535).astype(np.uint16)).save(tmp_path / "a16.png")
    Image.fromarray((RAMP * 300).astype(np.float32), "F").save(tmp_path / "b.tif")
    ds = ImageDataset(resolve_data(str(tmp_path)).items, TrainTransform(8, MEAN, STD))
    x, bad = collate([ds[i] for i in range(len(ds))])
    assert x.shape[0] == 1 and len(bad) == 1
    assert bad[0].startswith(str(tmp_path / "b.tif")) and "only float images in [0, 1]" in bad[0]


def test_in_memory_16_bit_images_and_fifo_as_data(tmp_path):
    img16 = Image.fromarray((RAMP * 65535).astype(np.uint16))
    ds = ImageDataset([img16], TrainTransform(8, (0.0,) * 3, (1.0,) * 3))
    x, bad = collate([ds[0]])
    assert not bad and 0.1 < x.mean().item() < 0.9  # a crop of the ramp; was ~1.0 (clipped to 255)
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(DgmrError, match="is not a regular file or a directory"):
        resolve_data(str(tmp_path / "pipe"))


def test_file_names_that_are_not_utf8_in_folders_and_lists(tmp_path):
    png = _png(Image.fromarray((RAMP * 255).astype(np.uint8)))
    d = tmp_path / "imgs"
    d.mkdir()
    with open(os.fsencode(d) + b"/caf\xe9.png", "wb") as f:  # a Latin-1 name
        f.write(png)
    with open(os.fsencode(d) + b"/bad\xff.png", "wb") as f:
        f.write(b"garbage")
    (tmp_path / "list.txt").write_bytes(b"imgs/caf\xe9.png\nimgs/bad\xff.png\n")
    for data in (d, tmp_path / "list.txt"):
        src = resolve_data(str(data))
        ds = ImageDataset(src.items, TrainTransform(8, MEAN, STD))
        x, bad = collate([ds[i] for i in range(len(ds))])
        assert x.shape[0] == 1 and len(bad) == 1 and "bad\\xff.png" in bad[0], bad
        bad[0].encode("utf-8")  # printable in a summary and on a terminal
    (tmp_path / "bin.txt").write_bytes(b"\0\1\2")
    with pytest.raises(DgmrError, match="not a text file of image paths"):
        resolve_data(str(tmp_path / "bin.txt"))


def test_eval_readers_refuse_bombs_and_fifos_in_one_line_and_read_odd_names(tmp_path, cli, monkeypatch):
    from helpers import TINY_VIT_ARGV, image_folder

    image_folder(tmp_path / "train", ["a", "b"], 3, style="noise", size=(36, 36))
    image_folder(tmp_path / "val", ["a", "b"], 1, style="noise", size=(36, 36))
    odd = os.fsdecode(b"caf\xe9.png")  # a file name that is not UTF-8
    os.rename(tmp_path / "val" / "a" / "0.png", tmp_path / "val" / "a" / odd)
    knn = ("eval", "knn", *TINY_VIT_ARGV, "--train", tmp_path / "train", "--no-cache")
    code, out, err = cli(*knn, "--val", tmp_path / "val", "--json")
    assert code == 0, err
    n_test = json.loads(out)["n_test"]
    assert n_test == 2  # the image with the odd name is read
    side = int(MAX_PIXELS ** 0.5) + 100
    (tmp_path / "val" / "b" / "bomb.png").write_bytes(_png(Image.new("1", (side, side))))
    code, _, err = cli(*knn, "--val", tmp_path / "val")
    assert code == 2 and err.count("\n") == 1 and "bomb.png" in err and "decompression bomb" in err
    (tmp_path / "val" / "b" / "bomb.png").unlink()
    os.mkfifo(tmp_path / "val" / "b" / "pipe.png")
    code, out, err = cli(*knn, "--val", tmp_path / "val", "--json")  # would block forever if the FIFO were opened
    assert code == 0 and json.loads(out)["n_test"] == n_test  # not a file: not an image of the split
    (tmp_path / "val" / "b" / "pipe.png").unlink()

    import pathlib

    write_text = pathlib.Path.write_text

    def full(self, *a, **k):  # the result's disk is full: a partial write, then ENOSPC
        if "res" not in self.parts:
            return write_text(self, *a, **k)
        write_text(self, "{")
        raise OSError(28, "No space left on device", str(self))

    monkeypatch.setattr(pathlib.Path, "write_text", full)
    code, _, err = cli(*knn, "--val", tmp_path / "val", "--save", tmp_path / "res" / "knn.json")
    assert code == 2 and "No space left on device" in err and err.count("\n") == 1
    assert not (tmp_path / "res" / "knn.json").exists() and not list((tmp_path / "res").glob(".*"))


def test_a_huge_file_named_like_an_image_is_refused_before_it_is_read(tmp_path, monkeypatch):
    import dgmr.io.images as images

    monkeypatch.setattr(images, "MAX_IMAGE_BYTES", 1000)
    p = tmp_path / "big.png"
    with open(p, "wb") as f:
        f.truncate(5000)  # sparse: nothing is really read if the size is checked first
    with pytest.raises(UnreadableImage, match="5,000 bytes, more than the 1,000 allowed"):
        open_image(p)
