"""The machine's apt sources, read so a source package comes from the archive the machine already
uses: a mirror or a proxying archive behind a firewall serves `apt-get source` as it serves
`apt-get install`.

Reads both formats apt does: one-line entries (`/etc/apt/sources.list`, `sources.list.d/*.list`)
and deb822 stanzas (`sources.list.d/*.sources`). Parsing is pure; only `system_sources` reads files.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

ETC_APT = Path("/etc/apt")
_TYPES = ("deb", "deb-src")


@dataclass(frozen=True)
class AptSource:
    """One entry: where the archive is, which suites and components of it, and the keyring that signs it."""

    types: tuple[str, ...]
    uri: str
    suites: tuple[str, ...]
    components: tuple[str, ...]
    # A keyring path or fingerprint list, or an inline key (deb822 only, its lines joined by "\n").
    signed_by: str | None = None


def parse_one_line(text: str) -> list[AptSource]:
    """Entries of a sources.list in the one-line format: `TYPE [OPTIONS] URI SUITE [COMPONENT...]`."""
    sources = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        match = re.fullmatch(r"(\S+)\s+(?:\[([^\]]*)\]\s+)?(.*)", line)
        if not match or match[1] not in _TYPES:
            continue
        words = match[3].split()
        if len(words) < 2:
            continue
        options = dict(option.split("=", 1) for option in (match[2] or "").split() if "=" in option)
        sources.append(
            AptSource(
                types=(match[1],),
                uri=words[0],
                suites=(words[1],),
                components=tuple(words[2:]),
                signed_by=options.get("signed-by"),
            )
        )
    return sources


def _stanzas(text: str) -> Iterable[dict[str, str]]:
    """The fields of each deb822 stanza, names lower-cased; a continued value keeps its lines."""
    fields: dict[str, str] = {}
    name = ""
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        if not line.strip():
            if fields:
                yield fields
            fields, name = {}, ""
        elif line[0] in " \t" and name:
            fields[name] += "\n" + line[1:]
        elif ":" in line:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            fields[name] = value.strip()
    if fields:
        yield fields


def parse_deb822(text: str) -> list[AptSource]:
    """Entries of a `.sources` file (deb822 stanzas); disabled stanzas are left out."""
    sources = []
    for fields in _stanzas(text):
        if fields.get("enabled", "yes").strip().lower() == "no":
            continue
        types = tuple(kind for kind in fields.get("types", "").split() if kind in _TYPES)
        for uri in fields.get("uris", "").split():
            if types and fields.get("suites"):
                sources.append(
                    AptSource(
                        types=types,
                        uri=uri,
                        suites=tuple(fields["suites"].split()),
                        components=tuple(fields.get("components", "").split()),
                        signed_by=fields.get("signed-by") or None,
                    )
                )
    return sources


def system_sources(etc_apt: Path = ETC_APT) -> list[AptSource]:
    """Every entry the machine's apt reads from its sources.list and sources.list.d."""
    sources = []
    for path in [etc_apt / "sources.list", *sorted((etc_apt / "sources.list.d").glob("*.list"))]:
        if path.is_file():
            sources += parse_one_line(path.read_text(errors="replace"))
    for path in sorted((etc_apt / "sources.list.d").glob("*.sources")):
        sources += parse_deb822(path.read_text(errors="replace"))
    return sources


def deb_src_entries(sources: Iterable[AptSource], suites: Sequence[str], component: str = "main") -> list[AptSource]:
    """deb-src entries for `component` of `suites`, from the entries (deb or deb-src) that serve
    them; one per archive and keyring, suites in the order asked for. A suite of an archive comes
    once, with the first entry's keyring: apt refuses two keyrings for one."""
    wanted: dict[tuple[str, str | None], list[str]] = {}
    taken: set[tuple[str, str]] = set()
    for source in sources:
        if component not in source.components or source.uri.startswith("cdrom:"):
            continue
        uri = source.uri.rstrip("/")
        found = wanted.setdefault((uri, source.signed_by), [])
        for suite in source.suites:
            if suite in suites and (uri, suite) not in taken:
                taken.add((uri, suite))
                found.append(suite)
    return [
        AptSource(
            types=("deb-src",),
            uri=uri,
            suites=tuple(suite for suite in suites if suite in found),
            components=(component,),
            signed_by=signed_by,
        )
        for (uri, signed_by), found in wanted.items()
        if found
    ]


def render_deb822(sources: Iterable[AptSource]) -> str:
    """A `.sources` file with these entries."""
    stanzas = []
    for source in sources:
        lines = [
            f"Types: {' '.join(source.types)}",
            f"URIs: {source.uri}",
            f"Suites: {' '.join(source.suites)}",
            f"Components: {' '.join(source.components)}",
        ]
        if source.signed_by:
            first, *rest = source.signed_by.split("\n")
            lines += [f"Signed-By: {first}", *(f" {line}" for line in rest)]
        stanzas.append("\n".join(lines) + "\n")
    return "\n".join(stanzas)
