#!/bin/sh
# The real thing under Yama: a 3-rank pycoll job (this tree, this host's Python)
# in a qemu VM with Debian's 6.1 kernel, ptrace_scope 1, run as root without
# CAP_SYS_PTRACE and as uid 1000. The VM sees the host's / read-only over 9p
# (a tmpfs overlay takes its writes). Passes when every rank's 4 MiB all-reduce
# is exact and went by single copy (bytes_single_copy > 0). Run check.sh first
# (it fetches the kernel); about 1 minute under TCG.
#   sh tools/yama_vm/e2e.sh
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
TREE=$(cd "$HERE/../.." && pwd)
WORK=${YAMA_VM_DIR:-/tmp/pycoll-yama-vm}
KVER=$(ls "$WORK"/kpkg/lib/modules | head -1)
MODS=$WORK/kpkg/lib/modules/$KVER/kernel
PY=$(python3 -c 'import sys; print(sys.executable)')
cd "$WORK"
rm -rf e2e-root && mkdir -p e2e-root/bin e2e-root/proc e2e-root/sys e2e-root/dev e2e-root/mod
cp "$(command -v busybox)" e2e-root/bin/busybox
for m in drivers/virtio/virtio drivers/virtio/virtio_ring drivers/virtio/virtio_pci_modern_dev \
         drivers/virtio/virtio_pci_legacy_dev drivers/virtio/virtio_pci net/9p/9pnet net/9p/9pnet_virtio \
         fs/netfs/netfs fs/fscache/fscache fs/9p/9p fs/overlayfs/overlay; do
    cp "$MODS/$m.ko" e2e-root/mod/  # in dependency order (the package has no modules.dep)
done
sed -e "s|@TREE@|$TREE|g" -e "s|@PY@|$PY|g" "$HERE/e2e_init" > e2e-root/init && chmod 755 e2e-root/init
(cd e2e-root && find . | cpio -o -H newc --quiet | gzip -1) > e2e-initramfs.gz
# multidevs=remap: without it the host's /proc and /sys clash by inode number in the guest
timeout 900 qemu-system-x86_64 -accel "${ACCEL:-tcg}" -cpu max -m 2048 -smp 2 -nographic -no-reboot \
    -kernel "$(ls kpkg/boot/vmlinuz-* | head -1)" -initrd e2e-initramfs.gz \
    -append "console=ttyS0 panic=-1 quiet loglevel=3 rdinit=/init" -net none \
    -virtfs local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap 2>&1 | tee e2e.log
test "$(grep -c '^SINGLE COPY UNDER YAMA: ok' e2e.log)" -eq 2
echo "yama e2e: both runs single-copied"
