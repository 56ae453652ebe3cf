package timing

import (
	"io"
	"log/slog"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

func TestSlowPhasesKeptByName(t *testing.T) {
	reg := prometheus.NewRegistry()
	r := New(reg, slog.New(slog.NewTextHandler(io.Discard, nil)), 10*time.Millisecond)
	now := time.Now()
	r.Observe("flush", now, 40*time.Second)
	r.Observe("dirty-sync", now, time.Millisecond)
	slow := r.SlowPhases()
	if len(slow) != 1 || slow[0].Name != "flush" || slow[0].Duration != 40*time.Second {
		t.Fatalf("slow = %+v, want one 40s flush", slow)
	}
	if n := testutil.CollectAndCount(reg, "tandem_phase_seconds"); n != 2 {
		t.Fatalf("histogram series = %d, want 2 (flush, dirty-sync)", n)
	}
}

func TestSlowListBounded(t *testing.T) {
	r := New(nil, slog.New(slog.NewTextHandler(io.Discard, nil)), time.Nanosecond)
	for i := 0; i < slowKeep+10; i++ {
		r.Observe("p", time.Now(), time.Duration(i+1))
	}
	s := r.SlowPhases()
	if len(s) != slowKeep || s[len(s)-1].Duration != time.Duration(slowKeep+10) {
		t.Fatalf("len %d last %v", len(s), s[len(s)-1].Duration)
	}
}

func TestDeviceOperations(t *testing.T) {
	reg := prometheus.NewRegistry()
	r := New(reg, slog.New(slog.NewTextHandler(io.Discard, nil)), 100*time.Millisecond)
	now := time.Now()
	r.Device("disk", "write", now, 400*time.Millisecond)
	r.Device("disk", "flush", now, time.Millisecond)
	r.Device("console", "write", now, time.Microsecond)
	slow := r.SlowPhases()
	if len(slow) != 1 || slow[0].Name != "device disk.write" || slow[0].Duration != 400*time.Millisecond {
		t.Fatalf("slow %+v, want the 400ms disk write by name", slow)
	}
	if n := testutil.CollectAndCount(reg, "tandem_device_seconds"); n != 3 {
		t.Fatalf("%d device series, want 3", n)
	}
	var nilRec *Recorder
	nilRec.Device("disk", "write", now, time.Hour) // no panic
}
