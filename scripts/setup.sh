#!/usr/bin/env bash
# Create .venv and install mmdit_probe with its test extras. torch is pinned first (CPU wheel on
# these machines) so nothing downstream can pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test]"
# Test reference: OpenAI's real CLIP BPE vocabulary ships in open-clip-torch. Without --no-deps it would pull
# torchvision (which does not import beside this torch wheel) and timm; the tests read only its tokenizer file.
.venv/bin/python -m pip install -q --no-deps "open-clip-torch>=2.20" "ftfy>=6" "wcwidth>=0.2"
