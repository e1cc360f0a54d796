"""This distribution's version as ``sitemessage.VERSION`` gives it, a tuple of numbers like
django-sitemessage's ``(1, 4, 0)``: the installed distribution's, else (a checkout that is not
installed) pyproject.toml's."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

DISTRIBUTION = "sitemessage-celery"
#: The checkout's pyproject.toml, read only when the distribution is not installed.
PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def version_text() -> str:
    """The installed distribution's version; else pyproject.toml's, if it is this project's;
    else "0" (a copy of the packages that is neither installed nor a checkout)."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        pass
    try:
        project = tomllib.loads(PYPROJECT.read_text())["project"]
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return "0"
    return str(project.get("version", "0")) if project.get("name") == DISTRIBUTION else "0"


def version_tuple(text: str) -> tuple[int, ...]:
    """The release numbers of a version: "1.4.0" -> (1, 4, 0); a pre-release, post-release
    or local part is left out ("1.5.0rc1" -> (1, 5, 0))."""
    release = re.match(r"\d+(?:\.\d+)*", text)
    return tuple(int(part) for part in release[0].split(".")) if release else (0,)


VERSION = version_tuple(version_text())
