#!/usr/bin/env bash
# Builds docker/Dockerfile without a registry, then runs the image: the offline build of docs/benchmarks.md.
#
# 1. a Debian bookworm base (Python 3.11) made by debootstrap and imported into buildah's storage;
# 2. `buildah build` of docker/Dockerfile on it: BUILD=cuda (the default) with the Dockerfile's default arguments,
#    as a cluster builds it (PyPI's CUDA torch, requirements/cuda.txt); BUILD=cpu with the CPU build of torch
#    (requirements/cpu.txt; TORCH_WHEELS: a folder holding the CPU wheel, else download.pytorch.org's CPU index);
# 3. in the image: the versions it holds; with BUILD=cuda the test suite but its GPU and fault tests (CUDA torch
#    runs on the CPU), from a copy of the repository's tests; the demo data, `python -m sface_dist.train
#    configs/demo.yaml --set train.steps=20`, the same under torchrun and under DeepSpeed ZeRO-2, and the
#    entrypoint's SLURM mapping for both launch styles.
#
# Needs root, debootstrap and buildah (apt-get install debootstrap buildah), storage driver vfs.
# REBUILD_BASE=1 makes the base again.
# Usage, from the repository root: [BUILD=cuda|cpu] tools/build_image.sh [WORKDIR]   (default /var/tmp/sface-build)
set -euo pipefail

work=${1:-/var/tmp/sface-build}
build=${BUILD:-cuda}
base=localhost/sface-base:bookworm
image=localhost/sface-dist:$build
export STORAGE_DRIVER=vfs BUILDAH_ISOLATION=chroot
mkdir -p "$work"

stage() { printf '\n== %s (%s)\n' "$*" "$(date -u +%H:%M:%S)"; }

if ! buildah inspect --type image "$base" >/dev/null 2>&1 || [[ ${REBUILD_BASE:-0} == 1 ]]; then
  stage "debootstrap bookworm into $work/rootfs"
  [[ -x $work/rootfs/usr/bin/python3 ]] ||
    time debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$work/rootfs" \
      http://deb.debian.org/debian
  stage "import the base as $base"
  # This machine's CA bundle, as an organisation's base image would carry it: pip reaches PyPI through it.
  cp /etc/ssl/certs/ca-certificates.crt "$work/rootfs/etc/ssl/certs/ca-certificates.crt"
  time tar -C "$work/rootfs" -cf "$work/rootfs.tar" .
  container=$(buildah from scratch)
  buildah add "$container" "$work/rootfs.tar" /
  buildah config --env LANG=C.UTF-8 --env PIP_CERT=/etc/ssl/certs/ca-certificates.crt --cmd /bin/bash "$container"
  buildah commit --rm "$container" "$base"
fi

torch_args=()
if [[ $build == cpu ]]; then
  torch_args=(--build-arg BUILD_LOCK=requirements/cpu.txt)
  if [[ -n ${TORCH_WHEELS:-} ]]; then
    torch_args+=(--volume "$TORCH_WHEELS:/wheels:ro" --build-arg "TORCH_PIP_ARGS=--find-links /wheels")
  else
    torch_args+=(--build-arg "TORCH_PIP_ARGS=--extra-index-url https://download.pytorch.org/whl/cpu")
  fi
fi
stage "buildah build $image (BASE=$base, ${torch_args[*]:-the Dockerfile defaults})"
time buildah build --layers -f docker/Dockerfile --build-arg "BASE=$base" "${torch_args[@]}" -t "$image" .
buildah images "$image"

# The image runs in a buildah working container with the host's network, IPC and host name (as
# docker run --network=host --ipc=host), as the image's user and through its entrypoint. podman run would do
# the same where its OCI runtime may set the container's rlimits; on a machine where it may not, this still runs.
container=$(buildah from "$image")
trap 'buildah rm "$container" >/dev/null' EXIT
read -ra entrypoint <<<"$(buildah inspect --format '{{range .OCIv1.Config.Entrypoint}}{{.}} {{end}}' "$image")"
user=$(buildah inspect --format '{{.OCIv1.Config.User}}' "$image")
rm -rf "$work/runs"
mkdir -p "$work/data" "$work/runs"
chown "$(buildah run --user "$user" "$container" -- id -u)" "$work/data" "$work/runs"
in_image() {
  local options=()
  while [[ $1 == -e ]]; do options+=("$1" "$2"); shift 2; done
  buildah run --network host --ipc host --uts host --user "$user" "${options[@]}" \
    -v "$work/data:/workspace/data" -v "$work/runs:/workspace/runs" "$container" -- "${entrypoint[@]}" "$@"
}
slurm_node=(-e SLURM_JOB_ID=4242 -e SLURM_JOB_NODELIST=localhost -e SLURM_NNODES=1 -e SLURM_NODEID=0 -e SLURM_NTASKS=1)

