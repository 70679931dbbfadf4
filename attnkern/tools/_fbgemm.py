"""Whether FBGEMM (``fbgemm_gpu``, the kernels under TorchRec) can be used with this torch.

FBGEMM ships one binary per torch release: fbgemm_gpu 1.X is built against torch 2.(X + 5)
(1.9 <-> 2.14, 1.6 <-> 2.11), and a mismatched pair fails at import with undefined symbols or
worse. The version is read from the package metadata first, so a mismatched FBGEMM is named,
never imported; nothing here runs when attnkern is imported."""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
from typing import Optional, Tuple

import torch

DISTRIBUTIONS = ("fbgemm-gpu-cpu", "fbgemm-gpu", "fbgemm-gpu-nightly-cpu", "fbgemm-gpu-nightly")
_OFFSET = 5  # fbgemm_gpu 1.X <-> torch 2.(X + 5)


def _release(version: str) -> Optional[Tuple[int, int]]:
    try:
        major, minor = version.split("+")[0].split(".")[:2]
        return int(major), int(minor)
    except ValueError:
        return None


def torch_release() -> Tuple[int, int]:
    return _release(torch.__version__) or (0, 0)


def matching_fbgemm(torch_version: Tuple[int, int]) -> Optional[str]:
    """"1.X" for torch 2.(X + 5), None for a torch no FBGEMM release pairs with."""
    major, minor = torch_version
    return "1.%d" % (minor - _OFFSET) if major == 2 and minor >= _OFFSET + 1 else None


def installed_fbgemm() -> Optional[Tuple[str, str]]:
    """(distribution, version) of the installed FBGEMM, or None."""
    for name in DISTRIBUTIONS:
        try:
            return name, importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


@functools.lru_cache(maxsize=None)
def fbgemm_status() -> Optional[str]:
    """None when fbgemm_gpu imports and pairs with this torch, else the reason (naming the
    versions and what to install)."""
    tv = torch_release()
    want = matching_fbgemm(tv)
    hint = ("fbgemm-gpu-cpu %s.x (scripts/install_torchrec.sh)" % want if want
            else "a torch that FBGEMM supports")
    found = installed_fbgemm()
    if found is None or importlib.util.find_spec("fbgemm_gpu") is None:
        return "fbgemm_gpu is not installed; torch %s pairs with %s" % (torch.__version__, hint)
    dist_name, version = found
    rel = _release(version)
    # Nightlies are versioned by date: their pairing cannot be read off, so they are tried.
    if rel is not None and rel[0] < 2000 and want is not None and "%d.%d" % rel != want:
        return ("%s %s is built for torch 2.%d, this is torch %s: install %s"
                % (dist_name, version, rel[1] + _OFFSET, torch.__version__, hint))
    try:
        import fbgemm_gpu  # noqa: F401
    except Exception as e:  # noqa: BLE001 - a broken binary raises OSError, ImportError, ...
        return "fbgemm_gpu %s does not import with torch %s (%s: %s)" % (
            version, torch.__version__, type(e).__name__, e)
    return None


def status_with(module: str) -> Optional[str]:
    """fbgemm_status(), then whether `module` (fbgemm_gpu.sll, torchrec, ...) imports."""
    why = fbgemm_status()
    if why is not None:
        return why
    try:
        importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - a broken install raises anything
        return "%s does not import (%s: %s); see scripts/install_torchrec.sh" % (module, type(e).__name__, e)
    return None
