"""Upper bounds on every size a file or a flag can ask for, stated once.

Checkpoints, diffusers folders and statistics files are untrusted: each size
they declare is checked against these bounds (and the weights' shapes against
the config, without building the network) before anything is allocated for it,
so a crafted file cannot make fastddpm allocate more than the model it
describes needs. Each bound leaves real models far inside it and is small
enough that reaching it cannot exhaust a machine by itself.
"""

MAX_T = 100_000            # schedule length: the paper's T is 1000 (improved DDPM's 4000);
                           # the schedule and sampler tables cost ~0.2 KB per step
MAX_IMAGE_SIZE = 1024      # pixels per side: the paper's largest images are 256
IMAGE_CHANNELS = (1, 3)    # grayscale or RGB: what the data readers and the PNG grid handle
MAX_CHANNELS = 4096        # feature channels at any level (ch x ch_mult): the paper's widest is 512
MAX_LEVELS = 8             # resolutions (len(ch_mult)): the paper's 256x256 network has 6
MAX_RES_BLOCKS = 16        # residual blocks per resolution: the paper uses 2
MAX_HEADS = 64             # attention heads: the paper uses 1, diffusers' 8-channel heads at 512 give 64
MAX_ATTN_RESOLUTION = 64   # attention over r x r tokens stores heads x r^4 scores per image
                           # (64: 64 MiB per head in fp32); the paper attends at 16x16
MAX_SAMPLES = 1_000_000    # sample --n: 20x the 50,000 of an FID (larger sets: shard with --seed)
MAX_FEATURE_DIM = 2048     # statistics files: the Inception's pool features (pytorch-fid's other --dims are smaller)
MAX_KID_FEATURES = 100_000  # features kept in a statistics file (float32: 800 MB at 2048-d)
MAX_CONFIG_BYTES = 16 << 20  # a JSON config (trained_betas of MAX_T numbers take ~2.5 MB)


class LimitError(ValueError):
    """A size beyond its bound; the message names the field, its value and the bound."""


def _int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def check_int(where, field, value, bound, why=""):
    """Refuse an int `value` above `bound` (other types are left to the caller's own checks)."""
    if _int(value) and value > bound:
        raise LimitError(f"{where}: {field}={value} is above fastddpm's bound {bound}{' (' + why + ')' if why else ''}")


def check_unet_fields(where, image_size=None, in_channels=None, ch=None, ch_mult=(), num_res_blocks=None,
                      attn_resolutions=(), num_heads=None):
    """Bound every size of a UNet config (UNetConfig's fields, read before the
    network or even the config object is built: its checks loop over ch_mult)."""
    check_int(where, "image_size", image_size, MAX_IMAGE_SIZE)
    if _int(in_channels) and in_channels not in IMAGE_CHANNELS:
        raise LimitError(f"{where}: in_channels={in_channels} is not supported (images have "
                         f"{' or '.join(map(str, IMAGE_CHANNELS))} channels)")
    if isinstance(ch_mult, (list, tuple)):
        check_int(where, "len(ch_mult)", len(ch_mult), MAX_LEVELS, "resolution levels")
        mults = [m for m in ch_mult if _int(m)]
        if _int(ch) and mults:
            check_int(where, "ch x max(ch_mult)", ch * max(mults), MAX_CHANNELS, "channels at one level")
    check_int(where, "ch", ch, MAX_CHANNELS)
    check_int(where, "num_res_blocks", num_res_blocks, MAX_RES_BLOCKS)
    check_int(where, "num_heads", num_heads, MAX_HEADS)
    if isinstance(attn_resolutions, (list, tuple)):
        check_int(where, "len(attn_resolutions)", len(attn_resolutions), MAX_LEVELS, "one per level at most")
        for r in attn_resolutions:
            check_int(where, "attn_resolutions", r, MAX_ATTN_RESOLUTION)


def check_unet_config(where, cfg):
    """check_unet_fields on a UNetConfig dict (only the fields it holds)."""
    if not isinstance(cfg, dict):
        return
    names = ("image_size", "in_channels", "ch", "ch_mult", "num_res_blocks", "attn_resolutions", "num_heads")
    check_unet_fields(where, **{k: cfg[k] for k in names if k in cfg})


def check_diffusion_config(where, cfg):
    """Bound the schedule length of a GaussianDiffusion config ({"T": ...} or {"betas": [...]})."""
    if not isinstance(cfg, dict):
        return
    check_int(where, "T", cfg.get("T"), MAX_T, "schedule length")
    betas = cfg.get("betas")
    if isinstance(betas, (list, tuple)):
        check_int(where, "len(betas)", len(betas), MAX_T, "schedule length")
