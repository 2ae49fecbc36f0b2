"""Training data: sources, the deterministic sharded batch order, the DataLoader.

Sources (`open_dataset(spec, image_size)`):
  None                    the embedded dataset (fastddpm/assets/shapes16.npz)
  a CIFAR-10 folder       the "python version": data_batch_1 .. data_batch_5 pickles
  a folder of images      *.png / *.jpg / *.jpeg (recursively), resized so the short
                          side is image_size, then centre-cropped; decoded lazily in
                          DataLoader workers (see "Image files" below)
  a file.npz              uint8 images (N, H, W, C), C in {1, 3}; key "images",
                          "x" or "arr_0", or the only array in the file

Array sources are held in memory as one uint8 (N, S, S, C) array (resized once,
vectorised, if their size differs from image_size). Every dataset is indexed
by a *list* of indices and returns a whole uint8 batch (B, S, S, C), so no
Python runs per image for arrays or per pixel for anything; conversion to
float in [-1, 1], NCHW and the random flips happen on the training device.

Image files: always decoded to 8-bit RGB. 16-bit greyscale PNGs are scaled
(v / 257, rounded), not clipped. Transparency (RGBA, LA, or a palette / colour
key with a tRNS entry) is composited onto an opaque white background, the
colour most such images (icons, sprites, cut-outs) are drawn to be seen on;
the count of such files is reported when the folder is opened
(ImageFolderDataset.transparent). Opening a folder reads every file's header
and checks what PIL's verify() can (PNG chunk CRCs); a full decode of every
file would cost as much as an epoch, so a file whose pixel data is cut off or
corrupt (a truncated JPEG passes verify()) is found when it is first decoded:
the loader then raises, in the main process, a one-line DataError naming it
(fastddpm.train saves a checkpoint first).

Batch order: the permutation of epoch e is a function of (seed, e) only, and
global batch j of the run takes positions [j*B, (j+1)*B) of the concatenated
epochs (the tail of each epoch that does not fill a batch is dropped). Rank r
of W takes the r-th slice of B/W of that global batch. So the order depends on
the step alone: resuming means restarting at a step, with any number of ranks.
"""
import codecs
import hashlib
import math
import os
import pickle
import signal
import threading
import zipfile

import numpy as np
import torch

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
EMBEDDED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "shapes16.npz")
CIFAR_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST_BATCH = "test_batch"


class DataError(ValueError):
    """Unusable training data; the message names the file and the problem."""


# ---- array sources ------------------------------------------------------------------

def _check_images(arr, where):
    if not isinstance(arr, np.ndarray):
        raise DataError(f"{where}: expected a numpy array of images, got {type(arr).__name__}")
    _check_image_header(arr.shape, arr.dtype, where)
    return arr


def _check_image_header(shape, dtype, where):
    if dtype != np.uint8:
        raise DataError(f"{where}: images must be uint8 (N, H, W, C), got dtype {dtype}")
    if len(shape) != 4 or shape[3] not in (1, 3):
        raise DataError(f"{where}: images must have shape (N, H, W, C) with C in (1, 3) "
                        f"(NHWC), got shape {tuple(shape)}")
    if shape[0] == 0:
        raise DataError(f"{where}: contains no images (shape {tuple(shape)})")


def npz_member_header(f, key, path):
    """(shape, dtype) of array `key` of an open np.load .npz, from its .npy header
    alone: numpy allocates the size a header declares before reading the data, and a
    small compressed file can declare (and inflate to) any size. DataError for a
    header format numpy's readers do not know."""
    with f.zip.open(key + ".npy") as m:
        version = np.lib.format.read_magic(m)
        read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read is None:
            raise DataError(f"{path}: array '{key}' has .npy format version {version}, not 1.0 or 2.0")
        shape, _, dtype = read(m)
    return shape, dtype


def _check_fits_in_memory(shape, where):
    """The training and evaluation readers hold a whole .npz in memory: refuse one whose
    images would take more than half of this machine's memory before reading it."""
    need = math.prod(shape)
    try:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    if need > have // 2:
        raise DataError(f"{where}: {tuple(shape)} uint8 images need {need / 2**30:.1f} GiB, more than half of "
                        f"this machine's {have / 2**30:.1f} GiB of memory")


