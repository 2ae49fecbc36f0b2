"""Triton kernels and their thin launchers (installed as fastddpm.kernels).

No autograd and no dispatch here: fastddpm.ops wraps these launchers in
torch.library custom ops and picks them per device. Import the modules
explicitly (`from fastddpm.kernels import group_norm`); importing this package
does not import triton.
"""
import os


def interpreting() -> bool:
    """True when Triton runs through its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def compile_ptx(kernel, signature, constexprs, arch=90, num_warps=4):
    """Compile a @triton.jit (or autotuned) kernel for CUDA sm_<arch> without a GPU and
    return its PTX. Catches what only the compiler sees (the interpreter runs the
    kernel as numpy). Needs TRITON_INTERPRET unset when the kernel module is imported.

    signature: {arg: "*bf16" | "i32" | "fp32" | ...} (ints not named default to i32);
    constexprs: {arg: value} for constexpr arguments and specialised ints.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    fn = kernel
    while not isinstance(fn, JITFunction):
        fn = fn.fn
    sig = {a: "constexpr" if a in constexprs else signature.get(a, "i32") for a in fn.arg_names}
    src = ASTSource(fn=fn, signature=sig,
                    constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps}).asm["ptx"]
