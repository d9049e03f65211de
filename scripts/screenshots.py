"""PNG screenshots of a report's sections with headless Chromium, e.g. for the README.

    python scripts/screenshots.py OUT DEST [--sections map,categories] [--width 1280] [--height 1000]

Opens ``OUT/report.html#only=<section>`` (the report then shows that one section alone)
at a fixed viewport and writes ``DEST/<section>.png``; by default every section of the
page. Chromium comes from $CHROMIUM, else /usr/bin/chromium or chromium/chromium-browser/
google-chrome on PATH. Offline: the report is self-contained.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

DEFAULT_SIZE = (1280, 1000)
RENDER_BUDGET_MS = 20000
"""Virtual time the page gets to draw its charts before the screenshot."""


def find_chromium() -> str | None:
    candidates = [os.environ.get("CHROMIUM"), "/usr/bin/chromium",
                  *(shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome"))]
    return next((c for c in candidates if c and Path(c).exists()), None)


def page_sections(page: Path) -> list[str]:
    """The section ids of a report, in page order."""
    return re.findall(r'<section id="([A-Za-z0-9_-]+)"', Path(page).read_text(encoding="utf-8"))


def screenshot(chromium: str, page: Path, section: str, dest: Path, size: tuple[int, int] = DEFAULT_SIZE,
               profile: Path | None = None, timeout: float = 120) -> Path:
    """One section of ``page`` alone at ``size`` (width, height) pixels, as the PNG ``dest``."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        command = [
            chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={profile or scratch}", f"--virtual-time-budget={RENDER_BUDGET_MS}",
            f"--window-size={size[0]},{size[1]}", f"--screenshot={dest.resolve()}",
            Path(page).resolve().as_uri() + f"#only={section}",
        ]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0 or not dest.exists():
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"chromium could not screenshot {page}#{section} (exit {done.returncode}): {tail}")
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the run's output folder (holds report.html)")
    parser.add_argument("dest", type=Path, help="folder for the PNG files")
    parser.add_argument("--sections", default=None, help="comma-separated section ids (default: all)")
    parser.add_argument("--width", type=int, default=DEFAULT_SIZE[0])
    parser.add_argument("--height", type=int, default=DEFAULT_SIZE[1])
    args = parser.parse_args(argv)
    page = args.out / "report.html"
    if not page.is_file():
        print(f"error: {page}: missing; write it with `conceptmon report --out {args.out}`", file=sys.stderr)
        return 1
    chromium = find_chromium()
    if chromium is None:
        print("error: no Chromium found: install one (Debian: apt-get install chromium) or set CHROMIUM",
              file=sys.stderr)
        return 1
    available = page_sections(page)
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()] if args.sections else available
    unknown = [s for s in wanted if s not in available]
    if unknown:
        print(f"error: --sections: {', '.join(unknown)} not in {page}; sections: {', '.join(available)}",
              file=sys.stderr)
        return 1
    for section in wanted:
        try:
            path = screenshot(chromium, page, section, args.dest / f"{section}.png", (args.width, args.height))
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
