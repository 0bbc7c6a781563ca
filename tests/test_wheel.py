"""recbench works outside its clone: the built wheel, installed into a fresh virtual environment,
runs a job from an empty folder (the command and the Python API), with its configs inside the
package. The fresh environment borrows this one's third-party packages (torch, TorchRec, ...:
no download) but not its recbench, which is an editable install of the source tree."""
from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
JOB = ["method=qr", "budget.compression_ratio=0.1", "dataset=synthetic", "dataset.rows=20000", "trainer.max_epochs=1",
       "trainer.progress=false", "trainer.latency_repeats=1", "runtime.num_threads=1", "tracking=memory"]

API = """
import recbench, sys
assert recbench.__file__.startswith(sys.prefix), recbench.__file__
r = recbench.run("qr", dataset="synthetic", compression_ratio=0.1, partitions=3, tracking="memory",
                 overrides=["dataset.rows=20000", "trainer.max_epochs=1", "trainer.progress=false",
                            "trainer.latency_repeats=1", "runtime.num_threads=1"])
assert r.status == "finished" and 0.5 < r.metrics["test/auc"] <= 1, r
assert "QR" in type(r.model.embedding).__name__  # the deployable form the test metrics measured
print("api", recbench.__version__, round(r.metrics["test/auc"], 4))
"""


def _source_copy(dest: Path) -> Path:
    """The source tree's files (tracked, and new ones not ignored) copied to ``dest``: setuptools
    builds in the source folder (``build/``), which must stay clean."""
    files = subprocess.run(["git", "-C", str(REPO), "ls-files", "--cached", "--others", "--exclude-standard"],
                           check=True, capture_output=True, text=True).stdout.splitlines()
    for name in files:
        if (REPO / name).is_symlink():  # recbench/cards -> ../methods: kept a link, as git checks it out
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(os.readlink(REPO / name), dest / name)
        elif (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    return dest


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    root = tmp_path_factory.mktemp("wheel")
    source = _source_copy(root / "source")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "-w", str(root / "dist"), str(source)], check=True, timeout=600, capture_output=True)
    wheels = list((root / "dist").glob("recbench-*.whl"))
    assert len(wheels) == 1
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root / "venv")], check=True, timeout=120)
    python = root / "venv" / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
                    str(wheels[0])], check=True, timeout=600, capture_output=True)
    # third-party packages from this environment: its site-packages as a plain path (a path added by
    # a .pth line has its own .pth files ignored, so this environment's editable recbench stays out)
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    (Path(purelib) / "borrowed.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return root, wheels[0]


def _env(root: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLFLOW_TRACKING_URI")}
    env.update(RECBENCH_DATA_ROOT=str(root / "data"), RECBENCH_RUN_ROOT=str(root / "runs"))
    return env


def test_the_wheel_carries_the_configs(venv):
    import zipfile

    names = zipfile.ZipFile(venv[1]).namelist()
    assert "recbench/conf/config.yaml" in names and "recbench/conf/method/qr.yaml" in names
    assert sum(n.startswith("recbench/conf/method/") and n.endswith(".yaml") for n in names) == \
        len(list((REPO / "recbench" / "conf" / "method").glob("*.yaml")))
    # the search-path plugin through which installed packages add their methods (docs/extending.md)
    assert "hydra_plugins/recbench_entry_points/recbench_entry_points.py" in names
    # the method cards, which recbench-methods reads (recbench/cards links to methods/ in the clone)
    assert sum(n.startswith("recbench/cards/") and n.endswith(".md") for n in names) == \
        len(list((REPO / "methods").glob("*.md")))


def test_the_installed_command_runs_a_job_from_an_empty_folder(venv, tmp_path):
    root, _ = venv
    out = subprocess.run([str(root / "venv" / "bin" / "recbench"), *JOB], cwd=tmp_path, env=_env(tmp_path),
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "status                         finished" in out.stdout and "test AUC" in out.stdout
    methods = subprocess.run([str(root / "venv" / "bin" / "recbench-methods"), "qr"], cwd=tmp_path,
                             env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert methods.returncode == 0 and "partitions" in methods.stdout, methods.stderr[-2000:]
    assert "Paper: Shi, Mudigere" in methods.stdout  # the card header, from the wheel's copy of the card


@pytest.mark.slow  # ~15 s; the installed command's job stays in the default suite
def test_the_installed_python_api_runs_a_job_and_returns_its_model(venv, tmp_path):
    root, _ = venv
    out = subprocess.run([str(root / "venv" / "bin" / "python"), "-c", API], cwd=tmp_path, env=_env(tmp_path),
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1].startswith("api 0.")
