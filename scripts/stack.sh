#!/usr/bin/env bash
# The tracing stack tests/stack/ runs for real: Prometheus and Alertmanager (Debian
# packages), the OpenTelemetry Collector (built with the Collector Builder from
# collector-config/builder-config.yaml) and Jaeger v2 (built from its Go module),
# plus docker-compose to validate the compose file offline. No Docker engine.
#
# Source it (scripts/test does) and call ensure_stack_binaries, or run
# `bash scripts/stack.sh` (`bash scripts/stack.sh stack_binary_paths` prints where
# the tests look for the two Go binaries). Idempotent: the Go binaries are built
# once into a cache outside the checkout, ${MULTIRUN_CACHE_DIR:-$HOME/.cache/multirun-otel}/bin,
# named by version (Jaeger) and by the manifest's hash (the collector: a changed
# manifest builds a new one); a later call only checks that they are there.
#
# Supply chain: Go modules come through the Go module proxy and are checked
# against checksums. Jaeger's own go.sum authenticates its dependencies. The
# collector is built on the same collector release as Jaeger, so its go.sum is
# seeded from Jaeger's (authenticated through Jaeger's entry in sum.golang.org);
# anything it lacks is looked up in the checksum database as usual. The builder
# tool itself is pinned by its module hash (OCB_MODULE_SUM).

STACK_JAEGER_MODULE=github.com/jaegertracing/jaeger
STACK_JAEGER_VERSION=v1.76.0   # the v1.x tags carry Jaeger v2 (cmd/jaeger); collector v0.140.x inside
STACK_OCB_MODULE=go.opentelemetry.io/collector/cmd/builder
STACK_OCB_VERSION=v0.140.0     # must match the core component versions in builder-config.yaml
STACK_OCB_MODULE_SUM="h1:6K1AS9EtXxtEjXPQlwOIFSPwzevk6VNd1fAcbHryFI4="

_stack_root() { (cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd); }
_stack_bin_dir() { echo "${MULTIRUN_CACHE_DIR:-$HOME/.cache/multirun-otel}/bin"; }

_stack_manifest_key() {
  # 12 hex digits of the sha256 of the manifest and the builder's version: the collector's name carries it
  { cat "$(_stack_root)/collector-config/builder-config.yaml"; echo "ocb $STACK_OCB_VERSION"; } \
    | sha256sum | cut -c1-12
}

stack_binary_paths() {
  # where the built binaries are (or will be): one `name=path` line each
  local bin
  bin=$(_stack_bin_dir)
  echo "otelcol=$bin/otelcol-multirun-$(_stack_manifest_key)"
  echo "jaeger=$bin/jaeger-$STACK_JAEGER_VERSION"
}

_stack_need_go() {
  if ! command -v go >/dev/null 2>&1; then
    echo "stack.sh: the Go toolchain (go >= 1.24) is needed to build the Collector and Jaeger" \
      "for tests/stack: install it from https://go.dev/dl and put it on PATH" >&2
    return 1
  fi
}

