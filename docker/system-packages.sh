#!/bin/sh
# The CPU image's system packages (both stages of docker/Dockerfile.cpu): what scripts/setup.sh
# checks for on CPU and pip cannot install. libnuma1 and libgomp1: vLLM's CPU kernels; g++ and
# Python's headers: torch.compile's CPU code, built at run time (vLLM's sampler compiles some ops
# even in eager mode). The official python images carry the headers; a Debian python3.11 needs
# python3.11-dev.
set -eu
packages="libnuma1 libgomp1 g++"
python3 -c 'import os, sys, sysconfig; sys.exit(not os.path.isfile(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
    || packages="$packages python3.11-dev"
apt-get update
DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $packages
rm -rf /var/lib/apt/lists/*
