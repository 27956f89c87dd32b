import ctypes
import sys

import psutil
import pytest

from slowft import heap

glibc = sys.platform.startswith("linux") and hasattr(ctypes.CDLL(None), "malloc_trim")


@pytest.mark.skipif(not glibc, reason="glibc's heap: macOS's zones are not checked here")
def test_free_heap_pages_go_back_to_the_system():
    """200 MB of small blocks, freed but for the last (it keeps the heap from shrinking at its
    top, as a live tensor does in a step), stay resident until they are released."""
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size, n = 16 << 10, 12800  # below malloc's mmap threshold: from the heap
    blocks = [libc.malloc(size) for _ in range(n)]
    for b in blocks:
        ctypes.memset(b, 1, size)
    for b in blocks[:-1]:
        libc.free(b)
    rss = psutil.Process().memory_info().rss
    heap.release_free_heap()
    freed = rss - psutil.Process().memory_info().rss
    libc.free(blocks[-1])
    assert freed > 150e6


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RSS falls at once on Linux; macOS reclaims lazily")
def test_a_buffer_lent_for_less_gives_back_its_unused_pages():
    """The pool lends a block's buffer to a smaller unit (the head, at dim 4096): the pages past
    what the unit needs are freed (they leave RSS, and their contents are gone: a shared mapping's
    would only leave RSS and stay in memory); those it needs keep their contents."""
    from slowft.directio import aligned_empty
    from slowft.streaming import BufferPool

    big = aligned_empty(64 << 20)
    big.fill_(7)
    pool = BufferPool(max_bytes=64 << 20)
    pool.give({"unit": big})
    rss = psutil.Process().memory_info().rss
    lent = pool.take(16 << 20)
    freed = rss - psutil.Process().memory_info().rss
    assert lent.data_ptr() == big.data_ptr() and lent.numel() == 64 << 20
    assert freed > 40e6
    kept, past = lent[: 16 << 20], lent[16 << 20 :]
    assert int(kept.ne(7).count_nonzero()) == 0 and int(past.count_nonzero()) == 0
