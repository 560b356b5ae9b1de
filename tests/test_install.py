"""The package as a user installs it: the wheel and sdist, and an environment without the extras.

The wheel and the sdist are built with hatchling, the build backend (in the test extra), in
well under a second; the sdist is built into a wheel again on its own, as pip does.
"""

from __future__ import annotations

import os
import re
import signal
import site
import subprocess
import sys
import tarfile
import zipfile
from email import message_from_string
from email.message import Message
from importlib.metadata import Distribution
from pathlib import Path

import pytest
from opentelemetry.instrumentation.instrumentor import BaseInstrumentor
from packaging.specifiers import SpecifierSet

import multirun
from child_processes import environment_without_settings

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "src" / "multirun"

BUILD = """
import sys
from hatchling.build import build_sdist, build_wheel
print(build_wheel(sys.argv[1]), build_sdist(sys.argv[1]) if sys.argv[2] == "both" else "")
"""


def _build(project: Path, out: Path, *, sdist: bool = True) -> tuple[Path, Path | None]:
    """The wheel (and sdist) hatchling builds from ``project``."""
    try:
        import hatchling  # noqa: F401
    except ImportError:
        pytest.fail(
            "these tests build the wheel with hatchling, the build backend, which is in the test "
            "extra: `.venv/bin/pip install -e '.[test]'` (scripts/test does it)",
            pytrace=False,
        )
    done = subprocess.run(
        [sys.executable, "-c", BUILD, str(out), "both" if sdist else "wheel"],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    wheel, *rest = done.stdout.split()
    return out / wheel, (out / rest[0] if rest else None)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    wheel, sdist = _build(ROOT, tmp_path_factory.mktemp("dist"))
    assert sdist is not None
    return wheel, sdist


def _dist(built: Path) -> str:
    """``multirun_otel-<version>``: the wheel's .dist-info and the sdist's folder are named so."""
    return "-".join(built.name.split("-")[:2]).removesuffix(".tar.gz")


def _metadata(wheel: Path) -> Message:
    with zipfile.ZipFile(wheel) as archive:
        return message_from_string(archive.read(f"{_dist(wheel)}.dist-info/METADATA").decode())


def _source_files() -> set[str]:
    """What the wheel must hold of the package: every module and py.typed, by wheel path, and
    the console script's module beside it."""
    return {
        f"multirun/{path.relative_to(SOURCE).as_posix()}"
        for path in SOURCE.rglob("*")
        if path.suffix in {".py", ".typed"} and "__pycache__" not in path.parts
    } | {"_multirun_cli.py"}


def test_the_wheel_holds_every_module_py_typed_and_the_license_and_nothing_else(
    built: tuple[Path, Path],
) -> None:
    wheel, _ = built
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    package = {name for name in names if not name.startswith(f"{_dist(wheel)}.dist-info/")}
    assert package == _source_files()
    assert "multirun/py.typed" in package
    assert f"{_dist(wheel)}.dist-info/licenses/LICENSE" in names


def test_the_wheel_metadata_names_license_readme_and_every_supported_python(
    built: tuple[Path, Path],
) -> None:
    metadata = _metadata(built[0])
    assert metadata["License-Expression"] == "Apache-2.0"
    assert metadata.get_all("License-File") == ["LICENSE"]
    assert metadata["Description-Content-Type"] == "text/markdown"
    assert metadata.get_payload().startswith("# multirun-otel\n")
    supported = SpecifierSet(metadata["Requires-Python"])
    classified = {
        c.rsplit(" ", 1)[1]
        for c in metadata.get_all("Classifier")
        if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)
    }
    assert classified == {f"3.{minor}" for minor in range(8, 20) if f"3.{minor}" in supported}
    assert classified == {"3.10", "3.11", "3.12", "3.13"}
    assert "Typing :: Typed" in metadata.get_all("Classifier")


def test_every_entry_point_of_the_wheel_loads(built: tuple[Path, Path], tmp_path: Path) -> None:
    with zipfile.ZipFile(built[0]) as archive:
        archive.extractall(tmp_path)
    entry_points = Distribution.at(tmp_path / f"{_dist(built[0])}.dist-info").entry_points
    assert {(e.group, e.name, e.value) for e in entry_points} == {
        ("console_scripts", "multirun", "_multirun_cli:main"),
        ("multirun.blob_exporters", "memory", "multirun.checkpoints.exporters:memory_exporter"),
        ("multirun.blob_exporters", "file", "multirun.checkpoints.exporters:file_exporter"),
        ("multirun.blob_exporters", "s3", "multirun.checkpoints.s3:s3_exporter"),
        ("opentelemetry_instrumentor", "clientai", "multirun.integrations.clientai:ClientAIInstrumentor"),
        ("opentelemetry_instrumentor", "motus", "multirun.integrations.motus:MotusInstrumentor"),
    }
    loaded = {e.name: e.load() for e in entry_points}  # what they name exists (in the source here)
    assert all(callable(target) for target in loaded.values())
    assert issubclass(loaded["clientai"], BaseInstrumentor)
    assert issubclass(loaded["motus"], BaseInstrumentor)


