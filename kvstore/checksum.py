"""CRC-32C of a payload, at hardware speed and without a copy.

Measured on these machines over an 11.8 MB block: crc32c 11-20 GB/s,
zlib.crc32 2.5 GB/s, blake2b 0.7 GB/s. google-crc32c (a dependency of gcsfs)
ships the C library: calling it through ctypes releases the GIL, so I/O
threads can check blocks side by side. Its Python extension is the fallback;
it only takes buffers without a release hook, hence the ctypes array view.
"""
from __future__ import annotations

import ctypes
import glob
import os

import google_crc32c
import numpy as np


def _load_library():
    package_dir = os.path.dirname(google_crc32c.__file__)
    for path in sorted(glob.glob(package_dir + ".libs/libcrc32c*.so*")):
        try:
            library = ctypes.CDLL(path)
        except OSError:
            continue
        library.crc32c_extend.restype = ctypes.c_uint32
        library.crc32c_extend.argtypes = [ctypes.c_uint32, ctypes.c_void_p, ctypes.c_size_t]
        return library
    return None


_LIBRARY = _load_library()


def crc32c(data, crc: int = 0) -> int:
    """CRC-32C of any C-contiguous buffer (bytes, memoryview, numpy array),
    continuing `crc`: crc32c(b, crc32c(a)) == crc32c(a + b)."""
    array = np.frombuffer(data, dtype=np.uint8)
    if _LIBRARY is not None:
        return _LIBRARY.crc32c_extend(crc, array.ctypes.data, array.nbytes)
    return google_crc32c.extend(crc, (ctypes.c_char * array.nbytes).from_address(array.ctypes.data))
