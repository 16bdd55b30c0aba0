#!/usr/bin/env bash
# Makes the file-proxy folder that scripts/install.sh harness reads ray-operator v1.7.0 from: the Go module
# proxy reachable here answers that version's .info and .mod, and the checksum database knows its hash, but
# it refuses the .zip. The zip made here from the release tag is byte-for-byte the module's content (the go
# command checks it against go.sum and the checksum database and refuses anything else), so nothing of
# KubeRay is copied into this repository and nothing but the released v1.7.0 can build.
#
#   scripts/kuberay-goproxy.sh KUBERAY_GIT_DIR OUT_DIR     e.g. OUT_DIR=../shared/kuberay/goproxy
#
# KUBERAY_GIT_DIR: a clone (bare is fine) of github.com/ray-project/kuberay holding tag ray-operator/v1.7.0.
set -euo pipefail
VERSION=v1.7.0
MODULE=github.com/ray-project/kuberay/ray-operator
[ $# = 2 ] || { echo "usage: scripts/kuberay-goproxy.sh KUBERAY_GIT_DIR OUT_DIR" >&2; exit 2; }
GIT=$(cd "$1" && pwd)
OUT=$(mkdir -p "$2" && cd "$2" && pwd)
SRC=$(cd "$(dirname "$0")/.." && pwd)
GO=${GO:-$(command -v go || echo /usr/local/go/bin/go)}
DIR="$OUT/$MODULE/@v"
mkdir -p "$DIR"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
git clone -q --no-checkout --shared "$GIT" "$TMP/kuberay"
(cd "$SRC/tests/operator" && GOFLAGS=-mod=readonly "$GO" build -o "$TMP/modzip" ./modzip)
"$TMP/modzip" "$TMP/kuberay" "ray-operator/$VERSION" ray-operator "$MODULE" "$VERSION" "$DIR/$VERSION.zip"
git -C "$GIT" show "ray-operator/$VERSION:ray-operator/go.mod" > "$DIR/$VERSION.mod"
printf '{"Version":"%s"}\n' "$VERSION" > "$DIR/$VERSION.info"
echo "$VERSION" > "$DIR/list"
echo "kuberay-goproxy.sh: $DIR/$VERSION.zip; check: GOPROXY=file://$OUT go mod download $MODULE@$VERSION" >&2
