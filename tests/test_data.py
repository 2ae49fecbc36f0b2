"""fastddpm.data: every --data format loads; bad data fails with the file named;
the batch order is a function of (seed, step) and shards by rank."""
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from fastddpm import data
from fastddpm.data import DataError, ShardedBatchSampler, open_dataset


def _rng(seed=0):
    return np.random.default_rng(seed)


# ---- the embedded dataset ---------------------------------------------------------------

def test_embedded_dataset_ships_and_loads():
    assert os.path.getsize(data.EMBEDDED) < 1_000_000
    ds = open_dataset(None, 16)
    assert len(ds) >= 1000 and ds.image_shape == (16, 16, 3)
    batch = ds[[0, 5, 7]]
    assert batch.dtype == torch.uint8 and batch.shape == (3, 16, 16, 3)
    assert torch.equal(batch[1], torch.from_numpy(ds.images[5]))
    small = open_dataset(None, 8)
    assert small.image_shape == (8, 8, 3) and len(small) == len(ds)


def test_embedded_generator_is_deterministic():
    from fastddpm.assets.make_embedded import make_images

    shipped = np.load(data.EMBEDDED)
    a, la = make_images(n=len(shipped["images"]), seed=0)
    assert np.array_equal(shipped["images"], a) and np.array_equal(shipped["labels"], la)


# ---- .npz -------------------------------------------------------------------------------

