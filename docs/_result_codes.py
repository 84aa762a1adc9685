"""An mkdocs hook: the table of `revdeq.RESULTS` codes and their messages, written
from the class itself wherever a page holds the marker below."""

import revdeq


MARKER = "<!-- result codes -->"


def on_page_markdown(markdown: str, **kwargs) -> str:
    if MARKER not in markdown:
        return markdown
    rows = ["| code | message |", "|---|---|"]
    for name, item in revdeq.RESULTS._name_to_item.items():
        message = " ".join(revdeq.RESULTS[item].split()).replace("|", "\\|")
        message = message or "(none)"
        rows.append(f"| `{name}` | {message} |")
    return markdown.replace(MARKER, "\n".join(rows))
