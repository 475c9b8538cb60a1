#!/usr/bin/env bash
# Run the `vision` tests (a torchvision ResNet's per-example gradient dots against a per-example loop) in a
# separate venv (.venv-vision) that sees this Python's packages and adds torchvision.
#
# On the CPU-only torch of scripts/setup.sh the only torchvision wheels on PyPI are CUDA builds whose compiled
# ops (_C.so: nms, roi_align, ...) cannot load beside it, and `import torchvision` then stops while registering
# fake kernels for torchvision::nms / qnms. The model code the tests use (torchvision.models) is pure PyTorch,
# so in that case only, the venv gets a sitecustomize.py that declares those two operator schemas (no kernels)
# before torchvision imports. With a torch that torchvision's ops load beside (a CUDA machine), nothing is added.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
VENV=.venv-vision
export PIP_DISABLE_PIP_VERSION_CHECK=1
[ -x "$VENV/bin/python" ] || "$PY" -m venv --system-site-packages "$VENV"
"$VENV/bin/python" -c "import torchvision" >/dev/null 2>&1 || "$VENV/bin/pip" install -q --no-deps "torchvision<=0.29.1"
SITE=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
if ! "$VENV/bin/python" -c "import torchvision" >/dev/null 2>&1; then
  cat > "$SITE/sitecustomize.py" <<'PYEOF'
import torch
_lib = torch.library.Library("torchvision", "DEF")
_lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
_lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
PYEOF
fi
"$VENV/bin/python" -c "import torchvision.models; print('torchvision', torchvision.__version__)"
"$VENV/bin/pip" install -q --no-deps -e .
exec env OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" "$VENV/bin/python" -m pytest -q -m vision -p no:cacheprovider tests "$@"
