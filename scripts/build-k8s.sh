#!/usr/bin/env bash
# Build (or locate) the Kubernetes v1.20.2 control-plane binaries the dev cluster runs:
#   kube-apiserver kube-controller-manager kube-scheduler kubectl etcd
#
# Sources: Debian bookworm's `kubernetes` source package (the full v1.20.2 tree with vendor/), built with
# Go 1.15 from Debian bullseye (newer Go crashes the API server in the vendored reflect2 v1.0.1), and
# bookworm's etcd-server 3.4. Everything apt touches is private to this script (own sources.list, lists
# and cache dirs): the machine's apt configuration is never changed.
#
# Idempotent: when every binary is present it prints the bin dir and exits at once.
# Honours KUBEBUILDER_ASSETS (envtest convention): kube-apiserver/etcd/kubectl found there are used as they
# are (copied/linked into the bin dir); only what is missing is built.
#
# Output: the last line on stdout is the absolute bin dir.
# Env: KUBEFORGE_CACHE (default ~/.cache/kubeforge), KUBEFORGE_K8S_BIN (override the bin dir),
#      KUBEFORGE_DEBIAN_MIRROR (default: the mirror the machine's apt sources use, else deb.debian.org).
set -euo pipefail

K8S_VERSION=v1.20.2
CACHE="${KUBEFORGE_CACHE:-$HOME/.cache/kubeforge}"
BIN="${KUBEFORGE_K8S_BIN:-$CACHE/k8s-$K8S_VERSION/bin}"
WORK="$CACHE/k8s-$K8S_VERSION/work"
APTDIR="$CACHE/apt"
ALL=(kube-apiserver kube-controller-manager kube-scheduler kubectl etcd)

log() { echo "[build-k8s] $*" >&2; }

missing() {
  local m=()
  for b in "${ALL[@]}"; do [[ -x "$BIN/$b" ]] || m+=("$b"); done
  echo "${m[@]:-}"
}

mkdir -p "$BIN"

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

log "missing: $(missing); building into $BIN (log lines below)"
mkdir -p "$WORK" "$APTDIR"/{lists/partial,cache/archives/partial,etc/sources.list.d,etc/preferences.d}

# ---- private apt --------------------------------------------------------------------------------------
mirror="${KUBEFORGE_DEBIAN_MIRROR:-}"
if [[ -z "$mirror" ]]; then
  mirror=$(grep -hoE '^(URIs:[[:space:]]*|deb[[:space:]]+(\[[^]]*\][[:space:]]+)?)https?://[^[:space:]]+/debian/?([[:space:]]|$)' \
    /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list 2>/dev/null \
    | grep -oE 'https?://[^[:space:]]+' | head -n1 || true)
fi
mirror="${mirror:-http://deb.debian.org/debian}"
mirror="${mirror%/}"
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
cat >"$APTDIR/etc/sources.list" <<EOF
deb [signed-by=$keyring] $mirror bookworm main
deb-src [signed-by=$keyring] $mirror bookworm main
deb [signed-by=$keyring] $mirror bullseye main
EOF
APT_OPTS=(
  -o "Dir::Etc::SourceList=$APTDIR/etc/sources.list"
  -o "Dir::Etc::SourceParts=$APTDIR/etc/sources.list.d"
  -o "Dir::Etc::Preferences=$APTDIR/etc/preferences"
  -o "Dir::Etc::PreferencesParts=$APTDIR/etc/preferences.d"
  -o "Dir::State::Lists=$APTDIR/lists"
  -o "Dir::Cache=$APTDIR/cache"
  -o "APT::Sandbox::User=root"
  -o "Debug::NoLocking=1"
  -q
)
apt_private() { apt-get "${APT_OPTS[@]}" "$@"; }

need_update=1
if compgen -G "$APTDIR/lists/*bullseye*Packages*" >/dev/null && compgen -G "$APTDIR/lists/*bookworm*Sources*" >/dev/null; then
  need_update=0
fi
if (( need_update )); then
  log "apt-get update (private lists in $APTDIR)"
  apt_private update >&2
fi

