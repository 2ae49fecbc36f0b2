"""Input checks at the ops boundary: clear ValueError/TypeError, never asserts."""
import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_float(name, x):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")


def check_same(name, x, ref_name, ref, dtype=True):
    if x.shape != ref.shape:
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {ref_name}'s shape {tuple(ref.shape)}")
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device}, expected {ref_name}'s device {ref.device}")
    if dtype and x.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {x.dtype}, expected {ref_name}'s dtype {ref.dtype}")


def check_timesteps(t, batch, num_timesteps, device, check_range=True):
    """t must be an int64 tensor of shape (batch,) on `device` with values in [0, T-1].

    The range check reads t on the host; it is skipped while a CUDA graph is
    being captured or under torch.compile, where a sync is not allowed.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"t must be an int64 tensor of shape ({batch},), got {type(t).__name__}")
    if t.dtype != torch.int64:
        raise TypeError(f"t must be int64, got {t.dtype}")
    if t.shape != (batch,):
        raise ValueError(f"t must have shape ({batch},) (one timestep per sample), got {tuple(t.shape)}")
    if t.device != torch.device(device):
        raise ValueError(f"t is on {t.device}, expected {device}")
    if not check_range or batch == 0 or no_sync():
        return
    lo, hi = int(t.min()), int(t.max())
    if lo < 0 or hi >= num_timesteps:
        raise ValueError(f"t must lie in [0, {num_timesteps - 1}], got values in [{lo}, {hi}]")


def no_sync() -> bool:
    """True where the host must not read device memory (CUDA-graph capture, torch.compile)."""
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def check_table(name, table, device):
    if not isinstance(table, torch.Tensor) or table.dim() != 1:
        raise ValueError(f"{name} must be a 1-D tensor of length T")
    if table.device != torch.device(device):
        raise ValueError(f"{name} is on {table.device}, expected {device}")


def check_tables(tables: dict, device) -> int:
    """Every {name: table} 1-D float on `device`, all of one length T; returns T."""
    for name, tab in tables.items():
        check_table(name, tab, device)
    lengths = {name: tab.shape[0] for name, tab in tables.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError("coefficient tables must have one length T, got "
                         + ", ".join(f"{n}: {k}" for n, k in lengths.items()))
    T = next(iter(lengths.values()))
    if T < 1:
        raise ValueError("coefficient tables are empty (T = 0)")
    return T
