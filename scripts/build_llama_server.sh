#!/usr/bin/env bash
# Builds llama-server (the peer in benchmark 1) from the llama.cpp source vendored in the same
# llama-cpp-python sdist the gateway uses, with the CMake flags given (the Makefile passes its own
# LLAMA_CMAKE_ARGS, so both sides run the same kernels). Usage: build_llama_server.sh CACHE_DIR PIP [CMAKE ARGS...]
set -euo pipefail
cache=$1; pip=$2; shift 2
version=$("$pip" show llama-cpp-python | sed -n 's/^Version: //p')
# One binary per version and set of flags: a binary built for another CPU's instructions may not run here.
flags=$(echo "$*" | md5sum | cut -c1-8)
binary="$cache/bin-$version-$flags/llama-server"
if [ -x "$binary" ]; then echo "$binary"; exit 0; fi
mkdir -p "$cache/sdist"
sdist="$cache/sdist/llama_cpp_python-$version.tar.gz"
[ -f "$sdist" ] || "$pip" download --quiet --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$cache/sdist" >&2
src="$cache/llama_cpp_python-$version/vendor/llama.cpp"
[ -d "$src" ] || tar -xzf "$sdist" -C "$cache"
cmake -S "$src" -B "$cache/build-$version-$flags" -DCMAKE_BUILD_TYPE=Release -DLLAMA_BUILD_SERVER=ON \
  -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
  -DBUILD_SHARED_LIBS=OFF "$@" >&2
cmake --build "$cache/build-$version-$flags" --target llama-server -j "$(nproc)" >&2
mkdir -p "$(dirname "$binary")"
cp "$cache/build-$version-$flags/bin/llama-server" "$binary"
echo "$binary"
