#!/usr/bin/env python3
"""`make data`: the downloader of :mod:`dreammix.data.download` (standard library only), run from
the source tree so that it works before or without ``make install``.

    python scripts/download_data.py                      # everything (≈ 7 GB, most of it test2017)
    python scripts/download_data.py --only dreambooth coco-val
    python scripts/download_data.py --fid-reference none # skip test2017
    python scripts/download_data.py --list               # what would be fetched, with checksums
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import dreammix.data.download as download  # noqa: E402 - after the path set-up above

if __name__ == "__main__":
    sys.exit(download.main())
