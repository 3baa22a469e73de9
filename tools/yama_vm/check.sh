#!/bin/sh
# Boots a Debian kernel (Yama built in) under qemu and checks that single copy's
# ptracer admission (csrc/transport/shm_readers.c) lets sibling ranks read each
# other under ptrace_scope 1, as an ordinary user. This host's kernel may have
# no Yama (then the suite can only check which process is named); run this
# after changing shm_readers.c. About 10 s once the packages are here.
#
#   apt-get install -y qemu-system-x86 busybox-static cpio gcc
#   sh tools/yama_vm/check.sh          # prints the cases, ends with YAMA CHECK ... PASSED
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
CSRC=${CSRC:-$HERE/../../csrc}  # CSRC=...: another tree's C sources
WORK=${YAMA_VM_DIR:-/tmp/pycoll-yama-vm}
mkdir -p "$WORK"
cd "$WORK"
if ! ls kpkg/boot/vmlinuz-* >/dev/null 2>&1; then
    pkg=$(apt-cache search --names-only '^linux-image-[0-9.]+-[0-9]+-amd64$' | sort -V | tail -1 | cut -d' ' -f1)
    apt-get download "$pkg"
    dpkg-deb -x "$pkg"_*.deb kpkg
fi
KERNEL=$(ls kpkg/boot/vmlinuz-* | head -1)
gcc -static -O2 -Wall -Wextra -pthread -I"$CSRC/include" -o yama_check "$HERE/yama_check.c" \
    "$CSRC/transport/shm_readers.c"
rm -rf root && mkdir -p root/bin root/proc root/sys root/dev
cp "$(command -v busybox)" root/bin/busybox
cp "$HERE/init" root/init && chmod 755 root/init
cp yama_check root/yama_check
(cd root && find . | cpio -o -H newc --quiet | gzip -9) > initramfs.gz
timeout 300 qemu-system-x86_64 -accel "${ACCEL:-tcg}" -cpu max -m 512 -smp 1 -nographic -no-reboot \
    -kernel "$KERNEL" -initrd initramfs.gz -append "console=ttyS0 panic=-1 quiet loglevel=3 rdinit=/init" \
    2>&1 | tee vm.log
# the scope-1 user run must pass, and the two controls (scope 0; root) too
test "$(grep -c 'YAMA CHECK.*PASSED' vm.log)" -eq 3
grep -q 'YAMA CHECK (ptrace_scope 1, uid 1000): PASSED' vm.log
echo "yama check: all three runs as expected"
