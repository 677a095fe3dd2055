#!/usr/bin/env bash
# Build (or locate) the dev cluster's binaries from the Go module proxy:
#   kube-apiserver kube-controller-manager kube-scheduler kubectl   Kubernetes v1.34.4 (k8s.io/kubernetes)
#   etcd                                                            v3.6.17 (go.etcd.io/etcd/server/v3)
#   kueue  (only with the `kueue` argument)                         v0.17.0 (sigs.k8s.io/kueue/cmd/kueue)
#
# Each is built from a small build module of ours under scripts/k8s-build/ whose go.mod/go.sum pin the
# exact module graph (k8s.io/kubernetes replaces its staging modules with ./staging paths that a dependent
# module cannot see, so ours pins every k8s.io/* staging module to the matching v0.34.4 release).
# Uses the Go on PATH when it is >= 1.21, else fetches a Go toolchain from the module proxy (see below).
#
# Built once into ~/.cache/kubeforge/k8s-<version>/bin (and kueue-<version>/bin), keyed by version; the Go
# module and build caches live in ~/.cache/kubeforge/go. Idempotent: prints the bin dir at once when every
# binary is present. Honours KUBEBUILDER_ASSETS (envtest convention): binaries found there are linked in
# and not built.
#
# Usage: scripts/build-k8s.sh [kueue]     Output: the last line on stdout is the absolute bin dir.
# Env: KUBEFORGE_CACHE (default ~/.cache/kubeforge), KUBEFORGE_K8S_BIN (override the Kubernetes bin dir).
set -euo pipefail

K8S_VERSION=v1.34.4
ETCD_VERSION=v3.6.17
KUEUE_VERSION=v0.17.0
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
MODS="$HERE/k8s-build"
CACHE="${KUBEFORGE_CACHE:-$HOME/.cache/kubeforge}"
BIN="${KUBEFORGE_K8S_BIN:-$CACHE/k8s-$K8S_VERSION/bin}"
KUEUE_BIN="$CACHE/kueue-$KUEUE_VERSION/bin"
ALL=(kube-apiserver kube-controller-manager kube-scheduler kubectl etcd)

want_kueue=0
for a in "$@"; do
  case "$a" in
    kueue) want_kueue=1 ;;
    *) echo "usage: $0 [kueue]" >&2; exit 2 ;;
  esac
done

log() { echo "[build-k8s] $*" >&2; }

missing() {
  local m=()
  for b in "${ALL[@]}"; do [[ -x "$BIN/$b" ]] || m+=("$b"); done
  if (( want_kueue )) && [[ ! -x "$KUEUE_BIN/kueue" ]]; then m+=(kueue); fi
  echo "${m[@]:-}"
}

mkdir -p "$BIN" "$CACHE"

# Binaries provided by KUBEBUILDER_ASSETS win: link them in.
if [[ -n "${KUBEBUILDER_ASSETS:-}" && -d "${KUBEBUILDER_ASSETS}" ]]; then
  for b in "${ALL[@]}"; do
    if [[ -x "$KUBEBUILDER_ASSETS/$b" && ! -e "$BIN/$b" ]]; then
      ln -sf "$(readlink -f "$KUBEBUILDER_ASSETS/$b")" "$BIN/$b"
      log "using $KUBEBUILDER_ASSETS/$b"
    fi
  done
fi

if [[ -z "$(missing)" ]]; then
  echo "$BIN"
  exit 0
fi

# One build at a time (the CLI and a test session may both ask).
exec 9>"$CACHE/build-k8s.lock"
if ! flock -n 9; then
  log "another build is running; waiting for it"
  flock 9
fi
if [[ -z "$(missing)" ]]; then echo "$BIN"; exit 0; fi

