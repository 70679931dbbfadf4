#!/usr/bin/env bash
# Installs TorchRec and FBGEMM's CPU build (fbgemm-gpu-cpu) in the versions that pair with the
# torch already installed in this Python environment; docs/torchrec.md says what they enable.
#
#   scripts/install_torchrec.sh            # python from PATH (an active venv)
#   PYTHON=/path/to/python scripts/install_torchrec.sh
#   FBGEMM_DIST=fbgemm-gpu scripts/install_torchrec.sh   # the CUDA build instead
#
# FBGEMM ships one binary per torch release (fbgemm_gpu 1.X <-> torch 2.(X + 5)), and
# torchrec's metadata asks for the CUDA `fbgemm-gpu`, which shares the `fbgemm_gpu` import name
# with the CPU build: torchrec goes in with --no-deps and its own dependencies after it. An
# extra in pyproject.toml cannot express that, hence this script.
set -euo pipefail

PY=${PYTHON:-python}
FBGEMM_DIST=${FBGEMM_DIST:-fbgemm-gpu-cpu}

if ! TORCH=$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null); then
    echo "install_torchrec.sh: torch is not installed for $PY; install torch first" >&2
    exit 1
fi
case "${TORCH%.*}" in
    2.14) FBGEMM=1.9.0; TORCHREC=1.9.2 ;;
    2.11) FBGEMM=1.6.0; TORCHREC=1.6.1 ;;
    *)
        echo "install_torchrec.sh: no tested FBGEMM/TorchRec pair for torch $TORCH" \
             "(torch 2.14 -> fbgemm-gpu-cpu 1.9.0 + torchrec 1.9.2;" \
             "torch 2.11 -> fbgemm-gpu-cpu 1.6.0 + torchrec 1.6.1)" >&2
        exit 1 ;;
esac

echo "install_torchrec.sh: torch $TORCH -> $FBGEMM_DIST $FBGEMM, torchrec $TORCHREC"
"$PY" -m pip install "$FBGEMM_DIST==$FBGEMM"
"$PY" -m pip install --no-deps "torchrec==$TORCHREC"
"$PY" -m pip install tensordict "torchmetrics==1.0.3" tqdm pyre-extensions iopath
# torch must still be the one FBGEMM was built for (a dependency must not have moved it).
"$PY" -c "import torch, fbgemm_gpu, torchrec; assert torch.__version__.split('+')[0] == '$TORCH', torch.__version__; print('install_torchrec.sh: ok (torch', torch.__version__, ', fbgemm_gpu', fbgemm_gpu.__version__, ', torchrec', torchrec.__version__, ')')"
