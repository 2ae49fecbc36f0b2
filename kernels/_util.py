"""Helpers the kernel modules share: whether Triton is interpreting, whether two
tensors overlap, and PTX compilation for sm_90 without a GPU (tests). A module
of its own so that the kernel modules never import their package's __init__."""
import os


def interpreting() -> bool:
    """True when Triton runs through its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def compile_ptx(kernel, signature, constexprs, arch=90, num_warps=4, num_stages=None, aligned=False):
    """Compile a @triton.jit (or autotuned) kernel for CUDA sm_<arch> without a GPU and
    return its PTX. Catches what only the compiler sees (the interpreter runs the
    kernel as numpy). Needs TRITON_INTERPRET unset when the kernel module is imported.

    signature: {arg: "*bf16" | "i32" | "fp32" | ...} (ints not named default to i32);
    constexprs: {arg: value} for constexpr arguments and specialised ints.
    aligned: mark every pointer and int argument divisible by 16, as the JIT does
    at launch for 16-byte aligned tensors and sizes/strides that are multiples of
    16 (without it, vectorised and asynchronous loads cannot be proven legal); or
    a collection of argument names to mark (the others not), to model one launch.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    fn = kernel
    while not isinstance(fn, JITFunction):
        fn = fn.fn
    sig = {a: "constexpr" if a in constexprs else signature.get(a, "i32") for a in fn.arg_names}
    marked = (lambda a: bool(aligned)) if isinstance(aligned, bool) else (lambda a: a in aligned)
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
             if marked(a) and sig[a] != "constexpr" and (sig[a].startswith("*") or sig[a][0] in "iu")}
    src = ASTSource(fn=fn, signature=sig,
                    constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()}, attrs=attrs)
    options = {"num_warps": num_warps} if num_stages is None else {"num_warps": num_warps, "num_stages": num_stages}
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options).asm["ptx"]


def overlaps(a, b) -> bool:
    """Whether tensors a and b may share memory (same storage and intersecting
    byte spans). Launchers refuse outputs that overlap inputs: the autotuner
    runs a kernel several times on the first call of a key, so an output
    written over an input would feed the next run (and in-place is no contract
    of these kernels)."""
    if a.numel() == 0 or b.numel() == 0 or a.device != b.device:
        return False
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False

    def span(t):  # [first byte, last byte + 1) that t can touch
        ext = [(n - 1) * st for n, st in zip(t.shape, t.stride())]
        es = t.element_size()
        return (t.data_ptr() + sum(e for e in ext if e < 0) * es,
                t.data_ptr() + (sum(e for e in ext if e > 0) + 1) * es)

    (alo, ahi), (blo, bhi) = span(a), span(b)
    return alo < bhi and blo < ahi