# Go: the one on PATH when it is >= 1.21 (it then fetches the exact toolchain a go.mod asks for); otherwise
# the Go distribution the module proxy serves as golang.org/toolchain (what GOTOOLCHAIN downloads), unpacked
# into the cache.
GO_FALLBACK=go1.26.8
go_ok() { command -v go >/dev/null && go env GOVERSION 2>/dev/null | grep -qE '^go1\.(2[1-9]|[3-9][0-9])'; }
if ! go_ok; then
  tc="$CACHE/go-toolchain/$GO_FALLBACK"
  if [[ ! -x "$tc/bin/go" ]]; then
    proxy="${GOPROXY:-https://proxy.golang.org}"; proxy="${proxy%%,*}"
    arch=$(uname -m); case "$arch" in x86_64) arch=amd64 ;; aarch64) arch=arm64 ;; esac
    log "no Go >= 1.21 on PATH: fetching $GO_FALLBACK from $proxy"
    mkdir -p "$tc.tmp"
    curl -fsSL "$proxy/golang.org/toolchain/@v/v0.0.1-$GO_FALLBACK.linux-$arch.zip" -o "$tc.zip"
    python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "$tc.zip" "$tc.tmp"
    gobin=$(find "$tc.tmp" -path '*/bin/go' -type f | head -n1)
    mv "$(dirname "$(dirname "$gobin")")" "$tc" && rm -rf "$tc.tmp" "$tc.zip"
    chmod +x "$tc"/bin/* "$tc"/pkg/tool/*/* 2>/dev/null || true
  fi
  export PATH="$tc/bin:$PATH" GOROOT="$tc"
fi

export GOMODCACHE="$CACHE/go/mod" GOCACHE="$CACHE/go/build" GOPATH="$CACHE/go/path"
export GOFLAGS="-mod=readonly -trimpath" CGO_ENABLED=0
log "missing: $(missing); building with $(go version) (a cold build takes ~15 min on 2 cores)"

# go build of main packages into a scratch dir; the binaries move into place only once all of them built.
# `name=pkg` names a binary explicitly (etcd's main package path ends in /v3).
build() { # module-dir out-dir ldflags [name=]pkg...
  local mod=$1 out=$2 ldflags=$3; shift 3
  local tmp t
  tmp=$(mktemp -d "$CACHE/build.XXXXXX")
  for t in "$@"; do
    if [[ $t == *=* ]]; then
      (cd "$mod" && nice -n 10 go build -ldflags "$ldflags" -o "$tmp/${t%%=*}" "${t#*=}") >&2
    else
      (cd "$mod" && nice -n 10 go build -ldflags "$ldflags" -o "$tmp/" "$t") >&2
    fi
  done
  mkdir -p "$out"
  for t in "$tmp"/*; do mv -f "$t" "$out/"; done
  rmdir "$tmp"
}

k8s_targets=()
for b in kube-apiserver kube-controller-manager kube-scheduler kubectl; do
  [[ -x "$BIN/$b" ]] || k8s_targets+=("k8s.io/kubernetes/cmd/$b")
done
if (( ${#k8s_targets[@]} )); then
  minor=${K8S_VERSION#v1.}; minor=${minor%%.*}
  ld="-s -w"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
  done
  log "building ${k8s_targets[*]}"
  # One go build per binary keeps the peak memory of the link step low; the build cache shares the rest.
  build "$MODS" "$BIN" "$ld" "${k8s_targets[@]}"
fi

if [[ ! -x "$BIN/etcd" ]]; then
  log "building etcd $ETCD_VERSION"
  build "$MODS/etcd" "$BIN" "-s -w" etcd=go.etcd.io/etcd/server/v3
fi

if (( want_kueue )) && [[ ! -x "$KUEUE_BIN/kueue" ]]; then
  log "building kueue $KUEUE_VERSION"
  build "$MODS/kueue" "$KUEUE_BIN" \
    "-s -w -X sigs.k8s.io/kueue/pkg/version.GitVersion=$KUEUE_VERSION" sigs.k8s.io/kueue/cmd/kueue
fi

if [[ -n "$(missing)" ]]; then
  log "still missing: $(missing)"
  exit 1
fi
log "done"
echo "$BIN"
