#!/usr/bin/env bash
# The project's test command: every test, wgpu ones included (on the CPU through Mesa's lavapipe
# when there is no GPU). burn's `fusion` is on, as burn's default features give its users; the
# kernel tests use the plain CubeBackend. Installs the Vulkan driver and loader if they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! ldconfig -p 2>/dev/null | grep -q libvulkan.so.1 || ! ls /usr/share/vulkan/icd.d/lvp_icd.*.json >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[test] installing Mesa's software Vulkan driver (lavapipe) for the wgpu tests"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends mesa-vulkan-drivers libvulkan1 >/dev/null
  elif ! ldconfig -p 2>/dev/null | grep -q libvulkan.so.1; then
    echo "[test] no Vulkan loader found: install mesa-vulkan-drivers and libvulkan1 (or a GPU driver)" >&2
    exit 1
  fi
fi
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"

cargo test --workspace --features wgpu,fusion "$@"
