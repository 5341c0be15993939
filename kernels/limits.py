"""The problem sizes the kernels take: head dims for attention, row lengths for LayerNorm (the launchers check
them; the benchmark and the compile check refuse other sizes before any work), and attention's dropout seeds."""

MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 128  # attention: the tiles' dots need D >= 16; one head lives in registers
MAX_C = 65536  # LayerNorm: one row lives in registers: beyond this a row would need a looped kernel
# Attention's dropout seed travels to the kernels in an int64 tensor (the custom op's argument). megagpt's own seed
# range (megagpt/errors.py: SEED_MAX) is the same, but neither file can read the other's: kernels/ imports nothing
# of megagpt, and importing kernels.limits imports kernels/__init__ (torch, triton), which megagpt.errors must not.
# tests/test_kernels_attention.py checks that every seed megagpt accepts fits this one.
MAX_SEED = 2**63 - 1


def head_dim_problem(D: int) -> str | None:
    """Why attention cannot take head dim D (None: it can)."""
    ok = MIN_HEAD_DIM <= D <= MAX_HEAD_DIM
    return None if ok else f"unsupported (the kernel takes {MIN_HEAD_DIM} <= D <= {MAX_HEAD_DIM})"


def width_problem(C: int) -> str | None:
    """Why LayerNorm cannot take rows of C (None: it can)."""
    return None if 1 <= C <= MAX_C else f"unsupported (the kernel takes 1 <= C <= {MAX_C})"


def seed_problem(seed: int) -> str | None:
    """Why attention's dropout cannot take this seed (None: it can)."""
    return None if 0 <= seed <= MAX_SEED else "out of range (the kernel takes 0 <= seed <= 2**63 - 1)"
