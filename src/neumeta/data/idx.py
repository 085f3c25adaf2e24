"""Reader for the IDX format, the file format of MNIST and Fashion-MNIST.

An IDX file is: two zero bytes, one byte naming the element type, one byte giving the number
of dimensions, one big-endian uint32 per dimension, then the elements in big-endian order.
The files are usually shipped gzipped, so both plain and gzipped files are read.
"""

import gzip
import zlib
from pathlib import Path

import numpy as np

# The type byte of the header, mapped to the big-endian numpy type it stands for.
IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

GZIP_MAGIC = b"\x1f\x8b"
HEADER_SIZE = 4


def read_idx(path) -> np.ndarray:
    """Read an IDX file (plain or gzipped) into a native-endian numpy array.

    Every problem is raised as a ValueError naming the file, so a bad download points at the
    file to delete rather than at a line of this reader.
    """
    path = Path(path)
    raw = _read_bytes(path)

    if len(raw) < HEADER_SIZE:
        raise ValueError(f"{path}: too short for an IDX header ({len(raw)} bytes)")
    if raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: bad IDX magic {raw[:4].hex()} (expected 0000TTDD)")

    type_code, ndim = raw[2], raw[3]
    if type_code not in IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX element type 0x{type_code:02x}")
    dtype = IDX_DTYPES[type_code]

    data_start = HEADER_SIZE + 4 * ndim
    if len(raw) < data_start:
        raise ValueError(f"{path}: truncated IDX header ({ndim} dimensions declared)")
    shape = tuple(int(size) for size in np.frombuffer(raw, dtype=">u4", count=ndim, offset=HEADER_SIZE))

    expected_bytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    actual_bytes = len(raw) - data_start
    if actual_bytes < expected_bytes:
        raise ValueError(
            f"{path}: truncated IDX data, shape {shape} needs {expected_bytes} bytes, found {actual_bytes}"
        )
    if actual_bytes > expected_bytes:
        raise ValueError(
            f"{path}: {actual_bytes - expected_bytes} unexpected bytes after IDX data of shape {shape}"
        )

    array = np.frombuffer(raw, dtype=dtype, count=expected_bytes // dtype.itemsize, offset=data_start)
    # A native-endian, writable copy: torch.from_numpy rejects big-endian arrays and warns on
    # the read-only view that frombuffer gives.
    return array.astype(dtype.newbyteorder("=")).reshape(shape)


def _read_bytes(path: Path) -> bytes:
    """Whole file contents, gunzipped when the file is gzip (by name or by its first bytes)."""
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise ValueError(f"{path}: cannot read file ({error})") from error

    if not (raw[:2] == GZIP_MAGIC or path.suffix == ".gz"):
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as error:
        raise ValueError(f"{path}: broken gzip file ({error})") from error
