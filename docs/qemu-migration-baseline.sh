#!/usr/bin/env bash
# Measures QEMU's own live migration on this host, as the baseline for
# Tandem's migration figures (issue 11): a 1 GiB guest (-m 1024, -smp 1,
# TCG: no hardware virtualisation needed) boots Debian's kernel with a
# busybox initramfs whose init runs a small static C program: it fills
# 512 MiB with pseudo-random data (xorshift64), prints READY on the serial
# console, then writes one byte per page, sequentially over the 512 MiB,
# at RATE pages/s (0 = idle after the fill), paced by clock_gettime (the
# pages due each millisecond, then a sleep to the next millisecond).
# A source and a destination QEMU (identical command lines, the
# destination with -incoming defer) run on loopback; once the guest is
# READY the source migrates with QMP (no bandwidth cap: max-bandwidth
# 10 GB/s; downtime-limit 300 ms, QEMU's default) and query-migrate is
# polled every 50 ms until completion. Cases: rate 0 and 25000, each with
# one stream and with multifd (4 channels); RUNS runs each (default 3),
# one line per run, then the medians. After each migration the
# destination's guest is checked: dst_guest=yes if it printed its 2 s
# heartbeat and no oops, "crashed" if its console shows an oops or panic.
# Both QEMUs are killed after every run. Needs root for apt-get; takes
# about four minutes with RUNS=3.
#
#   RUNS=3 bash docs/qemu-migration-baseline.sh
#
# Environment: RUNS (3), RATES ("0 25000"), MODES ("single multifd"),
# QEMU (qemu-system-x86_64), QEMU_ARGS (extra options for both, e.g.
# "-L DIR" for another build's firmware directory), CPU (max), BOOT_TIMEOUT (600 s, boot plus
# fill), MIG_TIMEOUT (300 s per migration), WORK (a fresh temporary
# directory, no comma in its path).
#
# Caveat: QEMU before 9.0 (Debian 12 ships 7.2) loses TCG stores from its
# migration dirty bitmap: the bitmap sync's 64-bit fast path clears bits
# without resetting the TCG TLB's not-dirty flags (fixed upstream in
# March 2024, "physmem: Fix migration dirty bitmap coherency with TCG
# memory access"). Pages the guest keeps writing through a cached TLB
# entry are then never resent; with the 25000 pages/s guest the
# destination's kernel crashes in its timer code within seconds (the
# dst_guest column). Those runs' figures are QEMU's cost with a few hot
# pages under-sent, not a correct migration. A fixed QEMU can be run
# without installing it, e.g. bookworm-backports' 10.0 unpacked with
# `apt-get download qemu-system-x86 qemu-system-common qemu-system-data`
# (a private sources list) and `dpkg-deb -x` into DIR:
#   QEMU_MODULE_DIR=DIR/usr/lib/x86_64-linux-gnu/qemu \
#   QEMU=DIR/usr/bin/qemu-system-x86_64 QEMU_ARGS="-L DIR/usr/share/qemu" \
#   RUNS=3 bash docs/qemu-migration-baseline.sh
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
RATES=${RATES:-"0 25000"}
MODES=${MODES:-"single multifd"}
QEMU=${QEMU:-qemu-system-x86_64}
read -r -a qemu_args <<<"${QEMU_ARGS:-}"
BOOT_TIMEOUT=${BOOT_TIMEOUT:-600}
MIG_TIMEOUT=${MIG_TIMEOUT:-300}
work=${WORK:-$(mktemp -d)}
mkdir -p "$work"
case $work in *,*) echo "WORK must not contain a comma (QEMU option syntax)" >&2; exit 1;; esac
echo "start: $(date -Is); load: $(uptime)"

export DEBIAN_FRONTEND=noninteractive
pkgs="qemu-system-x86 linux-image-amd64 busybox-static cpio python3 gcc libc6-dev"
apt-get install -y -qq --no-install-recommends $pkgs >/dev/null 2>&1 ||
  { apt-get update -qq && apt-get install -y -qq --no-install-recommends $pkgs >/dev/null; }
