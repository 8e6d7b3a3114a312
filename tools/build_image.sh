#!/usr/bin/env bash
# Builds docker/Dockerfile without a registry, then runs the image: the offline build of docs/benchmarks.md.
#
# 1. a Debian bookworm base (Python 3.11) made by debootstrap and imported into buildah's storage;
# 2. `buildah build` of docker/Dockerfile on it, with the CPU build of torch instead of the CUDA one
#    (TORCH_WHEELS: a folder holding the CPU wheel, else download.pytorch.org's CPU index);
# 3. in the image: the demo data, `python -m sface_dist.train configs/demo.yaml --set train.steps=20`,
#    and the entrypoint's SLURM mapping for both launch styles.
#
# Needs root, debootstrap, buildah and podman (apt-get install debootstrap buildah podman), storage driver vfs.
# Usage, from the repository root: tools/build_image.sh [WORKDIR]   (default /var/tmp/sface-build)
set -euo pipefail

work=${1:-/var/tmp/sface-build}
base=localhost/sface-base:bookworm
image=localhost/sface-dist:cpu
torch_version=$(sed -n 's/^TORCH_VERSION := //p' Makefile)
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

torch_args=(--build-arg "TORCH_SPEC=torch==${torch_version}+cpu")
if [[ -n ${TORCH_WHEELS:-} ]]; then
  torch_args+=(--volume "$TORCH_WHEELS:/wheels:ro" --build-arg "TORCH_PIP_ARGS=--find-links /wheels")
else
  torch_args+=(--build-arg "TORCH_PIP_ARGS=--extra-index-url https://download.pytorch.org/whl/cpu")
fi
stage "buildah build $image (BASE=$base, torch ${torch_version}+cpu)"
time buildah build --layers -f docker/Dockerfile --build-arg "BASE=$base" "${torch_args[@]}" -t "$image" .
buildah images "$image"

run=(podman run --rm --network=host --ipc=host -v "$work/data:/workspace/data" -v "$work/runs:/workspace/runs")
mkdir -p "$work/data" "$work/runs"
chown 1000:1000 "$work/data" "$work/runs"

stage "demo data in the image"
time "${run[@]}" "$image" python tools/make_demo_data.py --out data/demo
stage "20 training steps in the image (python, no launcher)"
time "${run[@]}" "$image" python -m sface_dist.train configs/demo.yaml --set train.steps=20 \
  --set train.output=runs/image-python --set train.log_every=5
stage "20 training steps through the entrypoint's SLURM mapping: one task per node, 2 CPU ranks"
time "${run[@]}" -e SLURM_JOB_ID=4242 -e SLURM_JOB_NODELIST=localhost -e SLURM_NNODES=1 -e SLURM_NODEID=0 \
  -e SLURM_NTASKS=1 "$image" torchrun --nproc-per-node=2 -m sface_dist.train configs/demo.yaml \
  --set train.steps=20 --set train.output=runs/image-torchrun --set train.log_every=5
stage "the entrypoint's mapping for 3 nodes (torchrun stands in as echo)"
"${run[@]}" -e SLURM_JOB_ID=4242 -e 'SLURM_JOB_NODELIST=node[03-05,07],gpu1' -e SLURM_NNODES=3 -e SLURM_NODEID=1 \
  -e SLURM_NTASKS=3 -e SLURM_GPUS_ON_NODE=8 --entrypoint bash "$image" \
  -c 'mkdir -p /tmp/bin && printf "#!/bin/sh\necho torchrun \"\$@\"\n" > /tmp/bin/torchrun && chmod +x /tmp/bin/torchrun
      PATH=/tmp/bin:$PATH exec docker/entrypoint.sh torchrun -m sface_dist.train configs/ms1m.yaml'
stage "the entrypoint's mapping for one task per GPU (rank 9 of 16)"
"${run[@]}" -e SLURM_JOB_ID=4242 -e 'SLURM_JOB_NODELIST=node[03-04]' -e SLURM_PROCID=9 -e SLURM_NTASKS=16 \
  -e SLURM_LOCALID=1 "$image" python -c \
  'import os; print(*(f"{k}={os.environ[k]}" for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")))'
stage "user and versions in the image"
"${run[@]}" "$image" python -c 'import os, torch, nvidia.dali, triton, cv2, onnxruntime, sface_dist
print("uid", os.getuid(), "torch", torch.__version__, "dali", nvidia.dali.__version__, "triton", triton.__version__,
      "cv2", cv2.__version__, "onnxruntime", onnxruntime.__version__)'
