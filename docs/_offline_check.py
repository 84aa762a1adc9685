"""Open pages of the built site in headless Chromium with the network off, and
check that their math renders and that they request nothing outside `site/`.

Run by `make site-check` after `make docs`; needs Debian's `chromium`.
"""

import json
import pathlib
import re
import subprocess
import sys
import tempfile


SITE = pathlib.Path(__file__).resolve().parent.parent / "site"
# Pages with math, and the home page.
PAGES = ("index.html", "concepts/precision/index.html", "api/nn/index.html")
# The traffic annotation of the requests a page makes (Chromium's
# `blink_resource_loader`), as against the browser's own update and time checks.
_PAGE_REQUEST = 101845102


def open_offline(page: pathlib.Path, workdir: pathlib.Path) -> tuple[str, set[str]]:
    """The page's DOM once its scripts have run, and every URL it requested from
    the network (files it loads are not in the log)."""
    net_log = workdir / "net.json"
    dom = subprocess.run(
        [
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={workdir / 'profile'}",
            # The network off: no proxy answers, and no name resolves.
            "--proxy-server=http://127.0.0.1:9",
            "--host-resolver-rules=MAP * ~NOTFOUND",
            f"--log-net-log={net_log}",
            "--virtual-time-budget=15000",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    events = re.findall(
        r'"traffic_annotation":(\d+),"url":"([^"]+)"', net_log.read_text()
    )
    return dom, {url for tag, url in events if int(tag) == _PAGE_REQUEST}


def main() -> int:
    failures = []
    for name in PAGES:
        with tempfile.TemporaryDirectory() as workdir:
            dom, urls = open_offline(SITE / name, pathlib.Path(workdir))
        outside = sorted(urls)
        math = dom.count('class="arithmatex"')
        rendered = len(re.findall(r'class="arithmatex">\s*<mjx-container', dom))
        print(
            json.dumps(
                {
                    "page": name,
                    "math": math,
                    "rendered": rendered,
                    "requests_outside_site": outside,
                }
            )
        )
        if outside or rendered < math:
            failures.append(name)
    if failures:
        print(f"Failed offline: {failures}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
