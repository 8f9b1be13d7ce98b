# ember: `make setup` installs what ember and its tests need (idempotent),
# `make run` boots the demo image in a micro-VM, `make test` runs the whole
# suite, `make lint` runs ruff and mypy.
SHELL := /bin/bash
# empty: Debian's /usr/bin/python3 where there is one (scripts/setup-venv says why)
PYTHON ?=
VENV := .venv
BIN := $(VENV)/bin
# Test images are built once and cached outside the repository.
export EMBER_TEST_CACHE ?= /var/cache/ember-tests

# Debian packages: the tools ember drives (QEMU, mkfs, loop devices, nftables)
# and the real peers its tests use (docker-registry, skopeo, podman, buildah, umoci).
APT_PACKAGES := \
	podman skopeo buildah umoci docker-registry apache2-utils \
	qemu-system-x86 qemu-utils debootstrap busybox-static musl-tools linux-libc-dev \
	xfsprogs e2fsprogs btrfs-progs nftables conntrack iproute2 kmod cpio zstd \
	fuse-overlayfs uidmap util-linux wrk postgresql python3-venv openssl strace \
	golang-docker-credential-helpers pass

.PHONY: setup apt venv init kernel demo run test lint clean

setup: apt venv init kernel demo

apt:
	@missing=$$(for p in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed$$' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	fi

# .venv with ember installed editable; made anew when made by another interpreter
venv: apt
	scripts/setup-venv $(PYTHON)

# ember-init, the guest's PID 1: static musl binary init/build/ember-init
init: apt
	$(MAKE) -C init

# Debian's guest kernel (apt-get download, no install on the host) under $$EMBER_HOME
kernel: venv
	$(BIN)/ember kernel install

# The demo image (busybox-static, scratch) as an OCI layout; idempotent.
demo: apt
	scripts/build-demo-image build/demo

# ember's main job on the embedded default: the demo image as a micro-VM.
run: setup
	$(BIN)/ember run --rm oci:build/demo:latest /bin/sh -c 'echo "hello from a micro-VM"; uname -sr'

test: setup
	$(BIN)/pytest

lint: venv
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy

clean:
	rm -rf $(VENV) build init/build
