"""Write a copy of a wheel without some folders, its RECORD rewritten to the files kept.

Ray's wheel is larger than the GPU machines' carry limit; its Java worker jar (``ray/jars/``) and the
dashboard's web bundle (``ray/dashboard/client/build/``) are not needed to run Ray Train there.

Usage: python3 bench/gpu/trim_wheel.py SRC.whl DST.whl PREFIX [PREFIX ...]
"""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path


def trim(src: Path, dst: Path, drop: list[str]) -> tuple[int, int]:
    """Copy ``src`` to ``dst`` without the members under any of ``drop``; (kept, dropped) counts."""
    kept = dropped = 0
    with zipfile.ZipFile(src) as whl, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as out:
        for info in whl.infolist():
            if info.filename.startswith(tuple(drop)):
                dropped += 1
                continue
            data = whl.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                data = _record_without(data, drop)
            out.writestr(info, data)
            kept += 1
    return kept, dropped


def _record_without(record: bytes, drop: list[str]) -> bytes:
    # RECORD rows are "path,hash,size"; pip checks installed files against it.
    lines = record.decode("utf-8").splitlines(keepends=True)
    return "".join(line for line in lines if not line.startswith(tuple(drop))).encode("utf-8")


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    src, dst, *drop = argv
    kept, dropped = trim(Path(src), Path(dst), drop)
    size = Path(dst).stat().st_size / 2**20
    print(f"{dst}: {kept} files kept, {dropped} dropped, {size:.1f} MiB", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
