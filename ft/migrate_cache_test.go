package ft

import (
	"testing"

	"github.com/tandemvm/tandem/checkpoint"
	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/guest/synth"
)

// TestMigrationCache: uncapped migrations keep the default delta cache;
// capped ones get one covering the guest's memory (at least the default).
func TestMigrationCache(t *testing.T) {
	for _, tc := range []struct {
		memory uint64
		bw     uint64
		want   int64
	}{
		{256 << 20, 0, 0},
		{256 << 20, 12_500_000, 256 << 20},
		{16 << 20, 12_500_000, checkpoint.DefaultCacheBytes},
	} {
		g, err := synth.New(guest.Config{Memory: tc.memory, VCPUs: 1, Workload: guest.Workload{Kind: guest.WorkloadKV}})
		if err != nil {
			t.Fatal(err)
		}
		if got := migrationCache(tc.bw, g); got != tc.want {
			t.Errorf("memory %d, bandwidth %d: cache %d, want %d", tc.memory, tc.bw, got, tc.want)
		}
		g.Close()
	}
}
