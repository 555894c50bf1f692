"""The package imports without torchvision, whose CPU/CUDA mismatch breaks installs beside the CPU torch."""

import subprocess
import sys


def test_no_torchvision_imported():
    code = (
        "import sys, sharpness, verify, figures\n"
        "import sharpness.hvp\n"
        "bad = [m for m in sys.modules if m.split('.')[0] == 'torchvision']\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"torchvision was imported: {out.stdout}"


def test_torchvision_not_a_dependency():
    from importlib.metadata import requires

    reqs = requires("dsgd-sam") or []
    assert not any(r.lower().startswith("torchvision") for r in reqs), reqs


def test_sharpness_does_not_import_verify():
    code = (
        "import sys, pkgutil, importlib, sharpness\n"
        "for m in pkgutil.iter_modules(sharpness.__path__):\n"
        "    if m.name != '__main__':\n"
        "        importlib.import_module('sharpness.' + m.name)\n"
        "print(any(m.split('.')[0] == 'verify' for m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
