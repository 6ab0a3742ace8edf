#!/bin/sh
# Build the wsplice container image with the first tool that can build here:
# docker (when its engine answers), podman, or buildah.
#
#   deploy/image.sh [IMAGE]          IMAGE defaults to $IMAGE, then wsplice:dev
#   IMAGE_TOOL=buildah deploy/image.sh   use that tool, no detection
#   VERSION=v1.2.3 deploy/image.sh       stamp `wsplice version` (default: git describe)
#
# Exits 1 with an explanation when nothing can build: a docker client alone,
# without an engine, is the usual case on CI runners and in containers.
set -eu

image=${1:-${IMAGE:-wsplice:dev}}
case $0 in
*/*) here=${0%/*} ;;
*) here=. ;;
esac
root=$(cd "$here/.." && pwd)
file=$root/deploy/Dockerfile
ignore=$root/deploy/Dockerfile.dockerignore
if [ -z "${VERSION:-}" ]; then
	VERSION=$(git -C "$root" describe --tags --always --dirty 2>/dev/null || true)
fi

have() { command -v "$1" >/dev/null 2>&1; }

say() { printf '%s\n' "image: $*" >&2; }

tool=${IMAGE_TOOL:-}
docker_note=""
if [ -z "$tool" ]; then
	if have docker; then
		if docker info >/dev/null 2>&1; then
			tool=docker
		else
			docker_note="the docker client is installed but no Docker engine answers (docker info failed): start dockerd, or set DOCKER_HOST to a reachable engine"
			say "$docker_note"
		fi
	fi
fi
if [ -z "$tool" ]; then
	if have podman; then
		tool=podman
	elif have buildah; then
		tool=buildah
	fi
	[ -n "$tool" ] && [ -n "$docker_note" ] && say "building with $tool instead"
fi

case $tool in
docker)
	# RUN --mount needs BuildKit (the default since Docker 23).
	DOCKER_BUILDKIT=1
	export DOCKER_BUILDKIT
	set -- docker build
	;;
podman)
	set -- podman build --ignorefile "$ignore"
	;;
buildah)
	set -- buildah build --ignorefile "$ignore"
	;;
"")
	say "no tool here can build a container image."
	if [ -z "$docker_note" ]; then say "  docker:  not installed"; fi
	say "  podman:  not installed (apt-get install -y podman)"
	say "  buildah: not installed (apt-get install -y buildah)"
	say "Install one of them, or build where a Docker engine runs:"
	say "  docker build -f deploy/Dockerfile -t $image ."
	exit 1
	;;
*)
	say "IMAGE_TOOL=$tool: use docker, podman or buildah"
	exit 2
	;;
esac

say "building $image with $tool"
exec "$@" -f "$file" --build-arg "VERSION=$VERSION" -t "$image" "$root"