kernel=$(ls /boot/vmlinuz-* | sort -V | tail -1)

# The guest's program: fill, READY, then paced page writes.
cat > "$work/dirtier.c" <<'C'
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096UL
#define SIZE (512UL << 20)

static double now(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(int argc, char **argv)
{
	long rate = argc > 1 ? atol(argv[1]) : 0;
	uint8_t *m = mmap(NULL, SIZE, PROT_READ | PROT_WRITE,
			  MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (m == MAP_FAILED) {
		perror("mmap");
		return 1;
	}
	uint64_t x = 0x9E3779B97F4A7C15ULL, *w = (uint64_t *)m;
	double t0 = now();
	for (size_t i = 0; i < SIZE / 8; i++) {
		x ^= x << 13;
		x ^= x >> 7;
		x ^= x << 17;
		w[i] = x;
	}
	printf("filled %lu MiB in %.2f s\n", SIZE >> 20, now() - t0);
	printf("READY rate=%ld\n", rate);
	fflush(stdout);
	if (rate <= 0) /* idle: only a heartbeat every 2 s */
		for (double start = now();;) {
			sleep(2);
			printf("PROGRESS t=%.1f pages=0 rate=0\n", now() - start);
			fflush(stdout);
		}

	volatile uint8_t *v = m;
	const uint64_t npages = SIZE / PAGE;
	uint64_t done = 0, idx = 0, last_done = 0, backlog_max = 0;
	double start = now(), last = start;
	for (;;) {
		double t = now();
		uint64_t due = (uint64_t)((t - start) * rate);
		if (due > done && due - done > backlog_max)
			backlog_max = due - done;
		while (done < due) {
			v[idx * PAGE] += 1;
			idx = idx + 1 == npages ? 0 : idx + 1;
			done++;
		}
		if (t - last >= 2.0) {
			printf("PROGRESS t=%.1f pages=%llu rate=%.0f backlog_max=%llu\n",
			       t - start, (unsigned long long)done,
			       (done - last_done) / (t - last),
			       (unsigned long long)backlog_max);
			fflush(stdout);
			last = t;
			last_done = done;
			backlog_max = 0;
		}
		/* sleep to the start of the next millisecond */
		double next = start + (double)((uint64_t)((now() - start) * 1000) + 1) / 1000;
		struct timespec ts = { (time_t)next, (long)((next - (time_t)next) * 1e9) };
		clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL);
	}
}
C
gcc -O2 -static -o "$work/dirtier" "$work/dirtier.c"

root=$work/root
mkdir -p "$root"/{bin,proc,sys,dev}
cp /usr/bin/busybox "$root/bin/"
for c in sh mount echo sleep cat; do ln -sf busybox "$root/bin/$c"; done
cp "$work/dirtier" "$root/bin/dirtier"
# dirty_rate= on the kernel command line reaches init as an environment variable.
cat > "$root/init" <<'INIT'
#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
exec /bin/dirtier "${dirty_rate:-0}"
INIT
chmod +x "$root/init"
(cd "$root" && find . | cpio -o -H newc 2>/dev/null) > "$work/initrd.cpio"

# QMP driver: sets both ends up, migrates, polls, prints one JSON result.
cat > "$work/migrate.py" <<'PY'
import json, socket, sys, time

src_path, dst_path, port, mode, timeout = sys.argv[1:6]
timeout = float(timeout)

class QMP:
    def __init__(self, path):
        deadline = time.time() + 30
        while True:
            try:
                self.s = socket.socket(socket.AF_UNIX)
                self.s.connect(path)
                break
            except OSError:
                self.s.close()
                if time.time() > deadline:
                    raise
                time.sleep(0.1)
        self.s.settimeout(30)
        self.f = self.s.makefile("rb")
        self.read()  # greeting
        self.cmd("qmp_capabilities")

    def read(self):
        line = self.f.readline()
        if not line:
            raise EOFError("QMP closed")
        return json.loads(line)

    def cmd(self, name, args=None):
        msg = {"execute": name}
        if args:
            msg["arguments"] = args
        self.s.sendall(json.dumps(msg).encode() + b"\n")
        for _ in range(10000):
            r = self.read()
            if "event" in r:
                continue
            if "error" in r:
                raise RuntimeError(f"{name}: {r['error']}")
            return r["return"]
        raise RuntimeError(f"{name}: no reply")

src, dst = QMP(src_path), QMP(dst_path)
defaults = src.cmd("query-migrate-parameters")
multifd = mode == "multifd"
for q in (src, dst):
    q.cmd("migrate-set-capabilities",
          {"capabilities": [{"capability": "multifd", "state": multifd}]})
    if multifd:
        q.cmd("migrate-set-parameters", {"multifd-channels": 4})
src.cmd("migrate-set-parameters", {"max-bandwidth": 10_000_000_000, "downtime-limit": 300})
uri = f"tcp:127.0.0.1:{port}"
dst.cmd("migrate-incoming", {"uri": uri})
src.cmd("migrate", {"uri": uri})
r = {}
for _ in range(int(timeout / 0.05)):
    r = src.cmd("query-migrate")
    if r.get("status") in ("completed", "failed", "cancelled"):
        break
    time.sleep(0.05)
else:
    src.cmd("migrate_cancel")
    r["status"] = "timeout(" + str(r.get("status")) + ")"
dst_status = "?"
if r.get("status") == "completed":
    for _ in range(200):  # up to 10 s for the destination to resume
        dst_status = dst.cmd("query-status")["status"]
        if dst_status == "running":
            break
        time.sleep(0.05)
ram = r.get("ram", {})
print(json.dumps({
    "status": r.get("status"), "total_ms": r.get("total-time"),
    "downtime_ms": r.get("downtime"), "setup_ms": r.get("setup-time"),
    "transferred": ram.get("transferred"), "dirty_syncs": ram.get("dirty-sync-count"),
    "normal_pages": ram.get("normal"), "duplicate_pages": ram.get("duplicate"),
    "mbps": ram.get("mbps"), "dst_status": dst_status,
    "defaults": {k: defaults.get(k) for k in ("max-bandwidth", "downtime-limit", "multifd-channels")},
}))
PY

pids=()
kill_qemus() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
  done
  pids=()
}
trap kill_qemus EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