def load_npz(path):
    """uint8 (N, H, W, C) images from an .npz file."""
    if os.path.isfile(path) and not zipfile.is_zipfile(path):  # else np.load tries it as a pickle
        raise DataError(f"{path}: not a valid .npz file (an .npz is a zip archive of .npy arrays, "
                        "as numpy.savez writes; this file is not a zip archive)")
    try:
        with np.load(path, allow_pickle=False) as f:
            keys = list(f.keys())
            key = next((k for k in ("images", "x", "arr_0") if k in keys), None)
            if not keys:
                raise DataError(f"{path}: holds no arrays (an empty .npz)")
            if key is None:
                if len(keys) != 1:
                    raise DataError(f"{path}: no array named 'images', 'x' or 'arr_0' "
                                    f"and more than one array in the file ({keys})")
                key = keys[0]
            where = f"{path} (array '{key}')"
            shape, dtype = npz_member_header(f, key, path)
            _check_image_header(shape, dtype, where)
            _check_fits_in_memory(shape, where)
            arr = f[key]
    except DataError:
        raise
    except Exception as e:  # OSError, zipfile.BadZipFile, ValueError (object arrays), EOFError
        raise DataError(f"{path}: cannot read as .npz: {type(e).__name__}: {e}") from e
    return _check_images(arr, f"{path} (array '{key}')")


# What a CIFAR-10 "python version" batch may reference: numpy array and dtype
# reconstruction (numpy 1.x and 2.x module names; _frombuffer is pickle protocol 5's
# path) and _codecs.encode (how Python 3's protocol 2 spells bytes). Dicts, lists,
# ints and strings need no lookup. Anything else could run code.
_NP_CORE = np._core if hasattr(np, "_core") else np.core  # numpy 2 renamed core to _core
_CIFAR_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _NP_CORE.multiarray._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _NP_CORE.multiarray._reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _NP_CORE.numeric._frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _NP_CORE.numeric._frombuffer,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,
}


class _RefusedGlobal(pickle.UnpicklingError):
    pass


class _CifarUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return _CIFAR_GLOBALS[(module, name)]
        except KeyError:
            raise _RefusedGlobal(f"{module}.{name}") from None


def load_cifar10(folder, split="train"):
    """CIFAR-10 from the "python version" pickles: the 50,000 training images
    (data_batch_1 .. 5), or with split="test" the 10,000 of test_batch."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    parts = []
    for name in CIFAR_BATCHES if split == "train" else (CIFAR_TEST_BATCH,):
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            raise DataError(f"{path}: missing (a CIFAR-10 folder holds data_batch_1 .. data_batch_5 "
                            f"and test_batch)")
        try:
            with open(path, "rb") as f:
                d = _CifarUnpickler(f, encoding="bytes").load()
            data = d[b"data"] if b"data" in d else d["data"]
        except _RefusedGlobal as e:
            raise DataError(f"{path}: refused: the pickle references {e}, which a CIFAR-10 batch never "
                            "holds (only numpy arrays, lists and dicts), and loading it could run code") from None
        except Exception as e:
            raise DataError(f"{path}: not a readable CIFAR-10 batch pickle: {type(e).__name__}: {e}") from e
        data = np.asarray(data)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise DataError(f"{path}: 'data' must be uint8 (N, 3072), got {data.dtype} {data.shape}")
        parts.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return np.ascontiguousarray(np.concatenate(parts))


def resize_array(images, size):
    """uint8 (N, H, W, C) -> (N, size, size, C): short side resized to `size`
    (antialiased bilinear), then centre-cropped. Vectorised, in chunks."""
    n, h, w, c = images.shape
    if h == w == size:
        return images
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    out = np.empty((n, size, size, c), dtype=np.uint8)
    top, left = (nh - size) // 2, (nw - size) // 2
    for i in range(0, n, 4096):
        x = torch.from_numpy(images[i:i + 4096]).permute(0, 3, 1, 2).float()
        x = torch.nn.functional.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True,
                                            align_corners=False)
        x = x[:, :, top:top + size, left:left + size].round().clamp(0, 255).to(torch.uint8)
        out[i:i + 4096] = x.permute(0, 2, 3, 1).numpy()
    return out


class ArrayDataset(torch.utils.data.Dataset):
    """In-memory uint8 (N, S, S, C) images; dataset[list_of_indices] -> uint8 batch."""

    def __init__(self, images, source):
        self.images = images
        self.source = source

    def __len__(self):
        return len(self.images)

    @property
    def image_shape(self):
        return tuple(self.images.shape[1:])

    def __getitem__(self, indices):
        return torch.from_numpy(self.images[np.asarray(indices, dtype=np.int64)])

    def fingerprint(self):
        """A short digest of the contents (a strided subset), to recognise the data on resume."""
        h = hashlib.sha1()
        h.update(str(self.images.shape).encode())
        step = max(1, len(self.images) // 256)
        h.update(np.ascontiguousarray(self.images[::step]).tobytes())
        return h.hexdigest()[:16]


# ---- image folders ------------------------------------------------------------------

WHITE = (255, 255, 255)


def _has_alpha(im):
    return im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info


def _to_rgb(im):
    """A PIL image -> 8-bit RGB: 16-bit grey scaled, transparency composited onto white."""
    from PIL import Image

    if im.mode.startswith("I"):  # 16-bit greyscale PNG ("I;16", "I;16B", or "I"): 0..65535
        v = np.asarray(im, dtype=np.float64)
        im = Image.fromarray(np.clip(np.rint(v / 257.0), 0, 255).astype(np.uint8), "L")
    elif im.mode == "F":
        raise ValueError("floating-point images are not supported")
    if _has_alpha(im):
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, WHITE + (255,)), rgba)
    return im.convert("RGB")


def _load_image(path, size):
    """One image file -> uint8 (size, size, 3): short side resized, centre-cropped."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = _to_rgb(im)
            w, h = im.size
            scale = size / min(w, h)
            nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
            if (nw, nh) != (w, h):
                im = im.resize((nw, nh), Image.BICUBIC, reducing_gap=None)
            left, top = (nw - size) // 2, (nh - size) // 2
            im = im.crop((left, top, left + size, top + size))
            arr = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: unreadable or corrupt image: {type(e).__name__}: {e}") from e
    return arr


