package failover

import (
	"math/rand/v2"
	"testing"

	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/guest/synth"
)

// BenchmarkVerifySlice is the verification slice a pause re-reads, on the
// worst case for it: every page non-zero and incompressible (random), so
// no page is skipped as zero. Baseline in the same run: copying the same
// bytes, the least a pass over them costs.
func BenchmarkVerifySlice(b *testing.B) {
	cfg := guest.Config{Memory: 64 << 20, VCPUs: 1, Workload: guest.Workload{Kind: guest.WorkloadKV}}
	g, err := synth.New(cfg)
	if err != nil {
		b.Fatal(err)
	}
	defer g.Close()
	rng := rand.New(rand.NewPCG(1, 2))
	for _, r := range g.Regions() {
		for i := 0; i+8 <= len(r.Mem); i += 8 {
			v := rng.Uint64()
			for k := range 8 {
				r.Mem[i+k] = byte(v >> (8 * k))
			}
		}
	}
	l := NewEpochLoop(EpochConfig{Guest: g, Config: cfg, Verify: true})
	var vs verifySlice
	bytes := int64(l.cfg.VerifySlicePages) * guest.PageSize
	b.Run("slice", func(b *testing.B) {
		b.SetBytes(bytes)
		for b.Loop() {
			l.readSlice(&vs, l.cfg.VerifySlicePages)
		}
	})
	b.Run("copy-baseline", func(b *testing.B) {
		dst := make([]byte, bytes)
		b.SetBytes(bytes)
		var off int64
		mem := g.Regions()[0].Mem
		for b.Loop() {
			if off+bytes > int64(len(mem)) {
				off = 0
			}
			copy(dst, mem[off:off+bytes])
			off += bytes
		}
	})
}
