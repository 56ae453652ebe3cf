package guest

import (
	"fmt"
	"math"
	"strconv"
	"strings"
)

// Config is what both backends are built from. The command line's guest
// flags map onto it one to one.
type Config struct {
	Memory   uint64   // bytes of guest RAM, a multiple of PageSize
	VCPUs    int      // 1 or more
	Workload Workload // what the guest runs
	Disk     string   // path of a disk image file; "" for none
	Image    string   // kvm only: the micro-guest image; "" for the default
	Net      Net      // the network card; zero: none
}

// Workload kinds.
const (
	WorkloadDirty = "dirty"
	WorkloadKV    = "kv"
)

// Dirty patterns.
const (
	PatternSeq    = "seq"
	PatternRandom = "random"
	PatternHot    = "hot"
)

// Workload says what the guest's vCPUs do.
type Workload struct {
	Kind string // WorkloadDirty or WorkloadKV

	// dirty: touch Touch bytes once, then write DirtyRate pages per second
	// over the touched range in Pattern order. DirtyRate 0 means idle after
	// the touch. kv with a DirtyRate (and two vCPUs or more): vCPU 0
	// serves, the others do the same over the top Touch bytes of memory
	// (at most half), and the table takes the memory below: a service
	// that dirties memory while it answers (KVDirtyBytes).
	Touch     uint64
	DirtyRate uint64
	Pattern   string
	// Seed makes the random and hot patterns reproducible, and the
	// generated fills and write data (fill.go).
	Seed uint64

	// Fill is what the touch puts in every touched page: FillZero (or
	// ""), FillRandom, FillText, FillMixed or FillFilePrefix+PATH.
	Fill string
	// WriteBytes is how much of a page one dirtying write rewrites, 8 to
	// 4096 bytes; 0 means DefaultWriteBytes.
	WriteBytes int
	// WriteData is what a dirtying write stores: WriteCounter (or ""),
	// WriteRandom or WriteText.
	WriteData string
}

// WriteSize is WriteBytes with its default applied.
func (w Workload) WriteSize() int {
	if w.WriteBytes == 0 {
		return DefaultWriteBytes
	}
	return w.WriteBytes
}

// Validate checks c and returns a one-line error naming the bad value and
// the accepted forms.
func (c Config) Validate() error {
	if c.Memory == 0 || c.Memory%PageSize != 0 {
		return fmt.Errorf("%w: --memory %d: want a positive multiple of 4KiB such as 256MiB or 1GiB", ErrConfig, c.Memory)
	}
	if c.Memory>>PageShift > 1<<40 {
		return fmt.Errorf("%w: --memory %s: at most 4PiB", ErrConfig, FormatSize(c.Memory))
	}
	if c.VCPUs < 1 || c.VCPUs > 64 {
		return fmt.Errorf("%w: --vcpus %d: want 1 to 64", ErrConfig, c.VCPUs)
	}
	if c.Net != (Net{}) {
		if _, err := c.Net.Endpoint(); err != nil {
			return err
		}
		if c.Workload.Kind != WorkloadKV {
			return fmt.Errorf("%w: --guest-ip: the network card serves the kv workload; this guest runs %q", ErrConfig, c.Workload.Kind)
		}
	}
	return c.Workload.validate(c.Memory, c.VCPUs)
}