# Download .debs into a dir and unpack them into a private root.
fetch_debs() { # root pkg...
  local root=$1; shift
  local dl="$APTDIR/debs"
  mkdir -p "$dl" "$root"
  (cd "$dl" && apt_private download "$@" >&2)
  for p in "$@"; do
    local name=${p%%/*}
    local deb
    deb=$(ls -t "$dl"/"${name}"_*.deb | head -n1)
    dpkg -x "$deb" "$root"
  done
}

# ---- etcd ---------------------------------------------------------------------------------------------
if [[ ! -x "$BIN/etcd" ]]; then
  log "fetching etcd-server (bookworm)"
  fetch_debs "$WORK/etcd-root" etcd-server/bookworm
  cp "$WORK/etcd-root/usr/bin/etcd" "$BIN/etcd"
fi

build_targets=()
for b in kube-apiserver kube-controller-manager kube-scheduler kubectl; do
  [[ -x "$BIN/$b" ]] || build_targets+=("cmd/$b")
done

if (( ${#build_targets[@]} )); then
  # ---- Go 1.15 (bullseye) -----------------------------------------------------------------------------
  GOROOT_DIR="$WORK/go-root/usr/lib/go-1.15"
  if [[ ! -x "$GOROOT_DIR/bin/go" ]]; then
    log "fetching golang-1.15 (bullseye)"
    fetch_debs "$WORK/go-root" golang-1.15-go/bullseye golang-1.15-src/bullseye
  fi
  # ---- rsync (the k8s build scripts need it; not installed system-wide here) -------------------------
  TOOLS="$WORK/tools-root"
  if ! command -v rsync >/dev/null && [[ ! -x "$TOOLS/usr/bin/rsync" ]]; then
    log "fetching rsync (bookworm) into a private dir"
    fetch_debs "$TOOLS" rsync/bookworm libpopt0/bookworm
  fi
  # ---- kubernetes source ------------------------------------------------------------------------------
  SRC="$WORK/src"
  if [[ ! -f "$SRC/.kubeforge-unpacked" ]]; then
    log "fetching the kubernetes source package (bookworm)"
    rm -rf "$WORK/srcpkg" "$SRC"
    mkdir -p "$WORK/srcpkg"
    (cd "$WORK/srcpkg" && apt_private source --download-only kubernetes/bookworm >&2)
    dsc=$(ls "$WORK/srcpkg"/kubernetes_*.dsc | head -n1)
    if command -v dpkg-source >/dev/null; then
      # dpkg-source applies Debian's patches too (printing fixes and a CVE fix).
      (cd "$WORK/srcpkg" && dpkg-source --no-check -x "$dsc" "$SRC" >&2)
    else
      # No dpkg-dev here: unpack by hand, then apply the Debian patch series when `patch` exists.
      mkdir -p "$SRC"
      tar -xf "$(ls "$WORK/srcpkg"/kubernetes_*.orig.tar.* | head -n1)" -C "$SRC" --strip-components=1
      tar -xf "$(ls "$WORK/srcpkg"/kubernetes_*.debian.tar.* | head -n1)" -C "$SRC"
      if command -v patch >/dev/null && [[ -f "$SRC/debian/patches/series" ]]; then
        grep -v '^#' "$SRC/debian/patches/series" | while read -r p _; do
          [[ -n "$p" ]] && patch -d "$SRC" -p1 -s <"$SRC/debian/patches/$p" >&2
        done
      fi
    fi
    touch "$SRC/.kubeforge-unpacked"
  fi

  log "building ${build_targets[*]} with Go 1.15 (nice; a cold build takes ~10 min on 2 cores)"
  (
    cd "$SRC"
    export GOROOT="$GOROOT_DIR"
    export PATH="$GOROOT/bin:$TOOLS/usr/bin:$PATH"
    export LD_LIBRARY_PATH="$TOOLS/usr/lib/x86_64-linux-gnu:$TOOLS/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    export GOCACHE="$WORK/gocache" GOPATH="$WORK/gopath" GOFLAGS=-mod=vendor GO111MODULE=on
    export GOTOOLCHAIN=local CGO_ENABLED=0
    # No git metadata in a source package: stamp the version ourselves.
    export KUBE_GIT_VERSION="$K8S_VERSION" KUBE_GIT_TREE_STATE=clean KUBE_GIT_MAJOR=1 KUBE_GIT_MINOR=20
    export KUBE_GIT_COMMIT=faecb196815e248d3ecfb03c680a4507229c2a56
    go version >&2
    nice -n 10 make WHAT="${build_targets[*]}" KUBE_VERBOSE=1 >&2
    for t in "${build_targets[@]}"; do
      b=${t#cmd/}
      out=$(ls _output/local/bin/*/*/"$b" _output/bin/"$b" 2>/dev/null | head -n1)
      [[ -n "$out" ]] || { log "build produced no $b"; exit 1; }
      cp "$out" "$BIN/$b.tmp" && mv "$BIN/$b.tmp" "$BIN/$b"
    done
  )
fi

if [[ -n "$(missing)" ]]; then
  log "still missing: $(missing)"
  exit 1
fi
log "done"
echo "$BIN"
