"""The problem sizes the kernels take: head dims for attention, row lengths for LayerNorm (the launchers check
them; the benchmark and the compile check refuse other sizes before any work)."""

MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 128  # attention: the tiles' dots need D >= 16; one head lives in registers
MAX_C = 65536  # LayerNorm: one row lives in registers: beyond this a row would need a looped kernel


def head_dim_problem(D: int) -> str | None:
    """Why attention cannot take head dim D (None: it can)."""
    ok = MIN_HEAD_DIM <= D <= MAX_HEAD_DIM
    return None if ok else f"unsupported (the kernel takes {MIN_HEAD_DIM} <= D <= {MAX_HEAD_DIM})"


def width_problem(C: int) -> str | None:
    """Why LayerNorm cannot take rows of C (None: it can)."""
    return None if 1 <= C <= MAX_C else f"unsupported (the kernel takes 1 <= C <= {MAX_C})"
