"""One import namespace: the four folders install beneath `kvtier`, nothing
else lands at the top of site-packages, and the public names work from
outside the checkout, installed in place (editable) or from a wheel."""
from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[1]
FOLDERS = {"kvtier": "kvtier", "engine": "kvtier.engine", "connectors": "kvtier.connectors",
           "kvstore": "kvtier.kvstore", "policies": "kvtier.policies"}

CHECK = """
import sys
import kvtier
from kvtier import LLM, SamplingParams
import kvtier.engine.llm_engine, kvtier.connectors.offloading, kvtier.kvstore.tiers.redis, kvtier.policies
assert SamplingParams(max_tokens=3).max_tokens == 3 and LLM.__module__ == "kvtier.engine.entrypoints.llm"
leaked = sorted(k for k in sys.modules if k.split(".")[0] in ("engine", "connectors", "kvstore", "policies"))
assert not leaked, leaked
print(kvtier.__file__)
"""


def test_every_package_folder_is_listed_for_install():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = set()
    for folder, name in FOLDERS.items():
        for init in (REPO / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / folder)
            found.add(".".join([name, *rel.parts]))
    assert found == listed


def test_installed_in_place_the_public_names_work_from_anywhere(tmp_path):
    out = subprocess.run([sys.executable, "-c", CHECK], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    version = subprocess.run([sys.executable, "-m", "kvtier", "--version"], cwd=tmp_path, capture_output=True,
                             text=True, timeout=120)
    assert version.returncode == 0 and version.stdout.startswith("kvtier "), version.stderr


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out),
                    str(REPO)], check=True, capture_output=True, timeout=300)
    return next(out.glob("kvtier-*.whl"))


def test_a_wheel_puts_only_kvtier_at_the_top(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"kvtier", wheel.name.split("-py")[0] + ".dist-info"}
    assert "kvtier/engine/attention/csrc/paged_decode.cpp" in names  # the kernel's source ships


def test_installed_from_the_wheel_it_imports_from_there(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    assert sorted(p.name for p in target.iterdir() if p.name != "bin") == ["kvtier", wheel.name.split("-py")[0]
                                                                           + ".dist-info"]
    out = subprocess.run([sys.executable, "-c", CHECK], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(target / "kvtier" / "__init__.py")