class ImageFolderDataset(torch.utils.data.Dataset):
    """PNG/JPEG files under a folder, decoded on demand (in DataLoader workers)."""

    def __init__(self, folder, size, check=True):
        self.folder, self.size = folder, size
        self.source = f"images:{folder}"
        self.transparent = 0  # files with an alpha channel or a transparent colour (checked ones)
        files = []
        for root, dirs, names in os.walk(folder):
            dirs.sort()
            files += [os.path.join(root, n) for n in sorted(names)
                      if n.lower().endswith(IMAGE_EXTENSIONS) and not n.startswith(".")]
        if not files:
            raise DataError(f"{folder}: no images (*.png, *.jpg, *.jpeg) found in this folder "
                            "or below it, and it is not a CIFAR-10 folder (data_batch_1 .. 5)")
        self.files = files
        if check:
            self._check_headers()

    def _check_headers(self):
        """Open every file's header (cheap) so a non-image fails before training starts."""
        from PIL import Image

        for path in self.files:
            try:
                with Image.open(path) as im:
                    self.transparent += _has_alpha(im)
                    im.verify()
            except Exception as e:
                raise DataError(f"{path}: unreadable or corrupt image: {type(e).__name__}: {e}") from e

    def __len__(self):
        return len(self.files)

    @property
    def image_shape(self):
        return (self.size, self.size, 3)

    def __getitem__(self, indices):
        return torch.from_numpy(np.stack([_load_image(self.files[i], self.size) for i in indices]))

    def fingerprint(self):
        h = hashlib.sha1()
        for f in self.files:
            h.update(os.path.relpath(f, self.folder).encode() + b"\0")
        h.update(str(self.size).encode())
        return h.hexdigest()[:16]


# ---- the entry point ----------------------------------------------------------------

def open_dataset(spec, image_size):
    """A dataset for `--data spec` at image_size x image_size (see the module docstring)."""
    if image_size is None or int(image_size) < 1:
        raise DataError(f"image_size must be a positive int, got {image_size!r}")
    if spec is None or spec in ("", "embedded"):
        return ArrayDataset(resize_array(load_npz(EMBEDDED), image_size), "embedded:shapes16")
    spec = os.fspath(spec)
    if not os.path.exists(spec):
        raise DataError(f"{spec}: no such file or folder")
    if os.path.isdir(spec):
        present = [n for n in CIFAR_BATCHES if os.path.exists(os.path.join(spec, n))]
        if present:
            return ArrayDataset(resize_array(load_cifar10(spec), image_size), f"cifar10:{spec}")
        return ImageFolderDataset(spec, image_size)
    if spec.lower().endswith(".npz"):
        return ArrayDataset(resize_array(load_npz(spec), image_size), f"npz:{spec}")
    raise DataError(f"{spec}: not a folder or an .npz file (--data takes a CIFAR-10 'python "
                    "version' folder, a folder of PNG/JPEG images, or an .npz of uint8 NHWC images)")


