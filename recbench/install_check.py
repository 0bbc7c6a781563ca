"""Checks that the installed stack is the tested CPU stack; exits non-zero with a clear message.

Run by ``make setup``: torch / fbgemm_gpu / torchrec must import and FBGEMM's CPU ops must load;
no CUDA wheels (``nvidia-*``, ``triton``, the CUDA ``fbgemm-gpu``) may be present on a CPU install.
"""
from __future__ import annotations

import sys
from importlib import metadata

EXPECTED = {"torch": "2.13.0", "fbgemm_gpu-cpu": "1.8.0", "torchrec": "1.8.0", "mlflow": "3.17.2", "hydra-core": "1.3.8"}
FORBIDDEN_PREFIXES = ("nvidia-", "triton")
FORBIDDEN_EXACT = ("fbgemm-gpu", "fbgemm_gpu")


def software_versions() -> str:
    """One line naming Python and the pinned stack as installed, e.g. for run tags and reports."""
    import platform

    found = []
    for name in EXPECTED:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            found.append(f"{name} absent")
    return ", ".join([f"python {platform.python_version()}", *found])


def problems() -> list:
    found = []
    installed = {}
    for dist in metadata.distributions():
        name = (dist.metadata["Name"] or "").strip()
        installed[name.lower().replace("_", "-")] = dist.version
        lowered = name.lower()
        if lowered.startswith(FORBIDDEN_PREFIXES) or lowered in FORBIDDEN_EXACT:
            found.append(f"{name}=={dist.version} is installed: a CUDA package on a CPU install "
                         "(remove it: pip uninstall -y {0}; then re-run make setup)".format(name))
    for name, version in EXPECTED.items():
        key = name.lower().replace("_", "-")
        have = installed.get(key)
        if have is None:
            found.append(f"{name} is not installed (expected {version})")
        elif not have.split("+")[0] == version:
            found.append(f"{name}=={have} is installed, expected {version}")
    try:
        import torch
        import fbgemm_gpu  # noqa: F401  (loads FBGEMM's CPU operator library)
        import torchrec  # noqa: F401

        if not hasattr(torch.ops.fbgemm, "asynchronous_complete_cumsum"):
            found.append("fbgemm_gpu imported but its operators are not registered with torch")
        if torch.version.cuda is not None and not torch.cuda.is_available():
            found.append(f"torch {torch.__version__} is a CUDA build on a machine without a GPU "
                         "(install the CPU build: pip install torch==2.13.0 --index-url <cpu index>)")
    except Exception as exc:  # pragma: no cover - reported to the user
        found.append(f"import failed: {type(exc).__name__}: {exc}")
    return found


def main() -> int:
    found = problems()
    if found:
        print("recbench install check FAILED:", file=sys.stderr)
        for line in found:
            print(f"  - {line}", file=sys.stderr)
        return 1
    import torch
    import torchrec

    print(f"recbench install check OK: torch {torch.__version__}, torchrec {torchrec.__version__}, fbgemm_gpu-cpu 1.8.0")
    return 0


if __name__ == "__main__":
    sys.exit(main())
