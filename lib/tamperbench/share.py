"""The built report as one archive that opens from disk, with no network.

``python -m tamperbench share [HTML_DIR] [ARCHIVE]`` zips Jupyter Book's HTML output under one
top-level folder. Before writing, it checks that no page loads a script, stylesheet, font or
image from the network (a CDN): a supervisor may open the report offline, from ``file://``.
The archive is written atomically.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

from . import atomic

#: An asset that a page loads (not a link a reader may follow): src=, or href= of <link>.
_ASSET = re.compile(r"""<(?:script|img|iframe|source)[^>]*\ssrc=["'](https?:)?//[^"']+|<link[^>]*\shref=["'](https?:)?//[^"']+""",
                    re.IGNORECASE)
_CSS_URL = re.compile(r"""@import\s+url\(["']?(?:https?:)?//|url\(["']?https?://""", re.IGNORECASE)


class ShareError(RuntimeError):
    """The report cannot be shared as it is (missing, or loading assets from the network)."""


def network_assets(html_dir: Path) -> list[str]:
    """Every place where a page or stylesheet loads something from the network."""
    found = []
    for path in sorted(Path(html_dir).rglob("*")):
        if path.suffix == ".html":
            for m in _ASSET.finditer(path.read_text(encoding="utf-8", errors="replace")):
                found.append(f"{path.relative_to(html_dir)}: {m.group(0)[:120]}")
        elif path.suffix == ".css":
            text = path.read_text(encoding="utf-8", errors="replace")
            found += [f"{path.relative_to(html_dir)}: {m.group(0)}" for m in _CSS_URL.finditer(text)]
    return found


def make_archive(html_dir: Path, archive: Path, folder: str = "tamperbench-report") -> Path:
    """Zip ``html_dir`` into ``archive`` (under ``folder/``); refuse a report that needs a network."""
    html_dir, archive = Path(html_dir), Path(archive)
    if not (html_dir / "index.html").exists():
        raise ShareError(f"no report in {html_dir} (index.html is missing): build it first with make book")
    remote = network_assets(html_dir)
    if remote:
        raise ShareError("the report loads assets from the network, so it would not open offline:\n  "
                         + "\n  ".join(remote[:20]))
    with atomic.atomic_path(archive) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
            for path in sorted(html_dir.rglob("*")):
                if path.is_file():
                    zf.write(path, f"{folder}/{path.relative_to(html_dir).as_posix()}")
    return archive
