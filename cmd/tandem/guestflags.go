package main

import (
	"flag"
	"fmt"
	"strconv"

	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/guest/kvm"
)

// sizeFlag is a flag.Value for byte sizes such as 512MiB or 1GiB.
type sizeFlag struct{ v *uint64 }

func (s sizeFlag) String() string {
	if s.v == nil {
		return ""
	}
	return guest.FormatSize(*s.v)
}

func (s sizeFlag) Set(v string) error {
	n, err := guest.ParseSize(v)
	if err != nil {
		return err
	}
	*s.v = n
	return nil
}

// guestFlags are the guest flags shared by run, primary and demo.
type guestFlags struct {
	kind      string
	cfg       guest.Config
	dirtyRate string
	dirtyLog  string
	// dirtyLogSet: --dirty-log was given (it is a kvm flag)
	dirtyLogSet bool
}

func addGuestFlags(fs *flag.FlagSet, gf *guestFlags) {
	gf.cfg = guest.Config{Memory: 256 << 20, VCPUs: 1, Workload: guest.Workload{Kind: guest.WorkloadKV, Pattern: guest.PatternRandom, Touch: 0}}
	fs.StringVar(&gf.kind, "guest", defaultGuestKind(), "guest backend: kvm or synth")
	fs.Var(sizeFlag{&gf.cfg.Memory}, "memory", "guest memory, e.g. 256MiB or 1GiB")
	fs.IntVar(&gf.cfg.VCPUs, "vcpus", 1, "number of vCPUs")
	fs.StringVar(&gf.cfg.Workload.Kind, "workload", guest.WorkloadKV, "guest workload: dirty or kv")
	fs.Var(sizeFlag{&gf.cfg.Workload.Touch}, "touch", "dirty workload: bytes to touch once, e.g. 512MiB (kv with --dirty-rate: the top bytes of memory its other vCPUs dirty, at most half of memory; on kvm half of memory above its first 16MiB)")
	fs.StringVar(&gf.dirtyRate, "dirty-rate", "0", "dirty workload: pages written per second (kv: written by vCPUs 1 on over --touch while vCPU 0 serves; needs --vcpus 2 or more)")
	fs.StringVar(&gf.cfg.Workload.Pattern, "dirty-pattern", guest.PatternRandom, "dirty workload: seq, random or hot")
	fs.StringVar(&gf.cfg.Workload.Fill, "fill", guest.FillZero, "dirty workload: content of the touched pages: zero, random (incompressible), text (about 3:1 with zstd), mixed (47% zero, 23% one-word, 23% text, 7% random pages, as measured on a Linux guest; see docs/PERFORMANCE.md) or file:PATH (the file repeated)")
	fs.IntVar(&gf.cfg.Workload.WriteBytes, "write-bytes", guest.DefaultWriteBytes, "dirty workload: bytes one dirtying write rewrites, 8 to 4096")
	fs.StringVar(&gf.cfg.Workload.WriteData, "write-data", guest.WriteCounter, "dirty workload: what a dirtying write stores: random or text (default counter: the write counter)")
	fs.StringVar(&gf.cfg.Image, "image", "", "kvm: micro-guest image (default: the one built by make guest-image)")
	fs.StringVar(&gf.cfg.Disk, "disk", "", "path of a virtual disk file")
	fs.StringVar(&gf.cfg.Net.IP, "guest-ip", "", "kv workload: give the guest a network card with this IPv4 address and prefix (e.g. 10.0.0.10/24); it answers ARP and serves kv over UDP")
	fs.StringVar(&gf.cfg.Net.MAC, "guest-mac", "", "with --guest-ip: the card's MAC (default 52:54:00 and the address's last three bytes, the same on every node)")
	fs.Func("kv-port", "with --guest-ip: the UDP port the kv service answers on (default 7000)", func(v string) error {
		n, err := strconv.ParseUint(v, 10, 16)
		if err != nil || n == 0 {
			return fmt.Errorf("want a UDP port, 1 to 65535")
		}
		gf.cfg.Net.Port = uint16(n)
		return nil
	})
	gf.dirtyLog = defaultDirtyLog
	fs.Func("dirty-log", "kvm: dirty-log method: get (KVM_GET_DIRTY_LOG), clear (manual protect + KVM_CLEAR_DIRTY_LOG; a migration's round 0 then write-protects each piece just before sending it) or ring (dirty ring; best for large, mostly idle guests) (default "+defaultDirtyLog+")", func(v string) error {
		gf.dirtyLog, gf.dirtyLogSet = v, true
		return nil
	})
}

// config validates the guest flags and returns the configuration, or a
// usage error naming the bad value and the accepted forms.
func (gf *guestFlags) config() (string, guest.Config, error) {
	switch gf.kind {
	case "kvm", "synth":
	default:
		return "", guest.Config{}, usagef("--guest %q: want kvm or synth", gf.kind)
	}
	rate, err := strconv.ParseUint(gf.dirtyRate, 10, 64)
	if err != nil {
		return "", guest.Config{}, usagef("--dirty-rate %q: want a whole number of pages per second", gf.dirtyRate)
	}
	if kvmDirtyMethod, err = kvm.ParseDirtyMethod(gf.dirtyLog); err != nil {
		return "", guest.Config{}, usagef("%v", err)
	}
	if gf.dirtyLogSet && gf.kind != kvm.Kind {
		return "", guest.Config{}, usagef("--dirty-log %s is for --guest kvm", gf.dirtyLog)
	}
	cfg := gf.cfg
	cfg.Workload.DirtyRate = rate
	if err := cfg.Validate(); err != nil {
		return "", guest.Config{}, usagef("%v", err)
	}
	if err := guest.CheckFillFile(cfg.Workload.Fill); err != nil {
		return "", guest.Config{}, usagef("%v", err)
	}
	return gf.kind, cfg, nil
}
