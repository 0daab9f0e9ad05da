"""Where the local cluster's build fetches Debian's `kubernetes` source package from: the machine's
own apt sources (a mirror or proxy included), in both formats apt reads. Pure parsing, no network."""

from __future__ import annotations

from pathlib import Path

from tuneloom_dev.aptsources import AptSource, deb_src_entries, parse_deb822, parse_one_line, render_deb822
from tuneloom_dev.kubebuild import SOURCE_SUITES, source_entries

KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"

ONE_LINE = f"""\
# the main archive, through the company mirror
deb [ arch=amd64 signed-by={KEYRING} ] http://mirror.example/debian bookworm main contrib  # nearest
deb-src http://mirror.example/debian bookworm-updates main
deb-src http://mirror.example/debian/ bookworm main
deb http://mirror.example/debian-security bookworm-security main non-free-firmware
deb https://packages.cloud.google.com/apt cloud-sdk-bookworm main
deb http://mirror.example/debian bookworm-backports contrib
deb [trusted=yes] file:/srv/flat ./
"""

DEB822 = f"""\
Types: deb
# http://snapshot.debian.org/archive/debian/20250520T000000Z
URIs: http://proxy.example:3142/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: {KEYRING}

Types: deb deb-src
URIs: http://proxy.example:3142/debian-security
Suites: bookworm-security
Components: main
Signed-By:
 -----BEGIN PGP PUBLIC KEY BLOCK-----
 .
 mQINBGPL0BUBEADmW5NdOOHwPIJlgPu6JDcKw/NZJPR8lsD3K87ZM18gzyQZJD+w
 -----END PGP PUBLIC KEY BLOCK-----

Types: deb
URIs: https://deb.nodesource.com/node_20.x
Suites: nodistro
Components: main

Enabled: no
Types: deb
URIs: http://old.example/debian
Suites: bookworm
Components: main
"""


def test_one_line_entries() -> None:
    sources = parse_one_line(ONE_LINE)
    assert sources[0] == AptSource(
        ("deb",), "http://mirror.example/debian", ("bookworm",), ("main", "contrib"), KEYRING
    )
    assert sources[1] == AptSource(("deb-src",), "http://mirror.example/debian", ("bookworm-updates",), ("main",))
    assert [source.uri for source in sources][-1] == "file:/srv/flat"
    assert len(sources) == 7


def test_deb822_stanzas() -> None:
    sources = parse_deb822(DEB822)
    assert [source.uri for source in sources] == [
        "http://proxy.example:3142/debian",
        "http://proxy.example:3142/debian-security",
        "https://deb.nodesource.com/node_20.x",
    ]
    assert sources[0].suites == ("bookworm", "bookworm-updates")
    assert sources[1].types == ("deb", "deb-src")
    assert sources[1].signed_by is not None
    assert sources[1].signed_by.splitlines()[1:3] == ["-----BEGIN PGP PUBLIC KEY BLOCK-----", "."]


def test_deb_src_for_the_debian_suites_of_the_machines_archives() -> None:
    entries = deb_src_entries(parse_one_line(ONE_LINE), SOURCE_SUITES)
    # The mirror's bookworm comes twice, with and without a keyring: apt accepts it once.
    assert entries == [
        AptSource(("deb-src",), "http://mirror.example/debian", ("bookworm",), ("main",), KEYRING),
        AptSource(("deb-src",), "http://mirror.example/debian", ("bookworm-updates",), ("main",)),
        AptSource(("deb-src",), "http://mirror.example/debian-security", ("bookworm-security",), ("main",)),
    ]
    # Third-party archives, other suites and other components are not Debian's main archive.
    assert not deb_src_entries(parse_deb822(DEB822)[2:], SOURCE_SUITES)


def test_rendered_sources_read_back_the_same() -> None:
    entries = deb_src_entries(parse_deb822(DEB822), SOURCE_SUITES)
    assert [(entry.uri, entry.suites) for entry in entries] == [
        ("http://proxy.example:3142/debian", ("bookworm", "bookworm-updates")),
        ("http://proxy.example:3142/debian-security", ("bookworm-security",)),
    ]
    assert parse_deb822(render_deb822(entries)) == entries


def test_the_build_reads_the_machines_sources_and_falls_back_to_debian(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    fallback = source_entries(tmp_path)
    assert [(entry.uri, entry.suites) for entry in fallback] == [
        ("http://deb.debian.org/debian", ("bookworm", "bookworm-updates")),
        ("http://deb.debian.org/debian-security", ("bookworm-security",)),
    ]
    (tmp_path / "sources.list").write_text(ONE_LINE)
    (tmp_path / "sources.list.d" / "proxy.sources").write_text(DEB822)
    (tmp_path / "sources.list.d" / "old.sources.disabled").write_text(DEB822.replace("proxy", "disabled"))
    uris = [entry.uri for entry in source_entries(tmp_path)]
    assert uris == [
        "http://mirror.example/debian",
        "http://mirror.example/debian",
        "http://mirror.example/debian-security",
        "http://proxy.example:3142/debian",
        "http://proxy.example:3142/debian-security",
    ]