stage "versions in the image"
in_image python -c 'import torch, nvidia.dali, triton, deepspeed
print("torch", torch.__version__, "cuda", torch.version.cuda, "dali", nvidia.dali.__version__, "triton",
      triton.__version__, "deepspeed", deepspeed.__version__)'
if [[ $build == cuda ]]; then
  stage "the test suite but its GPU and fault tests, in the image"
  rm -rf "$work/repo" && mkdir -p "$work/repo"
  git archive HEAD | tar -x -C "$work/repo"  # the repository as committed, its tests included
  chown -R "$(buildah run --user "$user" "$container" -- id -u)" "$work/repo"
  time buildah run --network host --ipc host --uts host --user "$user" -v "$work/repo:/workspace/repo" \
    --workingdir /workspace/repo "$container" -- python -m pytest -q -p no:cacheprovider tests/unit
fi

stage "demo data in the image"
time in_image python tools/make_demo_data.py --out data/demo
stage "20 training steps in the image (python, no launcher)"
time in_image python -m sface_dist.train configs/demo.yaml --set train.steps=20 \
  --set train.output=runs/image-python --set train.log_every=5
stage "20 training steps through the entrypoint's SLURM mapping: one task per node, 2 CPU ranks"
time in_image "${slurm_node[@]}" torchrun --nproc-per-node=2 -m sface_dist.train configs/demo.yaml \
  --set train.steps=20 --set train.output=runs/image-torchrun --set train.log_every=5
stage "20 training steps with the backbone under DeepSpeed ZeRO-2, through the entrypoint, 2 CPU ranks"
time in_image "${slurm_node[@]}" torchrun --nproc-per-node=2 -m sface_dist.train configs/demo.yaml \
  --set train.steps=20 --set train.output=runs/image-zero2 --set train.log_every=5 \
  --set train.engine=deepspeed --set deepspeed.stage=2
stage "the entrypoint's mapping for 3 nodes (without scontrol; a stand-in torchrun prints its arguments)"
in_image bash -c 'mkdir -p runs/bin && printf "#!/bin/sh\necho torchrun \"\$@\"\n" > runs/bin/torchrun
                  chmod +x runs/bin/torchrun'
in_image -e 'SLURM_JOB_ID=4242' -e 'SLURM_JOB_NODELIST=node[03-05,07],gpu1' -e SLURM_NNODES=3 -e SLURM_NODEID=1 \
  -e SLURM_NTASKS=3 -e SLURM_GPUS_ON_NODE=8 -e PATH=/workspace/runs/bin:/opt/venv/bin:/usr/bin:/bin \
  torchrun -m sface_dist.train configs/ms1m.yaml
stage "the entrypoint's mapping for one task per GPU (rank 9 of 16)"
in_image -e SLURM_JOB_ID=4242 -e 'SLURM_JOB_NODELIST=node[03-04]' -e SLURM_PROCID=9 -e SLURM_NTASKS=16 \
  -e SLURM_LOCALID=1 python -c \
  'import os; print(*(f"{k}={os.environ[k]}" for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")))'
stage "user and versions in the image"
in_image python -c 'import os, torch, nvidia.dali, triton, cv2, onnxruntime, deepspeed, sface_dist
print("uid", os.getuid(), "torch", torch.__version__, "dali", nvidia.dali.__version__, "triton", triton.__version__,
      "cv2", cv2.__version__, "onnxruntime", onnxruntime.__version__, "deepspeed", deepspeed.__version__)'
stage "the largest installed packages"
in_image bash -c 'du -sm /opt/venv/lib/python3.11/site-packages/* | sort -n | tail -n 8'
