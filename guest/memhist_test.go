package guest

import (
	"fmt"
	"os"
	"testing"

	"github.com/klauspost/compress/zstd"
)

// TestMemoryHistogram classifies every page of a raw guest memory dump
// named by $TANDEM_MEMDUMP (docs/linux-memory-histogram.sh makes one from
// Debian's kernel booted under QEMU): zero, or by its zstd ratio alone
// (Tandem's level, SpeedFastest) in buckets. It is how the mixed profile's
// shares are measured; without the variable it is skipped.
func TestMemoryHistogram(t *testing.T) {
	path := os.Getenv("TANDEM_MEMDUMP")
	if path == "" {
		t.Skip("TANDEM_MEMDUMP not set")
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	enc, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedFastest), zstd.WithEncoderConcurrency(1))
	if err != nil {
		t.Fatal(err)
	}
	buckets := []struct {
		name     string
		minRatio float64
	}{{"ratio >= 8", 8}, {"4 <= ratio < 8", 4}, {"2 <= ratio < 4", 2}, {"1.1 <= ratio < 2", 1.1}, {"ratio < 1.1", 0}}
	counts := make([]int, len(buckets))
	var zero, total int
	var raw, packed float64
	page := make([]byte, PageSize)
	var out []byte
	for {
		if _, err := f.Read(page); err != nil {
			break
		}
		total++
		if IsZeroPage(page) {
			zero++
			continue
		}
		out = enc.EncodeAll(page, out[:0])
		raw, packed = raw+PageSize, packed+float64(min(len(out), PageSize))
		r := float64(PageSize) / float64(len(out))
		for i, b := range buckets {
			if r >= b.minRatio {
				counts[i]++
				break
			}
		}
	}
	nonzero := total - zero
	pct := func(n, of int) string { return fmt.Sprintf("%5.1f %%", 100*float64(n)/float64(max(of, 1))) }
	t.Logf("%d pages (%.0f MiB)", total, float64(total)*PageSize/(1<<20))
	t.Logf("%-20s %8d  %s of all", "zero", zero, pct(zero, total))
	for i, b := range buckets {
		t.Logf("%-20s %8d  %s of all  %s of non-zero", b.name, counts[i], pct(counts[i], total), pct(counts[i], nonzero))
	}
	t.Logf("non-zero pages, each compressed alone: %.2f:1", raw/max(packed, 1))
}
