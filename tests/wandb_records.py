"""Read the records of an offline W&B run file (``run-*.wandb``), so tests check what a run holds.

The file is a LevelDB-style log (W&B's ``:W&B`` header, then 32 KiB blocks of CRC-framed chunks, each a
FULL record or FIRST/MIDDLE/LAST pieces of one) of ``wandb_internal_pb2.Record`` protobufs.
"""

from __future__ import annotations

import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

HEADER, BLOCK, CHUNK_HEADER = 7, 32768, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list[pb.Record]:
    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path}: not a W&B run file (header {data[:4]!r})")
    out, pos, pending = [], HEADER, b""
    while pos + CHUNK_HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < CHUNK_HEADER:  # block trailer: zero padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + CHUNK_HEADER])
        if kind == 0 and length == 0:
            break
        chunk = data[pos + CHUNK_HEADER:pos + CHUNK_HEADER + length]
        pos += CHUNK_HEADER + length
        if kind == FULL:
            pending = chunk
        elif kind == FIRST:
            pending = chunk
            continue
        elif kind == MIDDLE:
            pending += chunk
            continue
        else:
            pending += chunk
        rec = pb.Record()
        rec.ParseFromString(pending)
        out.append(rec)
        pending = b""
    return out


def summary(path: Path) -> dict:
    """What a reader of the run cares about: artifacts (name -> type, files), logged keys, config."""
    arts, keys = {}, set()
    for r in records(path):
        kind = r.WhichOneof("record_type")
        if kind == "artifact":
            arts[r.artifact.name] = (r.artifact.type, [m.path for m in r.artifact.manifest.contents])
        elif kind == "history":
            keys |= {i.key or "/".join(i.nested_key) for i in r.history.item}
    return {"artifacts": arts, "keys": keys}