results=$work/results.jsonl
: > "$results"
for rate in $RATES; do
  for mode in $MODES; do
    for run in $(seq "$RUNS"); do
      d=$work/run-$rate-$mode-$run
      mkdir -p "$d"
      common=(-machine q35,accel=tcg -cpu "${CPU:-max}" -m 1024 -smp 1 -kernel "$kernel" -initrd "$work/initrd.cpio"
        -append "console=ttyS0 rdinit=/init quiet dirty_rate=$rate" -nographic -display none -nodefaults "${qemu_args[@]}")
      "$QEMU" "${common[@]}" -serial "file:$d/src.serial" \
        -qmp "unix:$d/src.qmp,server=on,wait=off" >"$d/src.out" 2>&1 &
      pids+=($!)
      "$QEMU" "${common[@]}" -serial "file:$d/dst.serial" \
        -qmp "unix:$d/dst.qmp,server=on,wait=off" -incoming defer >"$d/dst.out" 2>&1 &
      pids+=($!)
      ready=0
      for _ in $(seq $((BOOT_TIMEOUT * 5))); do
        grep -q '^READY' "$d/src.serial" 2>/dev/null && { ready=1; break; }
        kill -0 "${pids[0]}" 2>/dev/null && kill -0 "${pids[1]}" 2>/dev/null || break
        sleep 0.2
      done
      if [ $ready = 0 ]; then
        echo "rate=$rate mode=$mode run=$run: guest not READY in ${BOOT_TIMEOUT}s" >&2
        cat "$d/src.out" "$d/dst.out" >&2
        kill_qemus
        echo "{\"rate\": $rate, \"mode\": \"$mode\", \"run\": $run, \"status\": \"not-ready\"}" >> "$results"
        continue
      fi
      out=$(timeout $((MIG_TIMEOUT + 60)) python3 "$work/migrate.py" "$d/src.qmp" "$d/dst.qmp" \
        "$(free_port)" "$mode" "$MIG_TIMEOUT" 2>"$d/migrate.err") || out='{"status": "driver-error"}'
      # The destination's guest must go on: a new heartbeat, no oops or panic.
      alive=no
      if grep -q '"status": "completed"' <<<"$out"; then
        for _ in $(seq 60); do
          grep -aq PROGRESS "$d/dst.serial" 2>/dev/null && { alive=yes; break; }
          sleep 0.1
        done
      fi
      sleep 1
      grep -aqE 'Kernel panic|general protection|Oops|BUG:' "$d/dst.serial" 2>/dev/null && alive=crashed
      # The source guest's measured write rate over each 2 s interval it ran.
      rates=$(grep -ao 'PROGRESS .*rate=[0-9]*' "$d/src.serial" | sed 's/.* rate=//' | tr '\n' ' ' || true)
      fill=$(grep -ao 'filled .* s' "$d/src.serial" | tr -d '\r' || true)
      kill_qemus
      python3 - "$rate" "$mode" "$run" "$out" "$rates" "$fill" "$alive" >> "$results" <<'PY'