def epoch_permutation(n, seed, epoch):
    """The order of epoch `epoch`: a permutation of range(n) from (seed, epoch) only."""
    return np.random.default_rng([int(seed), int(epoch), 0x5EED]).permutation(n)


class ShardedBatchSampler(torch.utils.data.Sampler):
    """Yields, for steps start..stop-1, the indices rank `rank` of `world` uses:
    the rank-th slice of global batch `step` (see the module docstring)."""

    def __init__(self, n, global_batch, seed, start, stop, rank=0, world=1):
        if global_batch % world:
            raise ValueError(f"global batch size {global_batch} is not divisible by the "
                             f"number of ranks {world}")
        if n < global_batch:
            raise DataError(f"the dataset has {n} images, fewer than the batch size {global_batch}")
        self.n, self.B, self.seed = n, global_batch, seed
        self.start, self.stop, self.rank, self.world = start, stop, rank, world
        self.steps_per_epoch = n // global_batch

    def position(self, step):
        """(epoch, batch index within the epoch) of global step `step`."""
        return divmod(step, self.steps_per_epoch)

    def global_batch(self, step):
        epoch, j = self.position(step)
        return epoch_permutation(self.n, self.seed, epoch)[j * self.B:(j + 1) * self.B]

    def __len__(self):
        return max(0, self.stop - self.start)

    def __iter__(self):
        b = self.B // self.world
        perm_epoch, perm = None, None
        for step in range(self.start, self.stop):
            epoch, j = self.position(step)
            if epoch != perm_epoch:
                perm_epoch, perm = epoch, epoch_permutation(self.n, self.seed, epoch)
            g = perm[j * self.B:(j + 1) * self.B]
            yield g[self.rank * b:(self.rank + 1) * b].tolist()


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _worker_ignores_stop_signals(worker_id):
    """worker_init_fn: a stop signal is the main process's to handle. Slurm's scancel,
    systemd and a terminal's Ctrl-C signal every process of the job; a worker that
    died of it would crash the trainer before it could save. The workers start with
    SIGINT/SIGTERM blocked (see _Loader) and keep them blocked; a thread takes them
    and exits only on the parent's own SIGTERM (the DataLoader terminating a worker,
    also at interpreter exit). A worker still exits when the main process dies."""
    if not hasattr(signal, "sigwaitinfo"):  # not on Linux: no stop-signal handling
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)  # (already, when forked by _Loader)
    parent = os.getppid()

    def take():
        while True:
            info = signal.sigwaitinfo(_STOP_SIGNALS)
            if info.si_signo == signal.SIGTERM and info.si_pid == parent:
                os._exit(0)

    threading.Thread(target=take, name="fastddpm-stop-signals", daemon=True).start()


class _Errors(torch.utils.data.Dataset):
    """Returns a batch's DataError instead of raising it in the worker, where the
    DataLoader would turn it into a multi-line message with the worker's traceback."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, indices):
        try:
            return self.dataset[indices]
        except DataError as e:
            return e


class _Loader(torch.utils.data.DataLoader):
    def __iter__(self):
        if self.num_workers == 0 or not hasattr(signal, "sigwaitinfo"):
            return _raising(super().__iter__())
        # Workers fork here, so with the stop signals blocked: none can die of one that
        # arrives as it starts. The main process unblocks them at once.
        old = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            it = super().__iter__()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        return _raising(it)


def _raising(it):
    for batch in it:
        if isinstance(batch, DataError):
            raise batch
        yield batch


def make_loader(dataset, sampler, workers, pin_memory, seed=0):
    """A DataLoader yielding one uint8 (b, S, S, C) batch per step. It has its own
    generator, so creating it does not advance the global torch RNG (which
    dropout uses and checkpoints restore). Its workers ignore SIGINT/SIGTERM
    (the main process alone reacts to a stop); an unreadable image raises a
    one-line DataError naming the file in the main process."""
    kw = dict(prefetch_factor=4, worker_init_fn=_worker_ignores_stop_signals) if workers > 0 else {}
    return _Loader(_Errors(dataset), batch_size=None, sampler=sampler, num_workers=workers,
                   pin_memory=pin_memory, generator=torch.Generator().manual_seed(seed), **kw)


def to_model_input(batch_uint8, device, flip=None):
    """uint8 (b, S, S, C) -> float32 (b, C, S, S) in [-1, 1] on device; flip: bool (b,)
    mask of images to mirror left-right (on the device, no per-image Python)."""
    x = batch_uint8.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
    if flip is not None:
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
    return x.contiguous()