func (w Workload) validate(memory uint64, vcpus int) error {
	if FillKind(w.Fill) < 0 {
		return fmt.Errorf("%w: --fill %q: want %s", ErrConfig, w.Fill, fillForms)
	}
	if w.WriteBytes != 0 && (w.WriteBytes < MinWriteBytes || w.WriteBytes > MaxWriteBytes) {
		return fmt.Errorf("%w: --write-bytes %d: want %d to %d", ErrConfig, w.WriteBytes, MinWriteBytes, MaxWriteBytes)
	}
	if WriteKind(w.WriteData) < 0 {
		return fmt.Errorf("%w: --write-data %q: want random or text (or counter, the default)", ErrConfig, w.WriteData)
	}
	switch w.Kind {
	case WorkloadKV:
		if w.DirtyRate == 0 {
			return nil
		}
	case WorkloadDirty:
	default:
		return fmt.Errorf("%w: --workload %q: want dirty or kv", ErrConfig, w.Kind)
	}
	switch w.Pattern {
	case PatternSeq, PatternRandom, PatternHot:
	default:
		return fmt.Errorf("%w: --dirty-pattern %q: want seq, random or hot", ErrConfig, w.Pattern)
	}
	if w.Touch > memory {
		return fmt.Errorf("%w: --touch %s is larger than --memory %s", ErrConfig, FormatSize(w.Touch), FormatSize(memory))
	}
	if w.Touch < PageSize && w.DirtyRate > 0 {
		return fmt.Errorf("%w: --dirty-rate %d needs --touch of at least 4KiB", ErrConfig, w.DirtyRate)
	}
	if w.DirtyRate > 100_000_000 {
		return fmt.Errorf("%w: --dirty-rate %d: at most 100000000 pages/s", ErrConfig, w.DirtyRate)
	}
	if w.Kind == WorkloadKV {
		if vcpus < 2 {
			return fmt.Errorf("%w: --dirty-rate with --workload kv needs --vcpus 2 or more (vCPU 0 serves, the others dirty)", ErrConfig)
		}
		if w.Touch > memory/2 {
			return fmt.Errorf("%w: --touch %s with --workload kv: at most half of --memory %s (the kv table takes the rest)", ErrConfig, FormatSize(w.Touch), FormatSize(memory))
		}
	}
	return nil
}

// KVDirtyBytes is how many bytes at the top of memory a kv guest's
// vCPUs other than 0 dirty (Workload's kv with a DirtyRate): Touch, or 0
// without a rate or a second vCPU. The kv table takes the memory below.
func (c Config) KVDirtyBytes() uint64 {
	w := c.Workload
	if w.Kind != WorkloadKV || w.DirtyRate == 0 || c.VCPUs < 2 {
		return 0
	}
	return min(w.Touch, c.Memory/2) &^ (PageSize - 1)
}

var sizeUnits = []struct {
	suffix string
	mult   uint64
}{
	{"KiB", 1 << 10}, {"MiB", 1 << 20}, {"GiB", 1 << 30}, {"TiB", 1 << 40},
	{"K", 1 << 10}, {"M", 1 << 20}, {"G", 1 << 30}, {"T", 1 << 40},
	{"B", 1},
}

// ParseSize reads a byte size such as 4096, 512MiB, 1GiB or 2T (binary
// units). The error names the bad value and the accepted forms.
func ParseSize(s string) (uint64, error) {
	t := strings.TrimSpace(s)
	mult := uint64(1)
	for _, u := range sizeUnits {
		if strings.HasSuffix(t, u.suffix) {
			t, mult = strings.TrimSuffix(t, u.suffix), u.mult
			break
		}
	}
	n, err := strconv.ParseUint(t, 10, 64)
	if err != nil || t == "" {
		return 0, fmt.Errorf("bad size %q: want a number with an optional unit, like 4096, 512MiB or 1GiB", s)
	}
	if n > math.MaxUint64/mult {
		return 0, fmt.Errorf("bad size %q: too large", s)
	}
	return n * mult, nil
}

// FormatSize prints n with the largest binary unit that divides it.
func FormatSize(n uint64) string {
	for _, u := range []struct {
		suffix string
		mult   uint64
	}{{"TiB", 1 << 40}, {"GiB", 1 << 30}, {"MiB", 1 << 20}, {"KiB", 1 << 10}} {
		if n >= u.mult && n%u.mult == 0 {
			return strconv.FormatUint(n/u.mult, 10) + u.suffix
		}
	}
	return strconv.FormatUint(n, 10) + "B"
}