CONSOLE_SCRIPT = """
import importlib.abc, sys, time

class SlowImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "multirun.client":  # halfway through importing the package
            print("importing", flush=True)
            time.sleep(60)  # until Ctrl-C
        return None

sys.meta_path.insert(0, SlowImport())
from {module} import {function}  # what the console script pip writes runs
sys.exit({function}())
"""


@pytest.mark.skipif(os.name == "nt", reason="SIGINT is sent to a process group on Windows")
def test_ctrl_c_while_the_console_script_starts_is_one_line_not_a_traceback(
    built: tuple[Path, Path], tmp_path: Path
) -> None:
    """Importing the package takes a third of a second, which Ctrl-C often falls in: it ended
    the command with a traceback of the import, not the line Ctrl-C gives at any other time."""
    with zipfile.ZipFile(built[0]) as archive:
        archive.extractall(tmp_path / "wheel")
    [script] = Distribution.at(tmp_path / "wheel" / f"{_dist(built[0])}.dist-info").entry_points.select(
        group="console_scripts", name="multirun"
    )
    module, function = script.value.split(":")
    started = subprocess.Popen(
        [sys.executable, "-c", CONSOLE_SCRIPT.format(module=module, function=function), "runs"],
        cwd=tmp_path,
        env=_clean_env([str(tmp_path / "wheel")]),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert started.stdout is not None
    assert started.stdout.readline() == "importing\n"
    started.send_signal(signal.SIGINT)
    out, err = started.communicate(timeout=60)
    assert (started.returncode, out, err) == (130, "", "multirun: interrupted\n")


def test_the_sdist_holds_the_project_and_no_local_files(built: tuple[Path, Path]) -> None:
    _, sdist = built
    with tarfile.open(sdist) as archive:
        names = [name.removeprefix(f"{_dist(sdist)}/") for name in archive.getnames()]
    top = {name.split("/")[0] for name in names}
    assert top == {
        ".gitignore",
        "LICENSE",
        "PKG-INFO",
        "README.md",
        "benchmarks",  # tests/test_readme.py reads benchmarks/run.py
        "collector-config",
        "grafana",
        "pyproject.toml",
        "scripts",
        "src",
        "tests",
    }
    assert {f"src/{name}" for name in _source_files()} <= set(names)
    assert "tests/conftest.py" in names
    assert not [name for name in names if "__pycache__" in name or name.endswith(".pyc")]


def test_the_sdist_builds_the_same_wheel_on_its_own(built: tuple[Path, Path], tmp_path: Path) -> None:
    wheel, sdist = built
    with tarfile.open(sdist) as archive:
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # 3.10.12 and later
        archive.extractall(tmp_path, **safe)
    again, _ = _build(tmp_path / _dist(sdist), tmp_path / "dist", sdist=False)
    with zipfile.ZipFile(wheel) as first, zipfile.ZipFile(again) as second:
        assert sorted(second.namelist()) == sorted(first.namelist())
        metadata = f"{_dist(wheel)}.dist-info/METADATA"
        assert second.read(metadata) == first.read(metadata)


# ---------------------------------------------------------------------------
# an environment without the optional frameworks


def _packages_without(tmp_path: Path, *hidden: str) -> tuple[Path, list[str]]:
    """A folder of links to this environment's packages but those ``hidden`` (globs of
    site-packages entries: the module and its .dist-info), and the source tree to put on
    PYTHONPATH if the package is not installed from there (an editable install's .pth)."""
    folder = tmp_path / "site-packages"
    folder.mkdir()
    sites = [Path(p) for p in [*site.getsitepackages(), site.getusersitepackages()] if Path(p).is_dir()]
    for where in sites:
        for entry in where.iterdir():
            if not any(entry.match(pattern) for pattern in hidden) and not (folder / entry.name).exists():
                (folder / entry.name).symlink_to(entry)
    package_parent = Path(multirun.__file__).resolve().parents[1]
    source = [] if package_parent in [s.resolve() for s in sites] else [str(package_parent)]
    return folder, source


def _clean_env(path: list[str]) -> dict[str, str]:
    env = environment_without_settings()
    env["PYTHONPATH"] = os.pathsep.join(path)
    return env


def _python_without(tmp_path: Path, *hidden: str) -> tuple[list[str], dict[str, str]]:
    """A python command and environment seeing this one's packages but those ``hidden``, as
    where they were never installed."""
    folder, source = _packages_without(tmp_path, *hidden)
    return [sys.executable, "-S"], _clean_env([*source, str(folder)])  # -S: no site-packages but folder


def _venv_without(tmp_path: Path, *hidden: str) -> tuple[Path, dict[str, str]]:
    """The python of a virtual environment seeing this one's packages but those ``hidden``, and
    its environment: one with ``site`` (``opentelemetry-instrument`` works through sitecustomize)."""
    folder, source = _packages_without(tmp_path, *hidden)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    [packages] = venv.glob("lib/python*/site-packages")
    (packages / "without.pth").write_text(f"import site; site.addsitedir({str(folder)!r})\n")
    return venv / "bin" / "python", _clean_env(source)


INSTRUMENT = """
import logging, sys
logging.basicConfig(format="%(levelname)s %(message)s")
from importlib.metadata import PackageNotFoundError, version
from multirun.integrations.{module} import {instrumentor}
try:
    version(sys.argv[1])
    sys.exit("{module} is still installed")
except PackageNotFoundError:
    pass
assert {instrumentor}().instrument() is None
print({instrumentor}().is_instrumented_by_opentelemetry)
"""


@pytest.mark.parametrize(
    ("module", "instrumentor", "hidden", "said"),
    [
        (
            "clientai",
            "ClientAIInstrumentor",
            ("clientai", "clientai-*"),
            "ClientAI is not installed: pip install 'multirun-otel[clientai]'",
        ),
        (
            "motus",
            "MotusInstrumentor",
            ("motus", "lithosai_motus-*"),
            "Motus is not installed: pip install 'multirun-otel[motus]'"
            if sys.version_info >= (3, 12)
            else "Motus (lithosai-motus) needs Python 3.12 or newer, and this is Python "
            f"{sys.version_info.major}.{sys.version_info.minor}",
        ),
    ],
)
def test_instrumenting_a_framework_that_is_not_installed_says_what_to_install(
    tmp_path: Path, module: str, instrumentor: str, hidden: tuple[str, ...], said: str
) -> None:
    python, env = _python_without(tmp_path, *hidden)
    distribution = "clientai" if module == "clientai" else "lithosai-motus"
    done = subprocess.run(
        [*python, "-c", INSTRUMENT.format(module=module, instrumentor=instrumentor), distribution],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False"]
    assert done.stderr.splitlines() == [f"ERROR multirun: {instrumentor} instruments nothing: {said}"]


APP = """
import sys
from importlib import util
import multirun

@multirun.step
def double(x: int) -> int:
    return 2 * x

@multirun.run
def job() -> int:
    return double(21)

print(job(), sorted({name.split(".")[0] for name in sys.modules} & {"clientai", "motus"}))
# opentelemetry-instrument loaded both instrumentors, and neither framework can be found
print(sorted(name for name in sys.modules if name.startswith("multirun.integrations.")))
print([util.find_spec(name) for name in ("clientai", "motus")])
"""

# opentelemetry-instrument as its console script runs it (the venv made here has no scripts)
AUTO_INSTRUMENT = "from opentelemetry.instrumentation.auto_instrumentation import run; run()"


@pytest.mark.skipif(os.name == "nt", reason="the venv's python is under bin/")
def test_opentelemetry_instrument_without_either_framework_says_nothing_and_traces_the_program(
    tmp_path: Path,
) -> None:
    """Both entry points load, find no framework, and stay silent: no error, no warning."""
    python, env = _venv_without(tmp_path, "motus", "lithosai_motus-*", "clientai", "clientai-*")
    env["MULTIRUN_DIR"] = str(tmp_path / "mr")
    (tmp_path / "app.py").write_text(APP)
    done = subprocess.run(
        [str(python), "-c", AUTO_INSTRUMENT, str(python), "app.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "42 []",
        "['multirun.integrations._options', 'multirun.integrations._specs', "
        "'multirun.integrations.clientai', 'multirun.integrations.motus']",
        "[None, None]",
    ]
    assert done.stderr == ""
    assert list((tmp_path / "mr" / "traces").glob("*.jsonl"))
