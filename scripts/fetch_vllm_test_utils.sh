#!/usr/bin/env bash
# Fetches vLLM's own connector test helpers (tests/v1/kv_connector/unit/utils.py: create_vllm_config,
# create_scheduler, create_request, create_model_runner_output, ...) from the vLLM sdist of the
# installed version into .vllm-upstream/, where tests/vllm/conftest.py finds them.
# Run inside the vLLM virtualenv (needs setuptools-rust and setuptools-scm for the sdist metadata).
set -euo pipefail
cd "$(dirname "$0")/.."
version=$(python -c "import importlib.metadata as m; print(m.version('vllm'))")
dest=.vllm-upstream
[ -f "$dest/utils.py" ] && grep -q "vllm==$version" "$dest/VERSION" 2>/dev/null && exit 0
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# VLLM_TARGET_DEVICE=empty: metadata only, nothing built; no version suffix so pip accepts it.
VLLM_TARGET_DEVICE=empty VLLM_SKIP_VERSION_SUFFIX=1 \
  pip download -q --no-deps --no-binary :all: --no-build-isolation "vllm==$version" -d "$tmp"
mkdir -p "$dest"
tar -xzf "$tmp/vllm-$version.tar.gz" -C "$tmp" "vllm-$version/tests/v1/kv_connector/unit/utils.py"
cp "$tmp/vllm-$version/tests/v1/kv_connector/unit/utils.py" "$dest/utils.py"
echo "vllm==$version" > "$dest/VERSION"
echo "vLLM $version connector test helpers in $dest/utils.py"
