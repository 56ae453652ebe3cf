#!/usr/bin/env bash
# Measures the page classes of a real Linux guest's memory, the source of
# the `--fill mixed` shares (guest/fill.go, docs/PERFORMANCE.md): boots
# Debian's kernel under QEMU (TCG: no hardware virtualisation needed) in a
# 1 GiB guest whose busybox initramfs holds real files from this machine,
# lets it read them once, dumps all of guest RAM with pmemsave and
# classifies every page (zero, or by its zstd ratio) with
# TestMemoryHistogram. Needs root for apt-get; takes a few minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
work=${WORK:-$(mktemp -d)}
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -qq --no-install-recommends qemu-system-x86 linux-image-amd64 busybox-static cpio python3 >/dev/null
kernel=$(ls /boot/vmlinuz-* | sort -V | tail -1)

root=$work/root
mkdir -p "$root"/{bin,proc,sys,dev,data/lib}
cp /usr/bin/busybox "$root/bin/"
for c in sh mount echo sleep cat find grep; do ln -sf busybox "$root/bin/$c"; done
cp -r /usr/share/doc "$root/data/doc"
cp -r /usr/share/man "$root/data/man"
ls -S /usr/lib/x86_64-linux-gnu/*.so* | head -400 | tail -300 | xargs -I{} cp -L {} "$root/data/lib/" 2>/dev/null || true
cat > "$root/init" <<'INIT'
#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
find /data -type f -exec cat {} + > /dev/null
grep -E 'MemTotal|MemFree|Cached' /proc/meminfo
echo TANDEM-GUEST-READY
while true; do sleep 60; done
INIT
chmod +x "$root/init"
(cd "$root" && find . | cpio -o -H newc 2>/dev/null) > "$work/initrd.cpio"
du -sh "$root/data"

qemu-system-x86_64 -machine q35,accel=tcg -cpu max -m 1024 -smp 1 -kernel "$kernel" -initrd "$work/initrd.cpio" \
  -append "console=ttyS0 rdinit=/init quiet" -nographic -display none -serial "file:$work/serial.log" \
  -monitor "unix:$work/mon.sock,server,nowait" >"$work/qemu.out" 2>&1 &
qemu=$!
trap 'kill $qemu 2>/dev/null || true' EXIT
for _ in $(seq 600); do grep -q TANDEM-GUEST-READY "$work/serial.log" 2>/dev/null && break; sleep 1; done
grep -q TANDEM-GUEST-READY "$work/serial.log" || { echo "guest did not boot in 10 min" >&2; exit 1; }
cat "$work/serial.log" | tr -d '\033' | grep -E 'Mem|Cached' || true
python3 - "$work" <<'PY'
import socket, sys, time, os
work = sys.argv[1]
s = socket.socket(socket.AF_UNIX); s.connect(work + "/mon.sock"); time.sleep(0.5); s.recv(65536)
s.send(b'pmemsave 0 0x40000000 "' + (work + '/guest.mem').encode() + b'"\n')
for _ in range(120):
    time.sleep(1)
    if os.path.exists(work + "/guest.mem") and os.path.getsize(work + "/guest.mem") == 1 << 30:
        time.sleep(1); break
PY
TANDEM_MEMDUMP=$work/guest.mem go test ./guest/ -run TestMemoryHistogram -count=1 -v | grep -v '^=== RUN'
echo "kernel: $kernel; $(qemu-system-x86_64 --version | head -1)"