import json, sys
rate, mode, run, out, rates, fill, alive = sys.argv[1:8]
r = json.loads(out)
r.update(rate=int(rate), mode=mode, run=int(run), guest_rates=rates.split(), fill=fill, dst_guest=alive)
print(json.dumps(r))
PY
      python3 - "$results" <<'PY'
import json, sys
r = json.loads(open(sys.argv[1]).read().splitlines()[-1])
mib = (r.get("transferred") or 0) / 2**20
print(f"rate={r['rate']} mode={r['mode']} run={r['run']} status={r.get('status')} "
      f"total={r.get('total_ms')}ms downtime={r.get('downtime_ms')}ms setup={r.get('setup_ms')}ms "
      f"transferred={mib:.1f}MiB dirty_syncs={r.get('dirty_syncs')} normal={r.get('normal_pages')} "
      f"zero={r.get('duplicate_pages')} mbps={r.get('mbps')} dst={r.get('dst_status')} dst_guest={r.get('dst_guest')} "
      f"guest_rates_2s=[{' '.join(r.get('guest_rates', []))}] ({r.get('fill')})", flush=True)
PY
    done
  done
done

python3 - "$results" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
d = next((r["defaults"] for r in rows if r.get("defaults")), {})
print(f"QEMU defaults before setting: max-bandwidth={d.get('max-bandwidth')} B/s, "
      f"downtime-limit={d.get('downtime-limit')} ms, multifd-channels={d.get('multifd-channels')}")
print("medians over completed runs:")
print("| rate pages/s | mode | runs completed | dst guest alive | total ms | downtime ms | setup ms | transferred MiB | dirty syncs |")
print("|---|---|---|---|---|---|---|---|---|")
for rate in sorted({r["rate"] for r in rows}):
    for mode in ("single", "multifd"):
        rs = [r for r in rows if r["rate"] == rate and r["mode"] == mode]
        if not rs:
            continue
        ok = [r for r in rs if r.get("status") == "completed"]
        med = lambda k, f=1: f"{statistics.median(r[k] for r in ok) / f:.0f}" if ok else "-"
        alive = sum(r.get("dst_guest") == "yes" for r in rs)
        print(f"| {rate} | {mode} | {len(ok)}/{len(rs)} | {alive}/{len(rs)} | {med('total_ms')} | {med('downtime_ms')} | "
              f"{med('setup_ms')} | {med('transferred', 2**20)} | {med('dirty_syncs')} |")
PY
echo "kernel: $kernel; $("$QEMU" --version | head -1)"
echo "end: $(date -Is); load: $(uptime)"
