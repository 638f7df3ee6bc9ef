#!/usr/bin/env bash
# Install the benchmark's peers into the Python environment that runs the benchmark, without touching torch.
#
# timm, ema-pytorch, torch-ema and diffusers all declare torch (timm also torchvision), so they are installed
# with --no-deps; the plain packages they import (huggingface-hub, safetensors, regex, ...) are installed
# normally: none of them depends on torch. Versions are the pins in bench/requirements.txt.
#
# The environment: $PYTHON if set, else the active virtual environment ($VIRTUAL_ENV), else the first of
# .venv/ or venv/ in or next to this checkout, else python3/python on PATH; it must already have torch.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"

has_torch() { [ -x "$1" ] || command -v "$1" >/dev/null 2>&1 || return 1; "$1" -c "import torch" >/dev/null 2>&1; }

python=""
if [ -n "${PYTHON:-}" ]; then
    python="$PYTHON"
else
    for candidate in "${VIRTUAL_ENV:+$VIRTUAL_ENV/bin/python}" "$repo/.venv/bin/python" "$repo/venv/bin/python" \
        "$repo/../.venv/bin/python" "$repo/../venv/bin/python" python3 python; do
        if [ -n "$candidate" ] && has_torch "$candidate"; then
            python="$candidate"
            break
        fi
    done
fi
if [ -z "$python" ] || ! has_torch "$python"; then
    echo "install.sh: no Python with torch found; set PYTHON=/path/to/python (the one that runs python -m bench)" >&2
    exit 1
fi
echo "install.sh: installing into $("$python" -c 'import sys; print(sys.prefix)')"

pin() { grep -E "^$1==" "$here/requirements.txt"; }

torch_before="$("$python" -c 'import torch; print(torch.__version__)')"
"$python" -m pip install --no-deps "$(pin timm)" "$(pin ema-pytorch)" "$(pin torch-ema)" "$(pin diffusers)"
# pip may say here that timm requires torchvision: expected, the benchmark loads only timm's model_ema.py.
"$python" -m pip install "$(pin huggingface-hub)" "$(pin safetensors)" "$(pin regex)" "$(pin requests)" \
    "$(pin importlib-metadata)" "$(pin pyyaml)"
torch_after="$("$python" -c 'import torch; print(torch.__version__)')"
if [ "$torch_before" != "$torch_after" ]; then
    echo "install.sh: torch changed from $torch_before to $torch_after" >&2
    exit 1
fi
echo "install.sh: peers installed; torch is still $torch_after"
