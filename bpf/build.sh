#!/usr/bin/env bash
# Builds bpf/turnkey_xdp.o, the XDP program turnkey embeds (src/relay/xdp/),
# and bpf/xdp_pass.o, the test bed's pass-everything program (tests/xdp.rs).
# The object is committed so that building turnkey needs no clang; .ci/run
# rebuilds it with `bpf/build.sh --check` and fails if it differs from the
# committed one.
#
# Deterministic: relative file names only (the debug info would otherwise
# hold the checkout's path) and DWARF stripped; BTF (.BTF, .BTF.ext), which
# the loader needs for the map definitions, stays. Byte equality holds for
# one clang version (Debian 12's clang 14, what .ci/run installs); another
# clang may produce different but equivalent code, and --check says so.
set -euo pipefail
cd "$(dirname "$0")"
check=""
[ "${1:-}" = "--check" ] && check=1
status=0
for name in turnkey_xdp xdp_pass; do
  out=$name.o
  if [ -n "$check" ]; then out=$(mktemp --suffix=.o); fi
  clang -O2 -g -target bpf -mcpu=v3 \
    -ffile-prefix-map="$PWD"=. -fno-ident \
    -I/usr/include/"$(uname -m)"-linux-gnu \
    -Wall -Werror \
    -c $name.c -o "$out.tmp"
  llvm-objcopy --strip-debug "$out.tmp" "$out"
  rm -f "$out.tmp"
  if [ -n "$check" ]; then
    if cmp -s "$out" $name.o; then
      echo "bpf/$name.o matches its source ($(clang --version | head -1))"
    else
      echo "bpf/$name.o differs from a rebuild of bpf/$name.c with $(clang --version | head -1): run bpf/build.sh and commit the object" >&2
      status=1
    fi
    rm -f "$out"
  fi
done
exit $status