ensure_stack_packages() {
  # prometheus (and promtool), prometheus-alertmanager, docker-compose: apt, only when missing
  local missing=() pair
  for pair in prometheus:prometheus promtool:prometheus prometheus-alertmanager:prometheus-alertmanager \
    docker-compose:docker-compose; do
    if ! command -v "${pair%%:*}" >/dev/null 2>&1 && [[ " ${missing[*]} " != *" ${pair#*:} "* ]]; then
      missing+=("${pair#*:}")
    fi
  done
  [[ ${#missing[@]} -eq 0 ]] && return 0
  if ! declare -F _apt_install >/dev/null; then
    source "$(_stack_root)/scripts/services.sh"
  fi
  local started=$SECONDS
  _apt_install "${missing[@]}" || return 1
  echo "    installed ${missing[*]} in $((SECONDS - started))s"
}

_stack_module_dir() {
  # $1: module@version; downloads it (checksum-verified) and prints its folder in the module cache
  local json
  json=$(go mod download -json "$1") || { echo "stack.sh: go mod download $1 failed" >&2; return 1; }
  sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p' <<<"$json"
}

ensure_jaeger() {
  # Jaeger v2 from its module source (`go install ...@version` refuses a go.mod with replace directives)
  local target work src started=$SECONDS
  target=$(_stack_bin_dir)/jaeger-$STACK_JAEGER_VERSION
  [[ -x "$target" ]] && return 0
  _stack_need_go || return 1
  echo "==> building Jaeger $STACK_JAEGER_VERSION into $target (once; several minutes on 2 cores)"
  src=$(_stack_module_dir "$STACK_JAEGER_MODULE@$STACK_JAEGER_VERSION") || return 1
  work=$(mktemp -d)
  cp -r "$src/." "$work/" && chmod -R u+w "$work"
  mkdir -p "$(dirname "$target")"
  if ! (cd "$work" && go build -trimpath -ldflags "-s -w" -o "$target.tmp.$$" ./cmd/jaeger); then
    rm -rf "$work" "$target.tmp.$$"
    echo "stack.sh: building Jaeger $STACK_JAEGER_VERSION failed" >&2
    return 1
  fi
  mv -f "$target.tmp.$$" "$target"
  rm -rf "$work"
  echo "    built Jaeger in $((SECONDS - started))s"
}

_ensure_ocb() {
  # the OpenTelemetry Collector Builder, pinned by version and module hash; prints its path
  local ocb sum gobin
  ocb=$(_stack_bin_dir)/ocb-$STACK_OCB_VERSION
  if [[ ! -x "$ocb" ]]; then
    # pinned below instead of looked up in sum.golang.org, which does not know every version
    sum=$(GONOSUMDB=$STACK_OCB_MODULE go mod download -json "$STACK_OCB_MODULE@$STACK_OCB_VERSION" \
      | sed -n 's/^[[:space:]]*"Sum": "\(.*\)",$/\1/p') || true
    if [[ "$sum" != "$STACK_OCB_MODULE_SUM" ]]; then
      echo "stack.sh: $STACK_OCB_MODULE@$STACK_OCB_VERSION has checksum '$sum'," \
        "expected $STACK_OCB_MODULE_SUM: refusing to build with it" >&2
      return 1
    fi
    gobin=$(mktemp -d)
    if ! GONOSUMDB=$STACK_OCB_MODULE GOBIN=$gobin go install "$STACK_OCB_MODULE@$STACK_OCB_VERSION" >&2; then
      rm -rf "$gobin"
      echo "stack.sh: go install $STACK_OCB_MODULE@$STACK_OCB_VERSION failed" >&2
      return 1
    fi
    mkdir -p "$(dirname "$ocb")"
    mv -f "$gobin/builder" "$ocb"
    rm -rf "$gobin"
  fi
  echo "$ocb"
}

ensure_collector() {
  # the collector of collector-config/builder-config.yaml, built with the Collector Builder
  local target ocb work jaeger_src started=$SECONDS
  target=$(_stack_bin_dir)/otelcol-multirun-$(_stack_manifest_key)
  [[ -x "$target" ]] && return 0
  _stack_need_go || return 1
  echo "==> building the Collector of collector-config/builder-config.yaml into $target (once)"
  ocb=$(_ensure_ocb) || return 1
  jaeger_src=$(_stack_module_dir "$STACK_JAEGER_MODULE@$STACK_JAEGER_VERSION") || return 1
  work=$(mktemp -d)
  cp "$(_stack_root)/collector-config/builder-config.yaml" "$work/manifest.yaml"
  mkdir -p "$work/_build"  # the manifest's output_path, relative to where the builder runs
  cp "$jaeger_src/go.sum" "$work/_build/go.sum" && chmod u+w "$work/_build/go.sum"
  if ! (cd "$work" && "$ocb" --config manifest.yaml --skip-strict-versioning=false >build.log 2>&1); then
    cat "$work/build.log" >&2
    rm -rf "$work"
    echo "stack.sh: the Collector Builder failed (its log is above)" >&2
    return 1
  fi
  mkdir -p "$(dirname "$target")"
  mv -f "$work/_build/otelcol-multirun" "$target"
  rm -rf "$work"
  echo "    built the Collector in $((SECONDS - started))s"
}

ensure_stack_binaries() {
  # everything tests/stack needs; prints one line per install or build, and the time it took
  local started=$SECONDS
  ensure_stack_packages || return 1
  ensure_jaeger || return 1
  ensure_collector || return 1
  if ((SECONDS - started > 1)); then
    echo "==> tracing stack ready in $((SECONDS - started))s"
  fi
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  set -euo pipefail
  "${@:-ensure_stack_binaries}"
fi