def test_npz_loads(tmp_path):
    imgs = _rng().integers(0, 256, size=(20, 12, 12, 3), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", images=imgs)
    ds = open_dataset(str(tmp_path / "d.npz"), 12)
    assert np.array_equal(ds.images, imgs)
    assert open_dataset(str(tmp_path / "d.npz"), 8).image_shape == (8, 8, 3)
    np.savez(tmp_path / "one.npz", whatever=imgs[..., :1])  # a single array, any name; grey
    assert open_dataset(str(tmp_path / "one.npz"), 12).image_shape == (12, 12, 1)


@pytest.mark.parametrize("arr, words", [
    (np.zeros((4, 8, 8, 3), np.float32), ["uint8", "float32"]),
    (np.zeros((4, 8, 8), np.uint8), ["shape", "(4, 8, 8)"]),
    (np.zeros((4, 3, 8, 8), np.uint8), ["shape", "NHWC"]),
    (np.zeros((0, 8, 8, 3), np.uint8), ["no images"]),
])
def test_npz_bad_arrays_name_the_file(tmp_path, arr, words):
    path = tmp_path / "bad.npz"
    np.savez(path, images=arr)
    with pytest.raises(DataError) as e:
        open_dataset(str(path), 8)
    assert str(path) in str(e.value)
    for w in words:
        assert w in str(e.value)


def test_random_bytes_npz_is_not_called_pickled(tmp_path):
    """np.load takes a non-zip file for a pickle ("contains pickled data"): say what it is."""
    path = tmp_path / "random.npz"
    path.write_bytes(_rng().integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(DataError) as e:
        open_dataset(str(path), 8)
    msg = str(e.value)
    assert str(path) in msg and "not a valid .npz" in msg and "pickle" not in msg and "\n" not in msg


def test_corrupt_npz_names_the_file(tmp_path):
    path = tmp_path / "corrupt.npz"
    path.write_bytes(b"PK\x03\x04 this is not a zip file" * 10)
    with pytest.raises(DataError, match="corrupt.npz"):
        open_dataset(str(path), 8)


def test_wrong_kind_of_path(tmp_path):
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(DataError, match="x.txt"):
        open_dataset(str(tmp_path / "x.txt"), 8)
    with pytest.raises(DataError, match="no such file"):
        open_dataset(str(tmp_path / "missing"), 8)


# ---- CIFAR-10 python version ------------------------------------------------------------

def _write_cifar(folder, n=6):
    folder.mkdir(exist_ok=True)
    parts = []
    for i in range(1, 6):
        d = _rng(i).integers(0, 256, size=(n, 3072), dtype=np.uint8)
        parts.append(d)
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump({b"data": d, b"labels": list(range(n))}, f)
    return np.concatenate(parts)


def test_cifar_folder_loads(tmp_path):
    raw = _write_cifar(tmp_path / "cifar-10-batches-py")
    ds = open_dataset(str(tmp_path / "cifar-10-batches-py"), 32)
    assert ds.images.shape == (30, 32, 32, 3)
    # CIFAR rows are 1024 red, 1024 green, 1024 blue values, row-major
    assert ds.images[7, 0, 1, 0] == raw[7, 1] and ds.images[7, 2, 3, 2] == raw[7, 2048 + 2 * 32 + 3]
    assert open_dataset(str(tmp_path / "cifar-10-batches-py"), 16).image_shape == (16, 16, 3)


def test_cifar_folder_errors_name_the_file(tmp_path):
    folder = tmp_path / "c"
    _write_cifar(folder)
    (folder / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3.*missing"):
        open_dataset(str(folder), 32)
    (folder / "data_batch_3").write_bytes(b"garbage")
    with pytest.raises(DataError, match="data_batch_3"):
        open_dataset(str(folder), 32)
    with open(folder / "data_batch_3", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8)}, f)
    with pytest.raises(DataError, match=r"data_batch_3.*\(N, 3072\)"):
        open_dataset(str(folder), 32)


class _RunsCode:
    """Unpickling this runs a shell command (what a crafted batch file could do)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def test_cifar_batch_that_would_run_code_is_refused(tmp_path):
    folder = tmp_path / "c"
    _write_cifar(folder)
    marker = tmp_path / "marker"
    with open(folder / "data_batch_2", "wb") as f:
        pickle.dump({b"data": _RunsCode(marker), b"labels": [0]}, f)
    with pytest.raises(DataError) as e:
        open_dataset(str(folder), 32)
    msg = str(e.value)
    assert "data_batch_2" in msg and "system" in msg and "refused" in msg and "\n" not in msg
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, 4, 5, "numpy1"])
def test_cifar_genuine_format_batch_loads(tmp_path, protocol):
    """As the CIFAR-10 files are: a dict of bytes keys, uint8 (N, 3072) data, labels, names
    (the published files name numpy 1's numpy.core.multiarray)."""
    folder = tmp_path / "c"
    raw = _write_cifar(folder)
    d = _rng(9).integers(0, 256, size=(4, 3072), dtype=np.uint8)
    batch = {b"batch_label": b"training batch 1 of 5", b"labels": [3, 1, 4, 1], b"data": d,
             b"filenames": [b"a.png", b"b.png", b"c.png", b"d.png"]}
    if protocol == "numpy1":
        blob = pickle.dumps(batch, protocol=2).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
        assert b"numpy.core.multiarray\n_reconstruct" in blob
    else:
        blob = pickle.dumps(batch, protocol=protocol)
    (folder / "data_batch_1").write_bytes(blob)
    ds = open_dataset(str(folder), 32)
    assert ds.images.shape == (4 + 24, 32, 32, 3)
    assert ds.images[2, 0, 1, 0] == d[2, 1] and ds.images[2, 2, 3, 2] == d[2, 2048 + 2 * 32 + 3]
    assert ds.images[4, 0, 0, 0] == raw[6, 0]


# ---- image folders ----------------------------------------------------------------------

def _write_images(folder):
    folder.mkdir(exist_ok=True)
    (folder / "sub").mkdir(exist_ok=True)
    rng = _rng(3)
    Image.fromarray(rng.integers(0, 256, (20, 12, 3), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / "sub" / "b.jpg")
    Image.fromarray(rng.integers(0, 256, (9, 9), dtype=np.uint8)).save(folder / "c.JPEG")
    (folder / "notes.txt").write_text("ignored")


def test_image_folder_loads_in_workers(tmp_path):
    _write_images(tmp_path / "imgs")
    ds = open_dataset(str(tmp_path / "imgs"), 8)
    assert len(ds) == 3 and ds.image_shape == (8, 8, 3)
    sampler = ShardedBatchSampler(len(ds), 3, seed=0, start=0, stop=2)
    loader = data.make_loader(ds, sampler, workers=1, pin_memory=False)
    batches = list(loader)
    assert len(batches) == 2 and batches[0].shape == (3, 8, 8, 3) and batches[0].dtype == torch.uint8
    # short side resized to 8, then the centre crop: a 12 wide x 20 high image keeps its middle rows
    a = data._load_image(str(tmp_path / "imgs" / "a.png"), 8)
    assert a.shape == (8, 8, 3)


def test_empty_image_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images")
    with pytest.raises(DataError, match="empty.*no images"):
        open_dataset(str(tmp_path / "empty"), 8)


def test_corrupt_image_names_the_file(tmp_path):
    _write_images(tmp_path / "imgs")
    (tmp_path / "imgs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    with pytest.raises(DataError, match="broken.png"):
        open_dataset(str(tmp_path / "imgs"), 8)


@pytest.mark.parametrize("workers", [0, 1])
def test_truncated_image_fails_in_the_main_process_naming_the_file(tmp_path, workers):
    """The error comes out of the loader as a one-line DataError, not a worker's traceback."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(_rng().integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / "big.png")
    raw = (folder / "big.png").read_bytes()
    (folder / "big.png").write_bytes(raw[: len(raw) // 2])  # header fine, pixels cut off
    ds = data.ImageFolderDataset(str(folder), 8, check=False)
    loader = data.make_loader(ds, ShardedBatchSampler(1, 1, 0, 0, 1), workers=workers, pin_memory=False)
    with pytest.raises(DataError, match="big.png") as e:
        list(loader)
    assert "\n" not in str(e.value) and "Traceback" not in str(e.value)


def test_truncated_jpeg_passes_the_header_check(tmp_path):
    """verify() does not see a JPEG cut short: opening the folder succeeds (a full decode of
    every file is left to training), and decoding it names the file."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(_rng().integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / "cut.jpg")
    raw = (folder / "cut.jpg").read_bytes()
    (folder / "cut.jpg").write_bytes(raw[: len(raw) // 2])
    ds = open_dataset(str(folder), 8)
    with pytest.raises(DataError, match=r"cut\.jpg.*truncated"):
        ds[[0]]


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    """Mid-grey 16-bit data decodes to ~128/255 (PIL's own convert clips it to 255)."""
    v = np.linspace(0, 65535, 64).reshape(8, 8).astype(np.uint16)
    v[0, 0] = 32896  # 128 * 257: mid-grey
    Image.fromarray(v).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    out = data._load_image(str(tmp_path / "g16.png"), 8)
    assert out.dtype == np.uint8 and out.shape == (8, 8, 3)
    ref = np.rint(v / 257.0).astype(np.uint8)
    assert out[0, 0].tolist() == [128, 128, 128]
    assert np.array_equal(out[..., 0], ref) and np.array_equal(out[..., 2], ref)
    Image.fromarray(np.full((8, 8), 32896, np.uint16)).save(tmp_path / "grey.png")
    assert abs(data._load_image(str(tmp_path / "grey.png"), 8).mean() - 128) < 1


def test_transparency_is_composited_onto_white_and_counted(tmp_path):
    """RGBA, LA and palette-with-tRNS images: alpha 0 -> white, 255 -> the colour, between
    -> the blend; opening the folder counts them."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 200  # red everywhere; alpha 0 / 255 / 128 by row
    rgba[:3, :, 3], rgba[3:6, :, 3], rgba[6:, :, 3] = 0, 255, 128
    Image.fromarray(rgba, "RGBA").save(folder / "a.png")
    la = np.zeros((8, 8, 2), np.uint8)
    la[..., 0], la[..., 1] = 50, 0  # fully transparent grey
    Image.fromarray(la, "LA").save(folder / "b.png")
    pal = Image.fromarray(np.zeros((8, 8), np.uint8), "P")
    pal.putpalette([10, 20, 30] + [0] * 765)
    pal.save(folder / "c.png", transparency=0)
    Image.fromarray(np.full((8, 8, 3), 7, np.uint8)).save(folder / "d.png")  # opaque
    ds = open_dataset(str(folder), 8)
    assert ds.transparent == 3
    a, b, c, d = (ds[[i]][0].numpy() for i in range(4))
    assert a[0, 0].tolist() == [255, 255, 255]
    assert a[4, 0].tolist() == [200, 0, 0]
    assert np.abs(a[7, 0].astype(int) - [227, 127, 127]).max() <= 1  # 128/255 of red over white
    assert (b == 255).all() and (c == 255).all() and (d == 7).all()


# ---- order ------------------------------------------------------------------------------

def test_batch_order_depends_on_step_only_and_shards_by_rank():
    n, B = 50, 8
    one = list(ShardedBatchSampler(n, B, seed=3, start=0, stop=14))
    assert all(len(b) == B for b in one)
    # epochs: 6 full batches per epoch; each epoch is a permutation (no repeats inside it)
    first_epoch = np.concatenate(one[:6])
    assert len(set(first_epoch.tolist())) == 48
    assert one[:6] != one[6:12]
    # resuming at step 5 gives the same batches as running through
    assert list(ShardedBatchSampler(n, B, seed=3, start=5, stop=14)) == one[5:]
    # 2 or 4 ranks: the rank slices of each step concatenate to the global batch
    for world in (2, 4):
        shards = [list(ShardedBatchSampler(n, B, 3, 2, 14, rank=r, world=world)) for r in range(world)]
        for i, g in enumerate(one[2:]):
            assert sum((s[i] for s in shards), []) == g
    assert list(ShardedBatchSampler(n, B, seed=4, start=0, stop=1))[0] != one[0]


def test_sampler_errors():
    with pytest.raises(ValueError, match="divisible"):
        ShardedBatchSampler(50, 6, 0, 0, 1, rank=0, world=4)
    with pytest.raises(DataError, match="fewer than the batch size"):
        ShardedBatchSampler(5, 8, 0, 0, 1)


def test_to_model_input_scales_and_flips():
    u = torch.tensor([[[[0, 255, 0], [255, 0, 255]]]], dtype=torch.uint8)  # (1, 1, 2, 3) NHWC
    x = data.to_model_input(u, "cpu")
    assert x.shape == (1, 3, 1, 2) and x.min() == -1 and x.max() == 1
    xf = data.to_model_input(u, "cpu", flip=torch.tensor([True]))
    assert torch.equal(xf, x.flip(3))


def test_npz_whose_header_declares_more_than_memory_is_refused_before_reading(tmp_path):
    # a .npz whose .npy header declares 1,000,000 x 1024 x 1024 x 3 uint8 (2.9 TiB) and holds
    # no data: refused from the header, naming the size, before numpy allocates it
    import io
    import zipfile

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False,
                                                  "shape": (1_000_000, 1024, 1024, 3)})
    path = tmp_path / "bomb.npz"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("arr_0.npy", header.getvalue())
    with pytest.raises(data.DataError, match=r"bomb.npz \(array 'arr_0'\): \(1000000, 1024, 1024, 3\) uint8 images "
                                             r"need 2929\.7 GiB, more than half"):
        data.load_npz(str(path))
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (2, 4, 4, 3)})
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("arr_0.npy", header.getvalue())
    with pytest.raises(data.DataError, match="must be uint8"):   # also from the header
        data.load_npz(str(path))
