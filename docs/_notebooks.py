"""An mkdocs hook: the site's tutorials are the notebooks in notebooks/, which live
there beside their sources rather than in docs/."""

import pathlib

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File


ROOT = pathlib.Path(__file__).parent.parent


@event_priority(100)  # before mkdocs-jupyter turns notebooks into pages
def on_files(files, config):
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        uri = path.relative_to(ROOT).as_posix()
        files.append(File(uri, str(ROOT), config.site_dir, config.use_directory_urls))
    return files
