package kvm

import (
	"testing"
	"time"

	"github.com/tandemvm/tandem/guest"
)

// BenchmarkTouchFill: how fast the micro-guest fills 256 MiB with each
// fill profile (one vCPU at CPL3; every first write to a page takes a
// fault on the host), against the old one-store-per-page touch (zero).
func BenchmarkTouchFill(b *testing.B) {
	skipWithoutKVM(b)
	const touch = 256 << 20
	var zero float64
	for _, fill := range []string{guest.FillZero, guest.FillRandom, guest.FillText, guest.FillMixed} {
		b.Run(fill, func(b *testing.B) {
			var total time.Duration
			for i := 0; i < b.N; i++ {
				cfg := dirtyConfig(512<<20, touch, 0, guest.PatternSeq, 1)
				cfg.Workload.Fill = fill
				g, err := New(cfg)
				if err != nil {
					b.Fatal(err)
				}
				t0 := time.Now()
				mustResume(b, g)
				waitProgress(b, g, 1)
				total += time.Since(t0)
				g.Close()
			}
			mbps := float64(touch) * float64(b.N) / total.Seconds() / 1e6
			b.ReportMetric(mbps, "MB/s")
			if fill == guest.FillZero {
				zero = mbps
			} else if zero > 0 {
				b.ReportMetric(mbps/zero, "x-zero")
			}
		})
	}
}
